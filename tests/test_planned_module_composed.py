"""Planned modules beside other threads' planning, inside other models, and scripted."""

from __future__ import annotations

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
