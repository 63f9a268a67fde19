"""planner/ir/conv_layout.py: convolutions take channels-last inputs in the graphs
that compiled plans run, the graph's outputs keep their traced layouts, and the
rewrite is dropped where a kernel would disagree with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from planner.ir import conv_layout
from planner.ir.capture import capture
from planner.ir.conv_layout import CONV_INPUTS, channels_last_convolutions
from planner.ir.meta import FX_VAL


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h)) + 1
        return self.head(h.mean((2, 3))).pow(2).mean()


def _captured() -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    model, x = _ConvNet(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), "train").graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = [*model.parameters(), *model.buffers()]
    # primals (parameters, buffers, the input), then the loss's incoming gradient
    real = [t.detach().clone() for t in state] + [x, torch.ones(())]
    assert len(real) == len(placeholders)
    return gm, real


def _conv_inputs(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    return [n.args[i].meta[FX_VAL] for n in gm.graph.nodes for i in CONV_INPUTS.get(n.target, ())]


def _outputs(gm: torch.fx.GraphModule) -> list:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(output.args, is_leaf=lambda x: x is None)


def _run(gm: torch.fx.GraphModule, real: list[torch.Tensor]) -> list:
    out = torch.fx.Interpreter(gm).run(*real)
    return pytree.tree_leaves(out, is_leaf=lambda x: x is None)


def test_every_convolution_takes_channels_last_and_outputs_keep_their_layout() -> None:
    gm, real = _captured()
    before = [t.stride() for t in _conv_inputs(gm)]
    assert any(len(s) == 4 for s in before)
    new = channels_last_convolutions(gm)
    assert new is not gm
    inputs = _conv_inputs(new)
    assert len(inputs) == len(before) == 8  # 2 forward and 2 backward convolutions
    for t in inputs:
        assert t.is_contiguous(memory_format=torch.channels_last), t.stride()
    # the original graph is left alone
    assert [t.stride() for t in _conv_inputs(gm)] == before
    expected = _run(gm, real)
    got = _run(new, real)
    assert len(expected) == len(got) == len(_outputs(gm))
    for node, a, b in zip(_outputs(gm), expected, got):
        if a is None:
            assert b is None
            continue
        assert b.stride() == a.stride() == node.meta[FX_VAL].stride(), node
        torch.testing.assert_close(b, a)


def test_a_graph_without_convolutions_is_returned_as_is() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    gm = capture(model, (torch.randn(3, 4),), "infer").graph_module
    assert channels_last_convolutions(gm) is gm


def test_the_rewrite_is_dropped_if_a_kernel_returns_other_strides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gm, _ = _captured()
    monkeypatch.setattr(conv_layout, "_same_layouts", lambda real, fake: False)
    assert channels_last_convolutions(gm) is gm


def test_nothing_changes_where_inductor_would_not_use_channels_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._inductor import config

    gm, _ = _captured()
    monkeypatch.setattr(config, "layout_optimization", False)
    assert channels_last_convolutions(gm) is gm


def test_an_exported_inference_graph_keeps_conv2d_whole_and_is_rewritten_too() -> None:
    model, x = _ConvNet(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), "infer").graph_module
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 2  # not decomposed into aten.convolution
    new = channels_last_convolutions(gm)
    inputs = _conv_inputs(new)
    assert len(inputs) == 4
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in inputs)
    # BatchNorm's updated statistics, then the loss: all keep their traced layout
    for ours, traced in zip(_outputs(new), _outputs(gm)):
        assert ours.meta[FX_VAL].stride() == traced.meta[FX_VAL].stride()


def test_after_its_rounds_the_rewrite_copies_every_input_left_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each round propagates layouts through the whole graph: their number is
    bounded, and the last converts what is left in one go."""
    gm, real = _captured()
    monkeypatch.setattr(conv_layout, "MAX_ROUNDS", 1)
    new = channels_last_convolutions(gm)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in _conv_inputs(new))
    for a, b in zip(_run(gm, real), _run(new, real)):
        if a is not None:
            torch.testing.assert_close(b, a)


def test_the_rewrite_is_dropped_if_a_changed_op_cannot_be_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An op that fails on random inputs leaves its layout unchecked: planning
    goes on with the traced graph instead of failing."""
    gm, _ = _captured()

    def fail(node: torch.fx.Node, device: str) -> None:
        raise RuntimeError("needs real data")

    monkeypatch.setattr(conv_layout, "random_inputs", fail)
    assert channels_last_convolutions(gm) is gm


class _FlattenedByView(nn.Module):
    """A convolution whose output is flattened by ``view``, as traced on NCHW
    strides (Swin reshapes its attention output so after its patch embedding's
    convolution): on channels-last strides that view is impossible."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_the_rewrite_is_dropped_where_a_view_cannot_take_channels_last(mode: str) -> None:
    model, x = _FlattenedByView(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), mode).graph_module
    assert conv_layout._wants_channels_last(gm)
    assert channels_last_convolutions(gm) is gm  # dropped, not raised
