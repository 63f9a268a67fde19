"""planner/ir/fused_loss.py: cross-entropy's backward as one op that holds no
logits-sized buffer besides its result, bit-identical to the two ATen calls it
replaces, and a training plan with Inductor kernels that uses it fits its budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import planner
from planner.codegen import segments
from planner.ir import fused_loss
from planner.ir.capture import capture
from planner.ir.fused_loss import FUSED_OP, fuse_cross_entropy_backward
from planner.ir.meta import FX_VAL
from planner.runtime.meter import measure

_aten = torch.ops.aten
VOCAB, TOKENS = 2048, 256


class _TinyLM(nn.Module):
    """A language-model head: its logits (2 MiB) dominate the step's memory."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB)
        self.label_smoothing = label_smoothing

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(ids))))
        return F.cross_entropy(
            logits.float().view(-1, VOCAB), labels.view(-1), label_smoothing=self.label_smoothing
        )


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, TOKENS // 4))
    labels = torch.randint(0, VOCAB, (4, TOKENS // 4))
    labels[:, ::7] = -100  # ignored positions, as padding is
    return ids, labels


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3000, 1])
def test_fused_op_is_bit_identical_to_the_pair_it_replaces(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    reduction: int,
    weighted: bool,
    chunk_bytes: int,
) -> None:
    """Whole, a few rows, or one row at a time: the same bits as
    ``_log_softmax_backward_data(nll_loss_backward(...))``, ignored rows included."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    rows, classes = 67, 300
    output = torch.log_softmax(torch.randn(rows, classes, dtype=dtype) * 3, 1)
    target = torch.randint(0, classes, (rows,))
    target[::5] = -100
    weight = torch.rand(classes, dtype=dtype) if weighted else None
    grad = torch.rand(rows, dtype=dtype) if reduction == 0 else torch.rand((), dtype=dtype)
    total = torch.tensor(17.5, dtype=dtype)

    fused = FUSED_OP(grad, output, target, weight, reduction, -100, total)
    one_hot = _aten.nll_loss_backward(grad, output, target, weight, reduction, -100, total)
    pair = _aten._log_softmax_backward_data(one_hot, output, 1, dtype)

    assert fused.shape == pair.shape and fused.stride() == pair.stride()
    assert torch.equal(_bits(fused), _bits(pair))


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3000, 1])
def test_out_into_the_log_softmax_itself_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, reduction: int, chunk_bytes: int
) -> None:
    """The ``out=`` overload the executor calls to write the logits' gradient into
    the dying log-softmax's buffer: the same bits as the functional op."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    rows, classes = 67, 300
    output = torch.log_softmax(torch.randn(rows, classes) * 3, 1)
    target = torch.randint(0, classes, (rows,))
    target[::5] = -100
    grad = torch.rand(rows) if reduction == 0 else torch.rand(())
    args = (target, torch.rand(classes), reduction, -100, torch.tensor(17.5))
    expected = FUSED_OP(grad, output, *args)
    into = output.clone()
    result = torch.ops.planner.log_softmax_nll_backward.out(grad, into, *args, out=into)
    assert result.data_ptr() == into.data_ptr()
    assert torch.equal(_bits(into), _bits(expected))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        torch.ops.planner.log_softmax_nll_backward.out(grad, output, *args, out=into.t())


def test_fused_op_holds_one_block_of_scratch_not_a_logits_sized_buffer() -> None:
    """The meter sees the result plus one ``CHUNK_BYTES`` block, where the pair
    holds two logits-sized buffers at once."""
    rows, classes = 512, 4096  # 8 MiB of logits
    output = torch.log_softmax(torch.randn(rows, classes), 1)
    target = torch.randint(0, classes, (rows,))
    args = (torch.ones(()), output, target, None, 1, -100, torch.tensor(float(rows)))
    logits_bytes = output.numel() * output.element_size()

    def pair() -> torch.Tensor:
        one_hot = _aten.nll_loss_backward(*args)
        return _aten._log_softmax_backward_data(one_hot, output, 1, output.dtype)

    _, fused_use = measure(lambda: FUSED_OP(*args))
    _, pair_use = measure(pair)
    assert fused_use.peak_allocated_bytes <= logits_bytes + fused_loss.CHUNK_BYTES + 4096
    assert pair_use.peak_allocated_bytes >= 2 * logits_bytes


def _joint(model: nn.Module) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    inputs = _inputs()
    gm = capture(model, inputs, "train").graph_module
    state = [p.detach().clone() for p in model.parameters()]
    # primals (parameters, then the inputs), then the loss's incoming gradient
    real = [*state, *inputs, torch.ones(())]
    assert len(real) == sum(n.op == "placeholder" for n in gm.graph.nodes)
    return gm, real


def _run(gm: torch.fx.GraphModule, real: list[torch.Tensor]) -> list:
    out = torch.fx.Interpreter(gm).run(*real)
    return pytree.tree_leaves(out, is_leaf=lambda x: x is None)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_the_pair_in_a_joint_graph_becomes_one_op_with_the_same_results() -> None:
    gm, real = _joint(_TinyLM())
    before = copy.deepcopy(gm)

    assert fuse_cross_entropy_backward(gm) == 1

    targets = _targets(gm)
    assert targets.count(FUSED_OP) == 1
    assert _aten.nll_loss_backward.default not in targets
    assert _aten._log_softmax_backward_data.default not in targets
    node = next(n for n in gm.graph.nodes if n.target is FUSED_OP)
    assert isinstance(node.meta[FX_VAL], torch.Tensor)  # the IR reads its shape from here
    expected, got = _run(before, real), _run(gm, real)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(_bits(a), _bits(b))


def test_a_one_hot_gradient_read_by_another_op_is_left_alone() -> None:
    """Label smoothing adds a term to the log-softmax's gradient: the zero-filled
    gradient is read by that addition, not by the log-softmax backward."""
    gm, _ = _joint(_TinyLM(label_smoothing=0.1))
    targets = _targets(gm)

    assert fuse_cross_entropy_backward(gm) == 0
    assert _targets(gm) == targets


def test_an_inductor_plan_charges_and_measures_the_fused_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Inductor graph's unplanned peak is lower by about one logits-sized
    buffer, and a plan whose budget lies below the eager graph's own peak fits it by
    the meter, with the loss and gradients of eager."""
    monkeypatch.setattr(segments, "best_seconds", lambda fns, *a, **k: [0.0] * len(fns))
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 128 << 10)  # 16 rows at a time
    inputs = _inputs()
    logits_bytes = TOKENS * VOCAB * 4
    eager_graph = planner.analyze(_TinyLM(), inputs, mode="train", profile="cpu")
    fused_graph = planner.analyze(
        _TinyLM(), inputs, mode="train", profile="cpu", kernels="inductor"
    )
    assert "planner.log_softmax_nll_backward.default" in {
        op.target for op in fused_graph.program.ops
    }
    saved = eager_graph.unplanned_peak_bytes - fused_graph.unplanned_peak_bytes
    # one logits-sized buffer, less the op's block of scratch (and a few bytes of
    # the loss's scalars, which the two graphs hold at slightly different steps)
    assert logits_bytes - fused_loss.CHUNK_BYTES - 4096 <= saved <= logits_bytes

    reference = _TinyLM()
    expected = reference(*inputs)
    expected.backward()
    model = _TinyLM()
    budget = fused_graph.unplanned_peak_bytes  # below what the eager graph holds unplanned
    pm = planner.plan(
        model, budget, inputs, mode="train", profile="cpu", time_limit=5, kernels="inductor"
    )
    try:

        def step() -> torch.Tensor:
            loss = pm(*inputs)
            loss.backward()
            return loss

        loss, measured = measure(step, pm, inputs)
        assert measured.peak_bytes <= budget, f"measured {measured.peak_bytes} > budget {budget}"
        # the fused op ran inside a compiled run: traced back into the pair there
        assert any(
            s.kernel == "inductor" and FUSED_OP in _targets(s.graph) for s in pm.executor.segments
        )
        torch.testing.assert_close(loss.detach(), expected.detach())
        for (key, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=key)
    finally:
        pm.close()
