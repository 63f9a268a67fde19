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
    assert made_up.ran(sins[0], larger) == [256]
    # the second call's reader gets it too: one run stands for its signature
    (given,), _ = made_up.inputs(sums[1], "cpu")
    assert given is larger
    # an output as traced is not kept: its reader gets a made-up tensor
    fresh = MadeUpInputs()
    out = torch.randn(4)
    fresh.ran(sins[0], out)
    (made,), _ = fresh.inputs(sums[0], "cpu")
    assert made is not out and made.shape == (4,)


def test_outputs_in_one_storage_count_their_bytes_once() -> None:
    def f(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aten.var_mean(a, [0])

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 3))
    (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.var_mean.correction]
    base = torch.randn(6)
    assert MadeUpInputs().ran(node, (base[:3], base[3:])) == [24, 0]
    assert MadeUpInputs().ran(node, (torch.randn(3), torch.randn(3))) == [12, 12]
