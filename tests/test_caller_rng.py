"""Planning leaves the global random number generator as it found it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_plan_and_analyze_leave_the_global_generator_as_they_found_it(mode: str) -> None:
    model = _model() if mode == "train" else _model().eval()
    x = torch.randn(8, 16)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    planner.analyze(model, (x,), mode=mode, profile="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    planner.plan(model, "100%", example_inputs=(x,), mode=mode, profile="cpu", time_limit=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_seed_plan_step_draws_the_dropout_of_seed_step() -> None:
    """A training loop seeded before planning draws eager's dropout masks: before,
    planning had drawn from the generator (made-up inputs, profiled dropout) and
    the first step's loss differed from eager's."""
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 16)
    torch.manual_seed(2)
    pm = planner.plan(model, "100%", example_inputs=(x,), mode="train", time_limit=2)
    planned = pm(x).pow(2).mean()
    torch.manual_seed(2)
    eager = reference(x).pow(2).mean()
    assert torch.equal(planned, eager)
