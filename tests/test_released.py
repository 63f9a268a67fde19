"""planner/released.py: the weights an inference plan takes out of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError


def test_the_model_after_an_inference_plan_raises_instead_of_reading_garbage() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(128, 256)
    with torch.no_grad():
        expected = model(x)
    pm = planner.plan(model, "80%", (x,), mode="infer", profile="cpu")
    released = [n for n, p in model.named_parameters() if p.is_meta]
    assert released, "nothing released: the test proves nothing"
    # before: a meta weight, which torch's CPU linear read as uninitialized memory
    with pytest.raises(PlannerError, match=rf"'{released[0]}' of the Sequential was moved"):
        with torch.no_grad():
            model(x)
    with pytest.raises(PlannerError, match="plan a copy of the model"):
        copy.deepcopy(model)
    with pytest.raises(PlannerError, match=rf"'{released[0]}' of the Sequential"):
        torch.cat([dict(model.named_parameters())[released[0]]] * 2)  # was: StopIteration
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sum(p.numel() for p in model.parameters()) == 256 * 512 * 2 + 512 + 256
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
