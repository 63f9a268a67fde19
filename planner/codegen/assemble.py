"""A plan's executor, emitted and with its runs of ops compiled.

Built apart from the PlannedModule that runs it, and from the model's state (the
compiled runs are measured on example inputs of their layouts), so that
``planner.measured_room`` can build several candidates and keep one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from planner.codegen.emit import Executor, emit_executor
from planner.codegen.segments import Segment, compile_segments, composed_levels
from planner.ir.autocast import autocast_off
from planner.ir.program import Program
from planner.solver.plan import Plan
from planner.solver.problem import Problem

#: A compiled run may use all but 1/HEADROOM_MARGIN of the plan's spare room
#: (and, where the plan holds more than the budget op by op, must save that much
#: more than the excess).
HEADROOM_MARGIN = 8


@dataclass
class Assembled:
    executor: Executor
    #: each compiled run's callable (kernels="inductor"), by segment name
    runs: dict[str, Callable[[list], list]]
    #: the peak the executor holds as assembled (``composed_levels``' highest)
    peak_bytes: int
    #: per step, the bytes it holds there (``composed_levels``); empty for a plan
    #: without a timeline
    levels: list[int]


def assemble(
    program: Program,
    graph_module: torch.fx.GraphModule,
    problem: Problem,
    plan: Plan,
    kernels: str,
    device: torch.device,
    executor: Executor | None = None,
) -> Assembled:
    """Emit ``plan``'s executor (unless given, emitted already) and compile its
    runs of ops (kernels="inductor") so that each holds no more than
    ``plan.budget_bytes`` allows."""
    if executor is None:
        executor = emit_executor(program, graph_module, problem, plan, kernels, device)
    at_ops, between_ops = executor.op_timeline, executor.between_ops_timeline

    def headroom(segment: Segment) -> int:
        return run_headroom(segment, at_ops, plan.budget_bytes)

    with autocast_off():  # compiled and timed in the traced dtypes, as they will run
        runs = compile_segments(executor.segments, device, executor.ops, headroom)
    if not at_ops:  # a plan with no timeline: its replay's peak
        return Assembled(executor, runs, plan.predicted_peak_bytes, [])
    levels = composed_levels(executor.segments, at_ops, between_ops)
    return Assembled(executor, runs, max(levels), levels)


def run_headroom(segment: Segment, op_timeline: list[int], budget_bytes: int) -> int:
    """The bytes the plan leaves free under the budget while a compiled run's
    ops run (``op_timeline``: resident bytes per step while its op runs), less
    an eighth (a margin for the replay's rounding): what Inductor's kernels may
    allocate beyond the eager run's peak there. The replay's
    timeline is what the meter measures, to the byte or a few (GPT-2's step at
    50%: 121,732,108 predicted, 121,732,112 measured); half the room, as this
    allowed before, left two of the CNN's backward runs at 50% eager, one of
    them for 4.5 KB. Negative where the plan holds more than the budget there
    op by op (``planner.measured_room``): the compiled run must allocate that
    much, and an eighth more, less than the eager one."""
    first, last = segment.steps
    if first < 0 or last >= len(op_timeline):
        return 0
    room = budget_bytes - max(op_timeline[first : last + 1])
    return room - abs(room) // HEADROOM_MARGIN
