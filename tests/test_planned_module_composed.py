"""Planned modules beside other threads' planning, inside other models, and scripted."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

import planner
from planner.errors import CaptureError, PlannerError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))


def test_a_call_in_another_thread_while_planning_is_not_refused() -> None:
    """torch.compiler.is_exporting() is one flag for the process, and the flop
    count registered torch.nn's global module hooks: a call made while another
    thread planned was refused as "traced or exported", then as "hooks registered
    since planning", or failed in torch.compiler.disable's wrapper (KeyError:
    'custom', its FX annotation of the other thread's trace)."""
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    pm = planner.plan(_mlp(), "100%", (x,), profile="cpu", time_limit=3)
    stop, errors, calls = threading.Event(), [], [0]

    def caller() -> None:
        with torch.no_grad():
            while not stop.is_set():
                try:
                    pm(x)
                    calls[0] += 1
                except (PlannerError, KeyError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        for _ in range(3):
            planner.plan(_mlp(), "100%", (x,), profile="cpu", time_limit=3)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors[0]
    assert calls[0] > 0


def test_planning_registers_no_global_module_hooks() -> None:
    """FlopCounterMode's module tracker did, for the whole process, while counting."""
    seen = []

    class Watch(dict):
        def __setitem__(self, key, value) -> None:  # type: ignore[no-untyped-def]
            seen.append(key)
            super().__setitem__(key, value)

    saved = nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks
    nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks = Watch(), Watch()
    try:
        planner.analyze(_mlp(), (torch.randn(8, 32),))
    finally:
        nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks = saved
    assert not seen


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_planning_a_model_holding_a_planned_module_is_a_clear_error(mode: str) -> None:
    """A training plan's held parameter names made torch.export fail with a bare
    "PlannedModule has no attribute `0`"."""
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    inner = planner.plan(
        _mlp(),
        "100%",
        (x.clone().requires_grad_(mode == "train"),),
        mode=mode,
        profile="cpu",
        time_limit=3,
    )
    outer = nn.Sequential(nn.Linear(32, 32), inner)
    with pytest.raises(CaptureError, match=r"'1' is a planned module.*original module"):
        planner.plan(outer, "100%", (x,), mode=mode, profile="cpu", time_limit=3)


def test_scripting_a_planned_module_is_a_clear_error() -> None:
    """It failed in TorchScript's frontend on forward's *args."""
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    pm = planner.plan(_mlp(), "100%", (x,), profile="cpu", time_limit=3)
    with pytest.raises(PlannerError, match=r"cannot be scripted"):
        torch.jit.script(pm)


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 4)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).square().mean()


@pytest.mark.parametrize("budget", ["100%", "min"])
def test_a_parameter_the_graph_never_uses_gets_no_accumulation_as_in_eager(budget: str) -> None:
    """As an input of the step node, a parameter the forward never uses had its
    gradient accumulator run with no gradient, where eager never reaches it: its
    post-accumulate-grad hooks fired, and DDP's reducer (which hooks the same
    node) counted it used, so DDP(find_unused_parameters=False) gave it a zero
    gradient (decayed by AdamW) where eager DDP raises that it was unused."""
    torch.manual_seed(0)
    model, x = _WithUnusedLayer(), torch.randn(8, 16)
    if budget == "min":
        try:
            planner.plan(
                copy.deepcopy(model), "1%", (x,), mode="train", profile="cpu", time_limit=3
            )
        except planner.BudgetTooSmall as e:
            budget = e.min_budget
    eager = copy.deepcopy(model)
    pm = planner.plan(model, budget, (x,), mode="train", profile="cpu", time_limit=3)
    fired: dict[str, list[str]] = {"eager": [], "planned": []}
    for key, m in (("eager", eager), ("planned", model)):
        for name, p in m.named_parameters():
            p.register_post_accumulate_grad_hook(lambda _, n=name, k=key: fired[k].append(n))
    eager(x).backward()
    pm(x).backward()
    assert sorted(fired["planned"]) == sorted(fired["eager"]) == ["body.bias", "body.weight"]
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
    pm.close()


def test_a_step_with_an_unused_parameter_keeps_the_unfrozen_checks_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step passes a never-used parameter detached, so autograd says it needs no
    gradient: recorded as wanting one when planned, each step went the slow way of
    ``check_not_unfrozen`` (a Python pass over every parameter, 12 us for 400)
    where a steady loop is promised one tuple comparison."""
    import planner.planned_module as planned_module

    torch.manual_seed(0)
    model, x = _WithUnusedLayer(), torch.randn(8, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=3)
    compared: list[bool] = []
    check = planned_module.check_not_unfrozen

    def spy(names, planned, needs):
        compared.append(planned == needs)
        return check(names, planned, needs)

    monkeypatch.setattr(planned_module, "check_not_unfrozen", spy)
    pm(x).backward()
    assert compared == [True]
    assert model.unused.weight.grad is None and model.body.weight.grad is not None
    pm.close()
