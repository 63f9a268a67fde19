"""Saved plans: reused without solving, refused for another graph or budget."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example, toy

import planner


def test_saved_plan_is_reused_and_checked(tmp_path, monkeypatch) -> None:
    model, inputs = load_example("mlp")
    with torch.no_grad():
        expected = model(*inputs)
    first = planner.plan(model, "60%", inputs, profile="cpu", time_limit=5)
    path = first.plan.save(tmp_path / "plan.json")
    budget = first.plan.budget_bytes
    first.close()

    import planner.api as api

    def no_solving(*args, **kwargs):
        raise AssertionError("a reused plan must not be solved again")

    monkeypatch.setattr(api, "solve", no_solving)
    model, inputs = load_example("mlp")
    again = planner.plan(model, budget, inputs, profile="cpu", plan=path)
    try:
        assert again.plan.actions == planner.Plan.load(path).actions
        assert torch.equal(again(*inputs), expected)
    finally:
        again.close()

    model, inputs = load_example("mlp")
    with pytest.raises(planner.PlannerError, match="made for a budget"):
        planner.plan(model, budget + 4096, inputs, profile="cpu", plan=path)
    other, other_inputs = toy("chain", 2)
    with pytest.raises(planner.PlannerError, match="different graph"):
        planner.plan(other, budget, other_inputs, profile="cpu", plan=path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(planner.PlannerError, match="cannot load plan"):
        planner.plan(model, budget, inputs, profile="cpu", plan=tmp_path / "bad.json")


def test_same_inputs_give_the_same_plan() -> None:
    plans = []
    for _ in range(2):
        model, inputs = load_example("unet")
        _, plan = planner.make_plan(model, "70%", inputs, mode="train", profile="cpu", time_limit=5)
        plans.append(plan)
    assert plans[0].actions == plans[1].actions
    assert [t.decision for t in plans[0].tensors] == [t.decision for t in plans[1].tensors]
