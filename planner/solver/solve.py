"""Solve a placement Problem: baselines, the CP-SAT model warm-started from the
best of them, independent validation of every candidate plan, and the fastest
valid plan wins. The solver's plan is never worse than a baseline that fits,
because the baselines compete in the same final comparison.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from planner.errors import BudgetTooSmall, InvalidPlan
from planner.solver.baselines import BASELINES, greedy, keep_all
from planner.solver.candidates import (
    Candidates,
    build_candidates,
    fixed_spans,
    holdings,
    own_steps,
)
from planner.solver.model import PlacementModel
from planner.solver.plan import Plan, SolverStats
from planner.solver.problem import Problem
from planner.solver.schedule import plan_from_choices
from planner.solver.validate import Replay, validate

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT = 20.0
#: Share of the time limit given to CP-SAT as deterministic time (its own count of
#: work): the baselines and translation take the rest.
DETERMINISTIC_SHARE = 0.6
#: Share of the time limit for finding the lowest peak when nothing fits.
MIN_PEAK_SHARE = 0.3
#: The greedy baseline's time, at least (beyond half the time limit): it descends
#: from keep-all and stops where the plan fits, so one cut short fits nothing and
#: is thrown away. With ``time_limit=5`` it was cut on graphs of 1,600-5,000 ops,
#: CP-SAT's second found nothing, and the plan kept was a memory-minimizing one
#: using 4-13% of the budget, 3.5-6x slower than the greedy's own (which took 10 s
#: on a 5,213-step graph), after a 23 s memory-minimizing descent anyway.
GREEDY_MIN_SECONDS = 30.0


@dataclass
class Candidate:
    name: str
    choices: list[str]
    plan: Plan
    replay: Replay | None
    error: str | None = None


def solve(problem: Problem, time_limit: float = DEFAULT_TIME_LIMIT, use_model: bool = True) -> Plan:
    """Best plan for ``problem`` in about ``time_limit`` seconds (baselines, then
    CP-SAT for what is left, at least a fifth of the limit).

    Raises BudgetTooSmall when not even the memory-minimizing plan fits; its
    ``min_budget`` is that plan's validated peak."""
    start = time.perf_counter()
    cands = build_candidates(problem)
    unplanned = _evaluate(cands, "keep-all", keep_all(cands), None)
    unplanned_peak, unplanned_seconds = _unplanned_figures(cands, unplanned)
    results = [unplanned]
    # below what any plan can hold, the greedy descends until no move is left
    # (21 s of a 5,000-step chain's, the peak step moving at every move) to fit
    # nothing; the memory-minimizing descent below says how low plans go
    lows = lower_bounds(cands)  # per step; a BudgetTooSmall names where it peaks
    below_floor = problem.budget_bytes < int(lows.max())
    for name, fn in BASELINES.items():
        if name == "greedy" and below_floor:
            continue
        if name == "greedy":
            choices = greedy(cands, deadline=start + max(0.5 * time_limit, GREEDY_MIN_SECONDS))
        elif name != "keep-all":
            choices = fn(cands)
        else:
            continue
        results.append(_evaluate(cands, name, choices, None))
    min_memory: list[str] | None = None
    if not any(r.replay is not None for r in results):
        # the memory-minimizing greedy (deterministic, budget-independent, no
        # deadline): what makes a reported min_budget always plannable
        min_memory = greedy(cands, budget=0)
        results.append(_evaluate(cands, "greedy-min-memory", min_memory, None))
    fitting = [r for r in results if r.replay is not None]
    best = min(fitting, key=lambda r: r.replay.seconds) if fitting else None  # type: ignore[union-attr]
    if best is not None and best.name == "keep-all":
        stats = SolverStats(
            name="none", status="FITS_UNPLANNED", seconds=0.0, objective=0.0, bound=0.0
        )
    elif not use_model:
        if best is None:
            _raise_too_small(cands, min_memory, lows)
        stats = SolverStats(name="baseline:" + best.name, status="BASELINE", seconds=0.0)  # type: ignore[union-attr]
    else:
        model = PlacementModel(cands)
        hint = best.choices if best is not None else results[-1].choices
        log.info(
            "solver: %d gaps, %d memory constraints; warm start %s",
            len(cands.gaps),
            model.constrained_steps,
            best.name if best else "min-memory",
        )
        # work-bounded (deterministic) for reproducible plans; the wall clock is the
        # backstop that keeps the time limit on a loaded machine
        remaining = time_limit - (time.perf_counter() - start)
        result = model.solve(
            DETERMINISTIC_SHARE * time_limit,
            hint=hint,
            wall_limit=max(0.2 * time_limit, remaining),
        )
        stats = SolverStats(
            name="cp-sat",
            status=result.status,
            seconds=result.seconds,
            objective=result.objective_seconds,
            bound=result.bound_seconds,
        )
        if result.choices is not None:
            solved = _evaluate(cands, "cp-sat", result.choices, stats)
            results.append(solved)
            if solved.replay is None:
                log.warning("solver plan rejected by the validator: %s", solved.error)
            elif best is None or solved.replay.seconds <= best.replay.seconds:  # type: ignore[union-attr]
                best = solved
        if best is None:
            # nothing fits: the lowest peak any plan reaches, to plan with if it
            # fits after all and to report as min_budget otherwise
            lowest = _lowest_peak(cands, time_limit, hint=results[-1].choices)
            if lowest is not None and lowest.replay.peak_bytes <= problem.budget_bytes:  # type: ignore[union-attr]
                best = _evaluate(cands, "cp-sat-min-memory", lowest.choices, stats)
                results.append(best)
            if best is None or best.replay is None:
                _raise_too_small(
                    cands,
                    min_memory,
                    lows,
                    proven=result.status == "INFEASIBLE",
                    found=lowest.replay.peak_bytes if lowest is not None else None,  # type: ignore[union-attr]
                )
    assert best is not None
    plan = best.plan
    plan.solver = (
        stats
        if best.name == "cp-sat" or best.name == "keep-all"
        else SolverStats(
            name=f"{stats.name} (kept baseline {best.name})",
            status=stats.status,
            seconds=stats.seconds,
            objective=stats.objective,
            bound=stats.bound,
        )
    )
    plan.unplanned_peak_bytes = unplanned_peak
    plan.unplanned_estimated_seconds = unplanned_seconds
    plan.baselines = {
        r.name: (
            {"fits": True, "peak_bytes": r.replay.peak_bytes, "seconds": r.replay.seconds}
            if r.replay
            else {"fits": False, "why": r.error}
        )
        for r in results
    }
    log.info(
        "plan: %s, peak %d of %d, %.4fs (unplanned %.4fs), %.1fs to solve",
        best.name,
        plan.predicted_peak_bytes,
        problem.budget_bytes,
        plan.estimated_seconds,
        unplanned_seconds,
        time.perf_counter() - start,
    )
    return plan


def _evaluate(
    cands: Candidates, name: str, choices: list[str], stats: SolverStats | None
) -> Candidate:
    problem = cands.problem
    plan = plan_from_choices(
        cands, choices, stats or SolverStats(name=name, status="BASELINE", seconds=0.0)
    )
    try:
        replay = validate(problem, plan)
    except InvalidPlan as exc:
        return Candidate(name, choices, plan, None, str(exc))
    record_replay(plan, replay)
    return Candidate(name, choices, plan, replay)


def record_replay(plan: Plan, replay: Replay) -> None:
    """Set ``plan``'s predicted figures (peak, time, timelines) to ``replay``'s."""
    plan.predicted_peak_bytes = replay.peak_bytes
    plan.estimated_seconds = replay.seconds
    plan.timeline = list(replay.resident_bytes)
    plan.op_timeline = list(replay.op_bytes)
    plan.between_ops_timeline = list(replay.between_ops_bytes)


def _unplanned_figures(cands: Candidates, keep: Candidate) -> tuple[int, float]:
    """Keep-all's peak and time, whether or not it fits the budget."""
    if keep.replay is not None:
        return keep.replay.peak_bytes, keep.replay.seconds
    replay = _replay_unbounded(cands, keep.choices)
    return replay.peak_bytes, replay.seconds


def _lowest_peak(cands: Candidates, time_limit: float, hint: list[str]) -> Candidate | None:
    """The plan of lowest peak CP-SAT finds (budget lifted), validated; None if
    it finds none. Work-bounded and independent of the budget, so a later solve at
    that peak finds the same plan again."""
    model = PlacementModel(cands, minimize_peak=True)
    limit = MIN_PEAK_SHARE * time_limit
    result = model.solve(limit, hint=hint, wall_limit=2 * limit + 1)
    if result.choices is None:
        return None
    roomy = dataclasses.replace(cands.problem, budget_bytes=2**62)
    found = _evaluate(dataclasses.replace(cands, problem=roomy), "min-peak", result.choices, None)
    return found if found.replay is not None else None


def _raise_too_small(
    cands: Candidates,
    min_memory: list[str] | None,
    lows: np.ndarray,
    proven: bool = False,
    found: int | None = None,
) -> None:
    """Say how small a budget we can plan for, and the bound below which none can.
    ``min_memory``: the memory-minimizing greedy's choices, when solve made them
    (made again otherwise: 20 s of a 5,000-step chain's 78 s); ``lows``:
    ``lower_bounds``, as solve found them (their largest is the bound)."""
    problem = cands.problem
    lower_bound = int(lows.max())
    # The memory-minimizing greedy is deterministic and does not depend on the
    # budget, and solve() always evaluates it; so is the lowest-peak CP-SAT solve
    # (``found``), which solve() runs and plans with when its peak fits: a budget of
    # either peak is always plannable, which is what min_budget promises.
    choices = min_memory if min_memory is not None else greedy(cands, budget=0)
    lowest = _replay_unbounded(cands, choices).peak_bytes
    if found is not None:
        lowest = min(lowest, found)
    from planner.report import format_bytes

    why = "no plan exists" if proven else "no plan was found"
    # more options only where some are left: the advice "allow quantize=..." to a
    # plan that allowed int8 read as if it had not been taken
    if problem.quantize is None:
        more = ", or allow more options (quantize=...)"
    elif problem.quantize == "int8":
        more = ", or store tensors smaller (quantize='int4')"
    else:
        more = ""
    msg = (
        f"budget {problem.budget_bytes:,} byte{'s' if problem.budget_bytes != 1 else ''} "
        f"({format_bytes(problem.budget_bytes)}) is too "
        f"small: {why}. The smallest budget a plan was found for is {lowest:,} bytes "
        f"({format_bytes(lowest)}); none can go below {lower_bound:,} (the "
        f"largest working set of one step plus what cannot move{_floor_blockers(cands, lows)}). "
        f"Use a budget of at least {lowest:,} bytes{more}"
    )
    raise BudgetTooSmall(msg, min_budget=lowest)


#: how many of the tensors held at the floor's step a BudgetTooSmall message names
NAMED_BLOCKERS = 4


def _floor_blockers(cands: Candidates, lows: np.ndarray) -> str:
    """Where the lower bound is reached, and the largest tensors every plan holds
    there (what that step's op reads and writes, what is pinned across it): what to
    make smaller (a batch, a vocabulary, a sequence) when no budget the user has
    reaches the floor."""
    from planner.report import format_bytes

    problem = cands.problem
    T = problem.num_steps
    if T == 0:
        return ""
    step = int(lows.argmax())
    where = problem.steps[step]
    # an output written into its dying input's buffer (``Step.reuse``) adds no bytes
    written_in = where.reuse[1] if where.reuse is not None else None
    held = [
        t
        for t in problem.tensors
        if any(lo <= step <= hi for lo, hi in fixed_spans(problem, t, own_steps(t, T), T))
        and t.nbytes
        and t.index != written_in
    ]
    held.sort(key=lambda t: -t.nbytes)
    source = f" at {where.source}" if where.source else ""
    named = ", ".join(f"{t.name} {format_bytes(t.nbytes)}" for t in held[:NAMED_BLOCKERS])
    rest = len(held) - NAMED_BLOCKERS
    more = f" and {rest} more" if rest > 0 else ""
    scratch = (
        f", plus {format_bytes(where.workspace_bytes)} of the op's scratch"
        if where.workspace_bytes
        else ""
    )
    return (
        f"; it is reached at step {step + 1} of {T}, op {where.name}{source}, which every plan "
        f"runs holding {named}{more}{scratch}"
    )


def _replay_unbounded(cands: Candidates, choices: list[str]) -> Replay:
    """Validated replay of ``choices`` with the budget lifted out of the way."""
    roomy = dataclasses.replace(cands.problem, budget_bytes=2**62)
    result = _evaluate(dataclasses.replace(cands, problem=roomy), "unbounded", choices, None)
    if result.replay is None:
        raise InvalidPlan(f"plan is invalid even without a budget: {result.error}")
    return result.replay


def lower_bound_bytes(cands: Candidates) -> int:
    """No plan can peak below this: the largest of ``lower_bounds``."""
    return int(lower_bounds(cands).max())


def lower_bounds(cands: Candidates) -> np.ndarray:
    """Per step, what no plan can hold less than: what is fixed plus each gap's
    cheapest option there. (Per gap, only the span its options touch is compared.)"""
    low = np.array(cands.fixed, dtype=np.int64)
    for gap in cands.gaps:
        nbytes = cands.problem.tensors[gap.tensor].nbytes
        held = [holdings(o, gap, nbytes) for o in gap.options]
        spans = [(lo, hi) for h in held for lo, hi, _ in h]
        if not spans:
            continue
        first = min(lo for lo, _ in spans)
        last = max(hi for _, hi in spans)
        per_option = np.zeros((len(held), last - first + 1), dtype=np.int64)
        for row, intervals in enumerate(held):
            for lo, hi, b in intervals:
                per_option[row, lo - first : hi - first + 1] += b
        low[first : last + 1] += per_option.min(axis=0)
    return low


def keep_all_peak(problem: Problem) -> int:
    """Peak of running ``problem`` with nothing moved (the executor's unplanned
    peak; in training it holds tangents through the backward, so it can sit a few
    bytes above eager's)."""
    cands = build_candidates(problem)
    return _replay_unbounded(cands, keep_all(cands)).peak_bytes
