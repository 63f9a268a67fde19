"""Inputs for running one traced op alone (planner.passes.made_up_inputs)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from planner.passes.made_up_inputs import MadeUpInputs, signature


def _graph() -> torch.fx.GraphModule:
    """Two calls of one signature (``sin``), each read by a ``sum``; the tests
    hand ``ran`` a real output larger than traced, as ``nn.LSTM``'s oneDNN
    forward returns its workspace (traced as 0 bytes)."""

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aten.sin(a).sum(), torch.ops.aten.sin(b).sum()

    return make_fx(f, tracing_mode="fake")(torch.randn(4), torch.randn(4))


def test_a_reader_gets_the_real_output_its_producer_sized_beyond_the_trace() -> None:
    gm = _graph()
    sins = [n for n in gm.graph.nodes if n.target == torch.ops.aten.sin.default]
    sums = [n for n in gm.graph.nodes if n.target == torch.ops.aten.sum.default]
    assert signature(sins[0]) == signature(sins[1])
    made_up = MadeUpInputs()
    (a,), _ = made_up.inputs(sins[0], "cpu")
    assert a.shape == (4,)
    larger = torch.randn(64)  # what a kernel sizing its output at run time returns
    assert made_up.ran(sins[0], larger) == [(larger.data_ptr(), 256)]
    # the second call's reader gets it too: one run stands for its signature
    (given,), _ = made_up.inputs(sums[1], "cpu")
    assert given is larger
    # passed on through a detach, it is the same buffer
    detached = gm.graph.call_function(torch.ops.aten.detach.default, (sins[1],))
    reader = gm.graph.call_function(torch.ops.aten.sum.default, (detached,))
    (through,), _ = made_up.inputs(reader, "cpu")
    assert through is larger
    # an output as traced is not kept: its reader gets a made-up tensor
    fresh = MadeUpInputs()
    out = torch.randn(4)
    fresh.ran(sins[0], out)
    (made,), _ = fresh.inputs(sums[0], "cpu")
    assert made is not out and made.shape == (4,)


def test_each_output_is_reported_with_its_buffer() -> None:
    """Outputs in one buffer share its address, so the workspace pass counts the
    buffer once per planned storage (``_grow_to_allocated``)."""

    def f(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aten.var_mean(a, [0])

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 3))
    (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.var_mean.correction]
    base = torch.randn(6)
    shared = MadeUpInputs().ran(node, (base[:3], base[3:]))
    assert shared == [(base.data_ptr(), 24)] * 2
    a, b = torch.randn(3), torch.randn(3)
    assert MadeUpInputs().ran(node, (a, b)) == [(a.data_ptr(), 12), (b.data_ptr(), 12)]
