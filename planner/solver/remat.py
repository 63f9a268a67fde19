"""Pure-graph rematerialization: which nodes to recompute, and when, to fit a budget.

Pipeline of the default path, each step with its reason:
  1. index the DAG in a fixed topological order        (all solvers share stage t)
  2. budget >= no-recompute peak -> topological order  (optimal: nothing to recompute)
  3. budget < lower bound -> BudgetTooSmall            (no schedule can exist)
  4. heuristic portfolio (remat_portfolio): the stage greedy and DTR over index
     order, then, if neither fits cheaply, DTR over searched low-peak orders
                                                        (a valid schedule on any DAG)
  5. stop if that schedule costs <= (1 + gap) x the sum of node costs (a lower bound)
  6. CP-SAT on Checkmate's R/S model restricted to a window of recent ancestors,
     hinted with the best stage-form schedule, stopped at relative gap ``gap``
                                                        (improves, never worsens)
  7. verify the result by replaying it                 (never trust a model's accounting)

``exact=True`` solves the unrestricted fixed-order Checkmate model instead, whose
optimum is the optimum of that formulation (use it on small graphs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass

import networkx as nx

from planner.errors import BudgetTooSmall
from planner.solver.remat_cpsat import CheckmateModel, CpSatConfig
from planner.solver.remat_portfolio import Candidate, heuristic_schedules, quick_schedule
from planner.solver.remat_problem import RematProblem, simulate_indexed, topological_peak

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 12  # recompute candidates per stage: this many preceding ancestors
MAX_MODEL_TERMS = 400_000  # above this the restricted model is not built (greedy only)
GREEDY_ONLY_LIMIT = 0.05  # seconds: below this remaining budget, skip CP-SAT
DEFAULT_GAP = 0.005  # stop once the schedule is proven within 0.5% of the optimum
CPSAT_MAX_NODES = 1500  # above this the default path keeps the heuristics' schedule
# The default path's CP-SAT polish gets at most CPSAT_BASE_S + CPSAT_PER_NODE_S * n
# units of CP-SAT deterministic time (reproducible) and 4x that in wall seconds:
# the window model's bound is weak, so without a cap it would spend the whole
# time limit proving what the hint already has; the exact model is what to run for proofs.
CPSAT_BASE_S = 0.25
CPSAT_PER_NODE_S = 0.0025


@dataclass(frozen=True)
class RematSolution:
    """A schedule and how it was found (``bound`` is a valid lower bound on cost)."""

    sequence: list[Hashable]
    cost: float
    peak: int
    method: str
    status: str
    bound: float
    seconds: float


def remat_schedule(
    G: nx.DiGraph,
    budget_bytes: int,
    time_limit: float = 30.0,
    exact: bool = False,
    window: int = DEFAULT_WINDOW,
) -> list[Hashable]:
    """Evaluation sequence of G's nodes (repeats = recomputations) with peak <= budget.

    Raises BudgetTooSmall when no schedule is found; its ``min_budget`` is the
    smallest budget for which the solver found one.
    """
    return solve_remat(G, budget_bytes, time_limit, exact=exact, window=window).sequence


def solve_remat(
    G: nx.DiGraph,
    budget_bytes: int,
    time_limit: float = 30.0,
    exact: bool = False,
    window: int = DEFAULT_WINDOW,
    seed: int = 0,
    relative_gap: float | None = None,
) -> RematSolution:
    """Like :func:`remat_schedule`, returning cost, peak, bound and the method used.

    ``relative_gap`` stops CP-SAT once the best schedule is proven within that
    fraction of the optimum (default: DEFAULT_GAP, or 0 with ``exact``).
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    problem = RematProblem.from_graph(G)
    budget = int(budget_bytes)
    if problem.n == 0:
        return RematSolution([], 0.0, 0, "empty", "OPTIMAL", 0.0, 0.0)
    topo = list(range(problem.n))
    topo_peak = topological_peak(problem)
    lb = problem.lower_bound()
    total = problem.total_cpu
    gap = (0.0 if exact else DEFAULT_GAP) if relative_gap is None else relative_gap
    if budget >= topo_peak:
        return _solution(problem, topo, "topological", "OPTIMAL", total, t0)
    if budget < lb:
        found = smallest_budget(problem, lb, topo_peak)
        raise BudgetTooSmall(
            f"remat: budget {budget} B is below the lower bound {lb} B (the largest node "
            f"with its inputs, or all outputs at the end); the smallest budget for which a "
            f"schedule was found is {found} B",
            min_budget=found,
        )
    found_list = heuristic_schedules(
        problem, budget, deadline, seed, total * (1 + gap), search_orders_too=not exact
    )
    best = min(found_list, key=lambda c: c.cost, default=None)
    log.info(
        "remat: n=%d budget=%d topo_peak=%d lb=%d heuristic=%s",
        problem.n,
        budget,
        topo_peak,
        lb,
        None if best is None else f"{best.cost:.4g} ({best.method})",
    )
    if best is not None and best.cost <= total * (1 + 1e-12):
        return _solution(problem, list(best.sequence), best.method, "OPTIMAL", total, t0)
    best_seq = None if best is None else list(best.sequence)
    best_cost = math.inf if best is None else best.cost
    method, status, bound = (best.method, "FEASIBLE", total) if best else ("", "", total)
    hint = min((c for c in found_list if c.stages), key=lambda c: c.cost, default=None)
    proven = best is not None and best.cost <= total * (1 + gap)  # total is a lower bound
    remaining = deadline - time.perf_counter()
    # Without a stage-form hint the window model on a large graph finds nothing in
    # the time it gets (the window is built around index order): skip it there.
    useful = exact or (problem.n <= CPSAT_MAX_NODES and (hint is not None or problem.n <= 200))
    if remaining > GREEDY_ONLY_LIMIT and not proven and useful:
        cand = _candidates(problem, hint, None if exact else window)
        terms = sum(len(c) for c in cand) * 4 + problem.n * 64
        if exact or terms <= MAX_MODEL_TERMS:
            model = CheckmateModel(problem, budget, cand)
            hinted = hint is not None and hint.stages is not None and model.add_hint(hint.stages)
            remaining = deadline - time.perf_counter()
            dtime = None if exact else CPSAT_BASE_S + CPSAT_PER_NODE_S * problem.n
            if dtime is not None:  # and a wall-clock cap, for when the machine is loaded
                remaining = min(remaining, 4 * dtime)
            log.info(
                "remat: CP-SAT %s model, %d vars, hint=%s, %.1fs left",
                "exact" if exact else f"window={window}",
                model.num_vars(),
                hinted,
                remaining,
            )
            cfg = CpSatConfig(
                time_limit=max(remaining, 0.05),
                random_seed=seed,
                relative_gap=gap,
                deterministic_time=dtime,
            )
            res = model.solve(cfg)
            log.info(
                "remat: CP-SAT %s obj=%.6g bound=%.6g in %.2fs",
                res.status,
                res.objective,
                res.bound,
                res.seconds,
            )
            if res.stages:
                seq = [v for st in res.stages for v in st]
                _, cost = simulate_indexed(problem, seq)
                if cost < best_cost - 1e-9 or best_seq is None:
                    best_seq, best_cost = seq, cost
                    method = "cpsat-exact" if exact else f"cpsat-window{window}"
                status = res.status if exact or best_seq is seq else "FEASIBLE"
            if exact and res.status in ("OPTIMAL", "FEASIBLE"):
                bound = max(total, res.bound)
        else:
            log.info("remat: restricted model too large (%d terms): heuristics only", terms)
    if best_seq is None:
        found = smallest_budget(problem, lb, topo_peak)
        raise BudgetTooSmall(
            f"remat: no schedule found within {budget} B in {time_limit:.0f}s; the smallest "
            f"budget for which a schedule was found is {found} B (lower bound {lb} B)",
            min_budget=found,
        )
    return _solution(problem, best_seq, method, status, bound, t0)


def _solution(
    problem: RematProblem, seq: list[int], method: str, status: str, bound: float, t0: float
) -> RematSolution:
    peak, cost = simulate_indexed(problem, seq)
    return RematSolution(
        problem.sequence_nodes(seq), cost, peak, method, status, bound, time.perf_counter() - t0
    )


def _candidates(
    problem: RematProblem, greedy: Candidate | None, window: int | None
) -> list[list[int]]:
    """Per stage, the nodes CP-SAT may evaluate: all (exact), or a window of ancestors.

    The window keeps stage t's recomputations among the ``window`` ancestors of t (or
    of the outputs, for the final stage) nearest in index, plus whatever the greedy
    recomputed there, so the hint stays inside the model.
    """
    n = problem.n
    if window is None:
        return [list(range(t + 1)) for t in range(n + 1)]
    cand: list[set[int]] = []
    for t in range(n + 1):
        roots = [t] if t < n else list(problem.outputs)
        seen: set[int] = set(roots)
        frontier = list(roots)
        lo = (t if t < n else n) - window
        # ancestors with index >= lo (DFS only through nodes in the window)
        while frontier:
            v = frontier.pop()
            for p in problem.preds[v]:
                if p >= lo and p not in seen:
                    seen.add(p)
                    frontier.append(p)
        if t == n:
            seen.discard(n)
        cand.append(seen)
    if greedy is not None and greedy.stages is not None:
        for t, st in enumerate(greedy.stages):
            cand[t].update(st)
    return [sorted(c) for c in cand]


def smallest_budget(problem: RematProblem, lo: int, hi: int) -> int:
    """Smallest budget in [lo, hi] for which a heuristic finds a schedule (bisection).

    Greedy success is not monotone in the budget in general, so this is "a budget
    for which a schedule was found", close to the smallest; ``hi`` always works.
    """
    best = hi
    lo = max(lo, 0)
    while lo < best and best - lo > best // 200:  # to 0.5%: each probe is a full heuristic run
        mid = (lo + best) // 2
        res = quick_schedule(problem, mid)
        if res is not None:
            best = res.peak if res.peak < mid else mid
        else:
            lo = mid + 1
    return best
