"""Ops run with grad mode on where their backward reads what they make only then
(planner.ir.grad_mode_ops)."""

from __future__ import annotations

import pytest
import torch

from planner.ir import capture
from planner.ir.grad_mode_ops import as_run, needs_grad_mode, with_grad_mode

aten = torch.ops.aten

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN's LSTM path"
)


class _Lstm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return out.pow(2).mean() if self.training else out


def _nodes(mode: str) -> list[torch.fx.Node]:
    model = _Lstm().train(mode == "train")
    return list(capture(model, (torch.randn(2, 4, 8),), mode).graph_module.graph.nodes)


def test_only_a_forward_whose_workspace_the_graph_reads_runs_with_grad_mode() -> None:
    (train,) = [n for n in _nodes("train") if n.target == aten.mkldnn_rnn_layer.default]
    assert needs_grad_mode(train) and as_run(train) is with_grad_mode(train.target)
    # the backward reads it; an inference graph runs every op as traced
    assert not any(needs_grad_mode(n) for n in _nodes("infer"))


def test_with_grad_mode_makes_the_workspace_and_records_no_history() -> None:
    weights = [torch.randn(32, 8, requires_grad=True), torch.randn(32, 8), torch.zeros(32),
               torch.zeros(32)]  # fmt: skip
    args = (torch.randn(4, 2, 8), *weights, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), False,
            [], 2, 8, 1, True, False, False, False)  # fmt: skip
    with torch.no_grad():
        assert aten.mkldnn_rnn_layer.default(*args)[3] is None  # how the executor ran it
        out = with_grad_mode(aten.mkldnn_rnn_layer.default)(*args)
    assert out[3] is not None and out[3].numel() > 0
    assert all(t.grad_fn is None and not t.requires_grad for t in out)
    with torch.no_grad():
        with_grad_mode(aten.mkldnn_rnn_layer.default)(*args)
        assert not torch.is_grad_enabled()  # given back as it was
