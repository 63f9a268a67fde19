"""Autocast and the traced graph.

The trace fixes each op's dtype as autocast chose it when planning: an op the model
runs under ``autocast(enabled=False)`` (HF models keep norms and rotary embeddings
in float32 this way) stays float32, with explicit casts around it. So what runs the
traced ops (the executor, and planning's op timings and compiled runs) runs them
with autocast off, where autocast would cast them again (measured: a float32
matmul the model keeps out of autocast ran in bfloat16, the output 3e-3 away from
eager's); and a plan called under another autocast state than it was traced in
would compute other dtypes than eager, which is an error that says to plan inside
the same context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from planner.errors import PlannerError

AutocastState = tuple[tuple[str, torch.dtype | None], ...]
#: the device types whose autocast a plan records and turns off while it runs
AUTOCAST_KINDS = ("cpu", "cuda")


def autocast_state(device_types: Sequence[str] = AUTOCAST_KINDS) -> AutocastState:
    """Per device type, the autocast dtype in force (None: autocast off)."""
    return tuple(
        (kind, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)
        for kind in device_types
    )


def _describe(state: AutocastState) -> str:
    on = [f"torch.autocast({kind!r}, dtype={dtype})" for kind, dtype in state if dtype]
    return " and ".join(on) if on else "no autocast"


#: the state with autocast off for every kind a plan records
_ALL_OFF: AutocastState = tuple((kind, None) for kind in AUTOCAST_KINDS)


def any_autocast_enabled(device_types: Sequence[str] = AUTOCAST_KINDS) -> bool:
    """Whether autocast is on for any of ``device_types`` (every planned call asks)."""
    for kind in device_types:
        if torch.is_autocast_enabled(kind):
            return True
    return False


def check_autocast(planned: AutocastState) -> None:
    if planned == _ALL_OFF and not any_autocast_enabled():
        return  # planned and called without autocast: the common case, checked cheaply
    now = autocast_state([kind for kind, _ in planned])
    if now != planned:
        raise PlannerError(
            f"this module was planned under {_describe(planned)} and is called under "
            f"{_describe(now)}: the traced graph fixed each op's dtype when planned, so it "
            f"would not compute what the model computes here. Plan inside the autocast "
            f"context you call it in (with torch.autocast(...): planner.plan(...)), or "
            f"call it as planned"
        )


def check_backward_autocast(planned: AutocastState, device_type: str) -> None:
    """Called from a planned backward: a step planned and called without autocast
    whose backward runs under one (``out = pm(x)``, then ``loss.backward()`` inside
    ``torch.autocast``). Eager autograd runs the backward's ops under the autocast
    in force then (its matmuls in bfloat16: gradients 3e-6 from the float32 ones on
    a small MLP), where the planned backward runs them as traced, in float32, so
    its gradients silently differed from eager's. A step planned under autocast
    is not concerned: eager's backward of autocast's ops is the same either way.
    Only the autocast of the plan's ``device_type`` counts: another device's
    (``torch.autocast("cuda")`` over a CPU plan's backward) leaves eager's
    backward ops as they were."""
    if planned != _ALL_OFF or device_type not in AUTOCAST_KINDS:
        return
    if not torch.is_autocast_enabled(device_type):
        return
    raise PlannerError(
        f"backward() through a planned step runs under "
        f"{_describe(autocast_state())}, and its forward ran without autocast: eager "
        f"autograd would run the backward's ops under that autocast, the planned "
        f"backward runs them as traced (float32), so the gradients would differ. Call "
        f"backward() outside the autocast context (as PyTorch recommends), or plan and "
        f"call the module inside it"
    )


@contextlib.contextmanager
def autocast_off(device_types: Sequence[str] = AUTOCAST_KINDS) -> Iterator[None]:
    """Run traced ops with autocast off: they already carry the dtypes the trace
    chose; under autocast eager ones would be cast again (a float32 op the model
    keeps out of autocast would run in bfloat16). For the executor, and for what
    planning runs after the trace (op timings, compiling runs)."""
    enabled = [kind for kind in device_types if torch.is_autocast_enabled(kind)]
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        for kind in enabled:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield
