"""A compiled plan's peak, checked by the meter before ``plan()`` returns it.

Why: with ``kernels="inductor"`` a plan's peak is composed from each compiled run's
measured allocations and the replay of the steps between runs
(``planner/codegen/assemble.py``), not predicted op by op. On the CPU the
composition has equalled the meter; on an H200 one GPT-2 training plan measured
1.48 MB over its budget (``BENCHMARKS_training_cuda.md``), cause unknown. A promise
of a hard budget cannot rest on a composition that once missed, so a compiled plan
runs one call (in training, one forward and backward) on the example inputs under
the independent meter, and a plan over its budget is not handed out.

The call leaves no trace: the buffers it updates (BatchNorm statistics), the
parameters' ``.grad`` and the random number generators are put back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from planner.runtime.meter import Measurement

if TYPE_CHECKING:
    from planner.planned_module import PlannedModule


@contextlib.contextmanager
def untouched(pm: PlannedModule) -> Iterator[None]:
    """Run the block, then restore what one call or step of ``pm`` changes."""
    saved = [pm.state_tensor(name).detach().to("cpu", copy=True) for name in pm.buffer_updates]
    grads = [(p, p.grad) for p in pm.parameters()]
    for p, _ in grads:
        p.grad = None
    devices = [pm.device] if pm.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, old in zip(pm.buffer_updates, saved):
                pm.restore_state_tensor(name, old)
        for p, grad in grads:
            p.grad = grad


def metered_call(pm: PlannedModule, args: tuple, kwargs: dict[str, Any]) -> Measurement:
    """One call of ``pm`` under the meter (``run_measured``; training:
    ``run_measured_step``, forward and backward), its effects undone."""
    with untouched(pm):
        if pm.mode == "train":
            pm.run_measured_step(*args, **kwargs)
        else:
            pm.run_measured(*args, **kwargs)
    assert pm.measured is not None
    return pm.measured


def checked_peak(pm: PlannedModule, args: tuple, kwargs: dict[str, Any]) -> Measurement:
    """The metered call's measurement. Over the budget the call is made once more
    and that one decides: a first call may allocate what stays for good (a
    library's workspace), which is no plan's doing."""
    measured = metered_call(pm, args, kwargs)
    if measured.peak_bytes > pm.plan.budget_bytes:
        measured = metered_call(pm, args, kwargs)
    return measured
