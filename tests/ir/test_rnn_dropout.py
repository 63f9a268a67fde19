"""A multi-layer RNN's dropout between layers survives its decomposition."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._decomp import decompositions

import planner
from planner.ir.rnn_dropout import rnn_dropout_kept

RNNS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


class _Stacked(torch.nn.Module):
    def __init__(self, kind: str, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = RNNS[kind](
            8, 16, num_layers=3, batch_first=True, dropout=0.5, bidirectional=bidirectional
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].pow(2).mean()


@pytest.mark.parametrize("kind", sorted(RNNS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_planned_rnn_draws_its_dropout_between_layers_as_eager(
    kind: str, bidirectional: bool
) -> None:
    torch.manual_seed(0)
    model = _Stacked(kind, bidirectional)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 5, 8)
    try:
        pm = planner.plan(model, "50%", (x,), mode="train", time_limit=5)
    except planner.BudgetTooSmall as e:
        pm = planner.plan(model, e.min_budget, (x,), mode="train", time_limit=5)
    try:
        torch.manual_seed(1)
        loss = pm(x)
        loss.backward()
        torch.manual_seed(1)
        eager_loss = eager(x)
        eager_loss.backward()
        with torch.no_grad():
            eager.rnn.dropout = 0.0
            torch.manual_seed(1)
            undropped = eager(x)
        assert not torch.allclose(undropped, eager_loss)  # the dropout matters here
        # eager runs oneDNN's (or ATen's) fused layers, the trace their decomposition:
        # ~1e-9 apart without dropout too
        torch.testing.assert_close(loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    finally:
        pm.close()


def test_torchs_helper_is_put_back_after_tracing() -> None:
    original = decompositions._rnn_helper
    with rnn_dropout_kept():
        pass
    assert decompositions._rnn_helper is original
    with pytest.raises(RuntimeError), rnn_dropout_kept():
        raise RuntimeError("a trace that fails")
    assert decompositions._rnn_helper is original
