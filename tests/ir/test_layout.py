"""planner/ir/layout.py: outputs whose CPU kernel breaks the fake layout are
restrided in the captured training graph, and nothing else is touched; inference
graphs record the kernel's layout instead (restrided only where a traced view
needs the fake one)."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import nn

import planner
from planner.ir.capture import capture
from planner.ir.layout import propagate_fake_values
from planner.ir.meta import FX_VAL


class _Norm(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transposed = transposed
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # (batch, length, channels) -> channels first and back
            h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.bn(x).transpose(1, 2)
        return self.fc(h).pow(2).mean()


_BATCH_NORMS = (
    torch.ops.aten._native_batch_norm_legit_functional.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten._native_batch_norm_legit.no_stats,
    torch.ops.aten.native_batch_norm_backward.default,
)


def _clones(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The restriding copies: clone(permute(<a BatchNorm kernel's output>))."""
    out = []
    for n in gm.graph.nodes:
        if n.target is not torch.ops.aten.clone.default:
            continue
        permute = n.args[0]
        if permute.target is torch.ops.aten.permute.default:
            source = permute.args[0]  # a getitem of the kernel's outputs
            if source.op == "call_function" and source.args[0].target in _BATCH_NORMS:
                out.append(n)
    return out


def test_transposed_batchnorm_output_is_restrided_and_runs() -> None:
    x = torch.randn(2, 3, 4)
    captured = capture(_Norm(transposed=True), (x,), mode="train")
    gm = captured.graph_module
    clones = _clones(gm)
    assert clones, "the BatchNorm output was not restrided"
    for clone in clones:
        # what reads the result (permuted back) is a view of the copy's storage, as
        # the fake values now say (the IR reads storages off them)
        (back,) = clone.users
        copy_storage = clone.meta[FX_VAL].untyped_storage()
        assert back.meta[FX_VAL].untyped_storage()._cdata == copy_storage._cdata
        for user in back.users:
            val = user.meta[FX_VAL]
            if isinstance(val, torch.Tensor) and val._base is not None:
                assert val.untyped_storage()._cdata == copy_storage._cdata
    # and the step runs (it failed with a view error before), gradients as eager's

    model = _Norm(transposed=True)
    eager = _Norm(transposed=True)
    eager(x).backward()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=1)
    try:
        pm(x).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
    finally:
        pm.close()


def test_contiguous_batchnorm_input_is_left_alone() -> None:
    captured = capture(_Norm(transposed=False), (torch.randn(2, 4, 3),), mode="train")
    assert not _clones(captured.graph_module)


class _NormThenWide(nn.Module):
    """BatchNorm over a transposed input, then a Linear that widens: the Linear's
    output is the peak, and ``linear`` copies its input, non-contiguous at run time,
    because its weight requires grad (matmul folds the batch dims by a copy)."""

    def __init__(self, training: bool, track_running_stats: bool, flatten: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flatten = flatten
        self.bn = nn.BatchNorm1d(8, track_running_stats=track_running_stats)
        self.fc = nn.Linear(8 * 16 if flatten else 8, 64)
        self.train(training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        if self.flatten:  # eager copies; the trace recorded a view (fake: contiguous)
            h = h.reshape(h.shape[0], -1)
        return self.fc(h)


def _batch_norm_outputs(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    return [
        n.meta[FX_VAL]
        for n in gm.graph.nodes
        if n.target is operator.getitem and n.args[0].target in _BATCH_NORMS and n.args[1] == 0
    ]


def _planned_as_eager(model: nn.Module, eager: nn.Module, x: torch.Tensor) -> None:
    """Plan ``model`` for inference at its unplanned peak: the meter stays within the
    budget, and the outputs equal eager's bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model in training mode planned for inference
        pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu", time_limit=1)
    try:
        out = pm.run_measured(x)
        assert pm.measured is not None
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        with torch.no_grad():
            assert torch.equal(out, eager(x))
    finally:
        pm.close()


_FORMS = pytest.mark.parametrize(
    ("training", "track_running_stats"),
    [(True, True), (False, True), (True, False)],
    ids=["train-mode", "eval-mode", "no-running-stats"],
)


@_FORMS
def test_inference_records_batchnorm_real_layout_and_stays_within_budget(
    training: bool, track_running_stats: bool
) -> None:
    # each BatchNorm form an inference graph holds. Before, the fake values kept the
    # transposed layout, the workspace pass measured the Linear on a contiguous
    # input, and the Linear copied its input (2,048 bytes) beyond the plan
    x = torch.randn(4, 16, 8)
    captured = capture(_NormThenWide(training, track_running_stats), (x,), mode="infer")
    (out,) = _batch_norm_outputs(captured.graph_module)
    assert out.is_contiguous(), "the fake value does not say what the kernel returns"
    assert not _clones(captured.graph_module), "the graph was rewritten"
    _planned_as_eager(
        _NormThenWide(training, track_running_stats),
        _NormThenWide(training, track_running_stats),
        x,
    )


@_FORMS
def test_inference_restrides_where_a_traced_view_needs_the_fake_layout(
    training: bool, track_running_stats: bool
) -> None:
    # the reshape traced to a view of the (fake) contiguous transposed-back output,
    # which the real layout does not allow: restrided, as in training
    x = torch.randn(4, 16, 8)
    model = _NormThenWide(training, track_running_stats, flatten=True)
    captured = capture(model, (x,), mode="infer")
    assert _clones(captured.graph_module), "the BatchNorm output was not restrided"
    _planned_as_eager(
        _NormThenWide(training, track_running_stats, flatten=True),
        _NormThenWide(training, track_running_stats, flatten=True),
        x,
    )


def test_propagation_keeps_the_parameters_requires_grad() -> None:
    # a propagation records detached values; the placeholders keep theirs (before,
    # a restrided graph's parameters lost requires_grad, and the workspace pass
    # measured a Linear on a non-contiguous input without the copy it makes)
    captured = capture(_NormThenWide(False, True), (torch.randn(4, 16, 8),), mode="infer")
    gm = captured.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    before = {n.name: n.meta[FX_VAL].requires_grad for n in placeholders}
    assert before["p_fc_weight"]
    propagate_fake_values(gm, placeholders[0].meta[FX_VAL].fake_mode)
    assert {n.name: n.meta[FX_VAL].requires_grad for n in placeholders} == before


class _ConvThenPermutedNorm(nn.Module):
    """A BatchNorm over a permuted convolution output, reduced after: no view traced
    after it needs the fake layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).permute(0, 1, 3, 2)).sum((2, 3)).pow(2).sum()


def test_training_runs_batchnorm_on_the_layout_its_kernel_returns() -> None:
    """Training restrided every such output to the fake layout (a copy), so the ops
    after it reduced another layout than eager's: the loss and every gradient came
    out rounded apart from eager's (and from torch.compile(backend="aot_eager")'s,
    which equal eager's here), conv.bias's by 0.017 of its largest 0.042. Now, as in
    inference, the graph records the real layout and is rewritten only where a
    view traced after it needs the fake one."""
    x = torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    eager = _ConvThenPermutedNorm()
    eager_loss = eager(x)
    eager_loss.backward()
    model = _ConvThenPermutedNorm()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=1)
    try:
        loss = pm(x)
        loss.backward()
        assert torch.equal(loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
        pm.run_measured_step(x)
        assert pm.measured is not None and pm.measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()
    captured = capture(_ConvThenPermutedNorm(), (x,), mode="train")
    assert not _clones(captured.graph_module), "the graph was rewritten"


class _NormBetweenLayouts(nn.Module):
    """BatchNorm whose saved input and incoming gradient differ in memory format:
    an NCHW input with a channels-last gradient (a channels-last convolution
    after it), or a channels-last input with a permuted gradient."""

    def __init__(self, channels_last_input: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.channels_last_input = channels_last_input
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
        if channels_last_input:
            self.conv1 = self.conv1.to(memory_format=torch.channels_last)
        self.register_buffer("m", torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv1(x))
        if self.channels_last_input:
            return (h.permute(0, 1, 3, 2) @ self.m).pow(2).sum()
        return self.conv2(h).pow(2).sum()


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_training_records_the_layout_batchnorm_backward_returns(
    channels_last_input: bool,
) -> None:
    """BatchNorm's backward returns grad_input in its saved input's memory format;
    the fake one follows grad_output's. Recorded from the fake output, an NCHW
    input under a channels-last gradient read as channels-last (and a
    channels-last input under a permuted gradient as NCHW): the ops after it
    were measured on a layout they do not run on."""
    from planner.ir.conv_layout import _first_real_layout_mismatch

    x = torch.randn(4, 4, 8, 8)
    captured = capture(_NormBetweenLayouts(channels_last_input), (x,), mode="train")
    backward = [
        n
        for n in captured.graph_module.graph.nodes
        if n.target is torch.ops.aten.native_batch_norm_backward.default
    ]
    assert backward
    assert _first_real_layout_mismatch(backward) is None


class _ReturnsPermutedNorm(nn.Module):
    """Returns (through a ReLU) a BatchNorm over a permuted convolution output: the
    output's fake layout is the permuted one, the CPU kernel's NCHW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x).permute(0, 1, 3, 2)))


def test_training_output_stays_laid_out_as_its_tangent() -> None:
    """A forward output whose layout the kernel's changed came out NCHW while its
    tangent stayed traced permuted: each backward copied the gradient into the
    tangent's layout, and ran on mixed layouts. A loss over the output (its
    gradient laid out as the output) peaked at 1,287,832 bytes against a budget of
    1,189,520 (the unplanned peak, itself up from 1,086,736), eager at 988,112."""
    from planner.runtime.meter import measure

    x = torch.randn(8, 8, 16, 24, generator=torch.Generator().manual_seed(3))
    model = _ReturnsPermutedNorm()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=1)
    try:
        out = pm(x)
        assert [out.stride()] == pm._wiring.tangent_strides
        out.pow(2).sum().backward()
        model.zero_grad(set_to_none=True)

        def step() -> None:
            pm(x).pow(2).sum().backward()

        _, measured = measure(step, pm)
        assert measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()
