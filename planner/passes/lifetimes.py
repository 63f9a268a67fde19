"""Lifetimes: the step interval during which each storage is resident when the
program runs unplanned (each value freed right after its last reader).

Requires: a built Program. Ensures: ``Storage.live`` is set for every storage.

Rules, matching eager PyTorch:
- parameters, buffers and user inputs are held by the module or the caller for
  the whole run;
- a tangent (incoming output gradient) exists from the first backward step, as
  the user's loss creates it after the forward;
- an op's output lives from its producing step to the last step that reads it or
  any of its views; outputs of the program live to the end (they are returned);
- an output nobody reads (an unused element of a multi-output op) is still
  allocated at its producing step.
"""

from __future__ import annotations

from planner.ir.program import RESIDENT_KINDS, Program, ValueKind


def annotate_lifetimes(program: Program) -> None:
    last_step = max(program.num_steps - 1, 0)
    returned = {program.values[v].storage for v in program.outputs}
    backward_start = min(program.backward_start(), last_step)
    for storage in program.storages:
        base = program.values[storage.base]
        if base.kind in RESIDENT_KINDS:
            storage.live = (0, last_step)
            continue
        last_use = max((u for vi in storage.values for u in program.values[vi].uses), default=-1)
        if base.kind is ValueKind.TANGENT:
            start = backward_start
        elif base.producer is not None:
            start = base.producer
        else:
            start = 0
        end = last_step if storage.index in returned else max(last_use, start)
        storage.live = (start, end)
