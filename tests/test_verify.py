"""planner.verify: a compiled plan is checked by the meter before plan() returns
it; the check leaves the model as it found it, and a plan over its budget is
replaced (training, measured room) or refused with the model whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CachedLayer, WithLoss, load_example
from torch import nn

import planner
import planner.api as api
from planner.codegen import segments
from planner.runtime.meter import Measurement
from planner.verify import metered_call


@pytest.fixture(autouse=True)
def compiled_runs_never_lose_on_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which form of a run is faster is not these tests' to decide (see
    tests/test_plan_inductor.py): keep the compiled forms."""
    monkeypatch.setattr(segments, "best_seconds", lambda fns, *a, **k: [0.0] * len(fns))


class NormDrop(nn.Module):
    """BatchNorm statistics and dropout draws: what one call changes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.norm = nn.BatchNorm1d(256)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.norm(self.a(x))))).pow(2).mean()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_the_metered_call_leaves_no_trace(mode: str) -> None:
    torch.manual_seed(0)
    model, x = NormDrop(), torch.randn(32, 64)
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu", time_limit=5)
    try:
        stats = [pm.state_tensor(n).clone() for n in pm.buffer_updates]
        assert stats  # running mean, var and the batch count
        if mode == "train":
            pm(x).backward()  # a .grad the check must keep
        grads = [None if p.grad is None else p.grad.clone() for p in pm.parameters()]
        stats = [pm.state_tensor(n).clone() for n in pm.buffer_updates]
        rng = torch.get_rng_state()
        measured = metered_call(pm, (x,), {})
        assert measured.peak_bytes > 0
        assert torch.equal(torch.get_rng_state(), rng)
        for name, before in zip(pm.buffer_updates, stats):
            assert torch.equal(pm.state_tensor(name), before), name
        for p, before in zip(pm.parameters(), grads):
            assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    finally:
        pm.close()


def test_a_compiled_plan_comes_back_measured_within_its_budget() -> None:
    torch.manual_seed(0)
    model, inputs = load_example("mlp")
    model = WithLoss(model)
    pm = planner.plan(
        model, "60%", inputs, mode="train", profile="cpu", time_limit=5,
        kernels="inductor", measure_room=False,
    )  # fmt: skip
    try:
        assert pm.measured is not None
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        assert "measured peak:" in str(pm.report)
    finally:
        pm.close()


def _over(budget_of_plan: object) -> Measurement:
    budget = budget_of_plan.plan.budget_bytes  # type: ignore[attr-defined]
    return Measurement(budget + 1000, 0, budget + 1000, 0.0)


def test_training_falls_back_to_the_plan_for_the_budget_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured room chose a plan (here: a copy of the budget's own) that the meter
    finds over the budget: plan() builds the budget's plan instead and checks it."""
    real = api.checked_peak
    room_plans = []

    def room(analysis, problem, solved, device, time_limit):  # type: ignore[no-untyped-def]
        room_plans.append(dataclasses.replace(solved))
        return room_plans[-1], None

    def checked(pm, args, kwargs):  # type: ignore[no-untyped-def]
        return _over(pm) if pm.plan is room_plans[0] else real(pm, args, kwargs)

    monkeypatch.setattr(api, "plan_by_measured_room", room)
    monkeypatch.setattr(api, "checked_peak", checked)
    torch.manual_seed(0)
    model, inputs = load_example("mlp")
    model = WithLoss(model)
    pm = planner.plan(model, "60%", inputs, mode="train", profile="cpu", time_limit=5,
                      kernels="inductor")  # fmt: skip
    try:
        assert pm.plan is not room_plans[0]
        assert pm.measured is not None and pm.measured.peak_bytes <= pm.plan.budget_bytes
        pm(*inputs).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        pm.close()


def test_a_refused_plan_leaves_the_model_whole_and_no_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setattr(api, "checked_peak", lambda pm, args, kwargs: _over(pm))
    torch.manual_seed(0)
    model, inputs = load_example("mlp")
    with torch.no_grad():
        expected = model(*inputs)
    with pytest.raises(planner.PlannerError, match="over the budget.*kernels='eager'"):
        planner.plan(model, "50%", inputs, profile="cpu", time_limit=5, kernels="inductor",
                     measure_room=False, offload_dir=str(tmp_path))  # fmt: skip
    assert not any(p.is_meta for p in model.parameters())  # nothing was released
    with torch.no_grad():
        assert torch.equal(model(*inputs), expected)
    assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]


def test_the_metered_call_leaves_a_cache_kept_on_disk_as_it_was() -> None:
    """The check's call writes the example's token into the cache; restored through
    ``state_tensor``, whose tensor is a copy for a cache the plan keeps on disk, the
    write stayed there (a compiled plan's cache held the example's token at
    position 0 once planned)."""
    from planner.verify import metered_call

    torch.manual_seed(0)
    model = CachedLayer(positions=4096).eval()
    inputs = (torch.randn(1, 32), torch.tensor([7]))
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, inputs, profile="cpu")
    pm = planner.plan(model, smallest.value.min_budget, inputs, profile="cpu")
    try:
        assert [t.home for t in pm.plan.tensors if t.name == "cache"] == ["disk"]
        metered_call(pm, inputs, {})
        assert not pm.state_tensor("cache").any()
        with torch.no_grad():
            pm(*inputs)
        assert pm.state_tensor("cache")[7].any()  # a call does write it
    finally:
        pm.close()


def test_a_measured_training_step_leaves_no_trace() -> None:
    """``pm.run_measured_step(x)`` added its all-ones step's gradients to ``.grad``
    and updated BatchNorm's statistics: a training loop's next optimizer step took
    the measurement's gradients as its own."""
    torch.manual_seed(0)
    model, x = NormDrop(), torch.randn(32, 64)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=5)
    try:
        pm(x).backward()
        grads = [p.grad.clone() for p in pm.parameters()]
        stats = [pm.state_tensor(n).clone() for n in pm.buffer_updates]
        rng = torch.get_rng_state()
        pm.run_measured_step(x)
        assert pm.measured is not None and pm.measured.peak_bytes > 0
        assert torch.equal(torch.get_rng_state(), rng)
        for p, before in zip(pm.parameters(), grads, strict=True):
            assert torch.equal(p.grad, before)
        for name, before in zip(pm.buffer_updates, stats, strict=True):
            assert torch.equal(pm.state_tensor(name), before), name
    finally:
        pm.close()


def test_a_training_step_measured_under_no_grad_is_a_step() -> None:
    """Under ``torch.no_grad()`` the measured step ran the forward alone (no output
    required grad) and reported its peak as the step's."""
    torch.manual_seed(0)
    model, x = NormDrop(), torch.randn(32, 64)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=5)
    try:
        pm.run_measured_step(x)
        assert pm.measured is not None
        step = pm.measured.peak_bytes
        with torch.no_grad():
            pm.run_measured_step(x)
        assert pm.measured.peak_bytes == step
    finally:
        pm.close()
