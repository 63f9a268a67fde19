"""Planning compiled runs by measured room (kernels="inductor").

The solver prices each op's outputs as the eager executor holds them. A compiled
run holds less: Inductor fuses chains of pointwise ops and never materializes
their intermediates, and frees each buffer at its last use. A schedule solved for
the budget op by op therefore spends time (recomputation, offload) on room the
compiled runs did not need: GPT-2's training step solved for 50% of its peak
holds 98.6 MB compiled under a 121.8 MB budget (BENCHMARKS_training.md).

So this module solves the schedule again for budgets above the user's
(``ROOM_LADDER``), assembles each promising candidate (``planner.codegen.assemble``:
its runs compiled so that each holds no more than the *user's* budget allows; a run
whose ops exceed it one by one must be compiled, and must save the excess), and
keeps the candidate with the lowest estimated time whose composed peak
(``planner.codegen.segments.composed_levels``: the replay at memory steps and at
ops outside compiled runs, the measured allocations of each compiled run) is within
the budget. Ops no compiled run covers save nothing; the next solve holds them to
the budget (``_held_to_budget``). Why measured and not predicted: what a compiled
run saves depends on which runs a schedule's memory steps cut, which is known only
once it is emitted, and on Inductor's buffer planning, known only once compiled.
GPT-2 at 50%: the schedule kept was solved for 1.2x the budget, peaks at its
composed 115.3 MiB by the meter (budget 116.2), and steps faster than torch.compile
at every activation memory budget that peaks as high or higher.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from planner.codegen.assemble import Assembled, assemble
from planner.codegen.emit import Executor, emit_executor
from planner.codegen.segments import leaf_runs
from planner.errors import BudgetTooSmall
from planner.passes.pipeline import Analysis
from planner.solver import Plan, Problem, solve, validate
from planner.solver.solve import keep_all_peak, record_replay

log = logging.getLogger(__name__)

#: The op-level budgets tried, as multiples of the user's budget.
ROOM_LADDER = (1.1, 1.2, 1.3, 1.45, 1.6)
#: The search stops after this many budgets in a row give no plan that fits.
MAX_MISSES = 2
#: Solves per op-level budget: after each, the steps the executor holds over the
#: budget are held to it in the next (``_held_to_budget``).
MAX_ROUNDS = 4
#: Room tried above the budget is at most this many times what the compiled run
#: that saves most saves, in the schedule solved for the budget: where a step
#: holds more than the budget op by op, its run must save the excess (the CNN's
#: runs at 50% save 139 KB at most, 3% of the budget; GPT-2's 25 MB, 24%).
ROOM_PER_SAVING = 2
#: A schedule is compiled and measured only if estimated faster than the best so
#: far by this share: compiling is what costs (tens of seconds for the CNN), and a
#: schedule no faster by estimate is most often the same one.
MIN_GAIN = 1e-3


def plan_by_measured_room(
    analysis: Analysis,
    problem: Problem,
    plan: Plan,
    device: torch.device,
    time_limit: float,
    ladder: tuple[float, ...] = ROOM_LADDER,
) -> tuple[Plan, Assembled]:
    """The fastest (by estimate) of ``plan`` and the plans solved op by op for
    the budgets of ``ladder`` whose compiled executor peaks within
    ``problem.budget_bytes``, with that executor assembled. ``plan`` (solved
    for the budget) always qualifies: its compiled runs are held to the room it
    leaves."""
    budget = problem.budget_bytes
    start = time.perf_counter()
    best_plan, best = plan, _assemble(analysis, problem, plan, device)
    log.info(
        "measured room: schedule for the budget, %s bytes: compiled peak %s bytes, "
        "estimated %.4f s",
        f"{budget:,}",
        f"{best.peak_bytes:,}",
        plan.estimated_seconds,
    )
    if not plan.actions:  # nothing moved: no room to gain
        return best_plan, best
    ceiling = keep_all_peak(problem)  # more room than this changes nothing
    most_saved = max(
        (eager - compiled for eager, compiled in _run_allocations(best.executor)), default=0
    )
    never_compiled = {op.index for op in analysis.program.ops if op.draws_random}
    #: per step, what the compiled runs of the schedule for the budget save there:
    #: a schedule with more room is expected to save as much, step by step
    saved = [max(0, at_op - level) for at_op, level in zip(best.executor.op_timeline, best.levels)]
    misses = 0
    for factor in ladder:
        op_budget = min(int(budget * factor), ceiling)
        if op_budget <= budget:
            continue
        if op_budget - budget > ROOM_PER_SAVING * most_saved:
            log.info(
                "measured room: no schedule for %.2fx the budget: no compiled run saves "
                "more than %s bytes",
                factor,
                f"{most_saved:,}",
            )
            break
        found = _fitting_candidate(
            analysis, problem, op_budget, device, time_limit, never_compiled, best_plan, saved
        )
        log.info(
            "measured room: schedule for %s bytes (%.2fx the budget): %s; %.1f s so far",
            f"{op_budget:,}",
            op_budget / budget,
            "none faster fits"
            if found is None
            else f"estimated {found[0].estimated_seconds:.4f} s",
            time.perf_counter() - start,
        )
        misses = 0 if found is not None else misses + 1
        if found is not None:
            best_plan, best = found
        if misses >= MAX_MISSES or op_budget >= ceiling:
            break
    return best_plan, best


def _fitting_candidate(
    analysis: Analysis,
    problem: Problem,
    op_budget: int,
    device: torch.device,
    time_limit: float,
    held: set[int],
    best: Plan,
    saved: list[int],
) -> tuple[Plan, Assembled] | None:
    """A plan solved op by op for ``op_budget``, estimated faster than ``best``,
    whose assembled executor holds no more than ``problem``'s budget; or None.
    The ops at ``held`` steps are held to the budget, and so, in each next try,
    are those at the steps the last one held over it: first, before compiling,
    the steps no run of ops covers and those over it by more than ``saved``
    (per step, what compiled runs saved there in the schedule for the budget),
    then those the compiled runs did not bring within it."""
    budget = problem.budget_bytes
    held = set(held)
    program, graph_module = analysis.program, analysis.captured.graph_module
    for _ in range(MAX_ROUNDS):
        try:
            solved = solve(_held_to_budget(problem, op_budget, held), time_limit=time_limit)
        except BudgetTooSmall:
            return None
        candidate = _restate(solved, problem, op_budget)
        if candidate.estimated_seconds > best.estimated_seconds * (1 - MIN_GAIN):
            return None
        executor = emit_executor(program, graph_module, problem, candidate, "inductor", device)
        over = _over_outside_runs(executor, budget) | {
            t for t, level in enumerate(executor.op_timeline) if level - saved[t] > budget
        }
        if not over:  # every step over the budget is in a run: compile and measure
            assembled = assemble(
                program, graph_module, problem, candidate, "inductor", device, executor
            )
            over = {t for t, level in enumerate(assembled.levels) if level > budget}
            log.info(
                "measured room: schedule for %s bytes holding %d steps to the budget: "
                "compiled peak %s bytes, %d steps over",
                f"{op_budget:,}",
                len(held),
                f"{assembled.peak_bytes:,}",
                len(over),
            )
            if not over:
                return candidate, assembled
        if over <= held:  # held already: what is over is not the op
            return None
        held |= over
    return None


def _run_allocations(executor: Executor) -> list[tuple[int, int]]:
    """(eager, compiled) peak bytes of each compiled run, parts included."""
    return [leaf.allocations for leaf in leaf_runs(executor.segments) if leaf.allocations]


def _over_outside_runs(executor: Executor, budget: int) -> set[int]:
    """The steps where ``executor`` holds more than ``budget`` whatever its runs
    compile to: an op outside every run of ops, or a memory step (then its op
    and the next, which bound it on either side)."""
    in_runs = {t for s in executor.segments for t in range(s.steps[0], s.steps[1] + 1)}
    over = {
        t for t, level in enumerate(executor.op_timeline) if level > budget and t not in in_runs
    }
    steps = len(executor.op_timeline)
    for t, level in enumerate(executor.between_ops_timeline):
        if level > budget:
            over.update(s for s in (t, t + 1) if s < steps)
    return over


def _held_to_budget(problem: Problem, op_budget: int, held: set[int]) -> Problem:
    """``problem`` for ``op_budget``, with the op at each ``held`` step charged the
    excess over the budget as workspace: so while it runs the plan holds no more
    than the budget there (an op that runs eagerly, outside any compiled run,
    saves nothing). The fingerprint does not count workspace: the plan solved
    applies to ``problem`` as is."""
    extra = op_budget - problem.budget_bytes
    steps = [
        dataclasses.replace(step, workspace_bytes=step.workspace_bytes + extra)
        if t in held
        else step
        for t, step in enumerate(problem.steps)
    ]
    return dataclasses.replace(
        problem, budget_bytes=op_budget, steps=steps, meta=dict(problem.meta)
    )


def _restate(solved: Plan, problem: Problem, op_budget: int) -> Plan:
    """``solved`` (for a problem with held steps) replayed on ``problem`` as is,
    for ``op_budget``: its timelines without the held steps' charge; its budget
    the user's."""
    replay = validate(dataclasses.replace(problem, budget_bytes=op_budget), solved)
    restated = dataclasses.replace(
        solved, budget_bytes=problem.budget_bytes, op_level_budget_bytes=op_budget
    )
    record_replay(restated, replay)
    return restated


def _assemble(analysis: Analysis, problem: Problem, plan: Plan, device: torch.device) -> Assembled:
    program, graph_module = analysis.program, analysis.captured.graph_module
    return assemble(program, graph_module, problem, plan, "inductor", device)
