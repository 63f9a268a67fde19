"""planner/ir/metadata_args.py: ``type_as``, ``view_as``, ``expand_as`` and
``reshape_as`` read their second tensor only for its metadata, and the captured
graph says so; a view op that does read a second tensor is a use of it.

Seen on Gemma's RMSNorm (``(x * w).type_as(residual)``) in inference: a plan freed
the residual before the view was made, and making the view failed ("add_18 is not
resident"). Whether a plan did so varied from plan to plan (the op timings the
solver reads are measured), so these tests check the two properties that rule it
out on the captured program rather than one plan's outcome."""

from __future__ import annotations

import sys

import torch
from torch import nn

import planner
from planner.ir.build import build_program
from planner.ir.capture import capture


class _RMSNormLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(16, 16)
        self.lin2 = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x + self.lin1(x)
        y = self.lin2(residual) * self.w
        z = y.type_as(residual).view_as(residual).expand_as(residual)
        return z.reshape_as(residual) + 1


_AS_OPS = {"aten.type_as.default", "aten.view_as.default", "aten.expand_as.default"}


def test_metadata_only_arguments_become_constants() -> None:
    """Inference graphs (torch.export keeps these ops whole; AOTAutograd's joint
    graph already decomposes them)."""
    torch.manual_seed(0)
    model, x = _RMSNormLike(), torch.randn(4, 16)
    captured = capture(model, (x,), "infer")
    program = build_program(captured)
    targets = {op.target for op in program.ops}
    assert not targets & (_AS_OPS | {"aten.reshape_as.default"})
    assert {"aten.to.dtype_layout", "aten.expand.default"} <= targets
    nodes = captured.graph_module.graph.nodes
    (to,) = [n for n in nodes if n.target is torch.ops.aten.to.dtype_layout]
    # type_as is self.to(other.options()): the device goes with the dtype
    assert to.kwargs == {"dtype": torch.float32, "layout": torch.strided, "device": x.device}
    for op in program.ops:  # the rewritten views read one storage each: their base
        if op.target in ("aten.to.dtype_layout", "aten.view.default", "aten.expand.default"):
            assert program.makes_only_views(op) and len(op.inputs) == 1


def test_a_view_op_that_reads_another_tensor_is_a_use_of_it(monkeypatch) -> None:
    """Without the rewrite, ``type_as`` stays whole: it makes a view of ``y`` and
    reads ``residual``, so it is not a view step (``Program.makes_only_views``),
    and the plan keeps ``residual`` until it runs."""
    monkeypatch.setattr(sys.modules["planner.ir.capture"], "explicit_metadata_args", lambda gm: 0)
    program = build_program(capture(_RMSNormLike(), (torch.randn(4, 16),), "infer"))
    kept_whole = [op for op in program.ops if op.target in _AS_OPS]
    assert kept_whole
    for op in kept_whole:
        assert all(program.values[v].is_view for v in op.outputs)
        assert not program.makes_only_views(op)


def test_rewritten_graph_plans_and_matches_eager() -> None:
    torch.manual_seed(0)
    model, x = _RMSNormLike(), torch.randn(4, 16)
    expected = model(x).detach()
    pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu", time_limit=5)
    assert torch.equal(pm(x), expected)
