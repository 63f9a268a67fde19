"""The heuristic stage of the remat solver: several cheap schedulers, keep what is valid.

Why a portfolio: no single rule wins everywhere. The stage greedy
(:mod:`remat_greedy`) is near-optimal on chains and U-Nets and its output is in
Checkmate's stage form (a complete CP-SAT hint); DTR (:mod:`remat_dtr`) is robust on
arbitrary DAGs; and on wide random DAGs the evaluation order matters more than the
eviction rule, so when neither fits in index order an order search
(:mod:`remat_order`) runs first and DTR then works over its best orders. Every
candidate is replayed by :func:`simulate_indexed` before it is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from planner.solver.remat_dtr import HEURISTICS, dtr_schedule
from planner.solver.remat_greedy import best_greedy
from planner.solver.remat_order import ScoredOrder, search_orders
from planner.solver.remat_problem import RematProblem, simulate_indexed

log = logging.getLogger(__name__)

ORDER_SEARCH_SHARE = 0.6  # of the remaining time, at most, for the order search
ORDER_SEARCH_MAX = 40.0  # seconds, at most
ORDER_SEARCH_MIN = 0.2  # seconds, at least (when there is that much time left)
ORDER_SEARCH_POLISH = 2.0  # seconds, at most, when index order already gave a schedule


@dataclass(frozen=True)
class Candidate:
    """A valid indexed schedule; ``stages`` is its Checkmate stage form when it has one."""

    sequence: tuple[int, ...]
    cost: float
    peak: int
    method: str
    stages: tuple[tuple[int, ...], ...] | None = None


def heuristic_schedules(
    problem: RematProblem,
    budget: int,
    deadline: float,
    seed: int = 0,
    good_enough: float = 0.0,
    search_orders_too: bool = True,
) -> list[Candidate]:
    """Valid schedules from every heuristic that finds one before ``deadline``.

    Stops adding work once a schedule costs at most ``good_enough``. The order search
    runs only when index order gives nothing that good and ``search_orders_too``.
    """
    out: list[Candidate] = []

    def done() -> bool:
        return any(c.cost <= good_enough for c in out) or time.perf_counter() >= deadline

    greedy = best_greedy(problem, budget)
    if greedy is not None:
        out.append(
            Candidate(
                tuple(greedy.sequence),
                greedy.cost,
                greedy.peak,
                f"greedy:{greedy.score}",
                greedy.stages,
            )
        )
    for h in HEURISTICS:
        if done():
            break
        res = dtr_schedule(problem, budget, None, h)
        if res is None:
            continue
        out.append(Candidate(res.sequence, res.cost, res.peak, f"dtr:{h}"))
        staged = _as_stages(problem, res.sequence, budget)
        if staged is not None:
            out.append(staged)
    if search_orders_too and not done():
        left = deadline - time.perf_counter()
        limit = max(min(left * ORDER_SEARCH_SHARE, ORDER_SEARCH_MAX), min(ORDER_SEARCH_MIN, left))
        if out:  # only polishing a valid schedule: CP-SAT is the better use of the time
            limit = min(limit, ORDER_SEARCH_POLISH, 0.1 * left)

        def try_order(so: ScoredOrder, tag: str) -> bool:
            for h in HEURISTICS:
                if done():
                    break
                res = dtr_schedule(problem, budget, so.order, h)
                if res is not None:
                    out.append(Candidate(res.sequence, res.cost, res.peak, f"{tag}+dtr:{h}"))
            return bool(out)

        tried: set[tuple[int, ...]] = set()

        def accept(so: ScoredOrder) -> bool:
            tried.add(so.order)
            return try_order(so, "order-search") or done()

        ranked = search_orders(problem, budget, limit, seed=seed, accept=accept)
        for k, so in enumerate(ranked):
            if so.order not in tried:
                try_order(so, f"order{k}")
    log.debug("remat portfolio: %s", [(c.method, round(c.cost, 4)) for c in out])
    return out


def _as_stages(problem: RematProblem, seq: Sequence[int], budget: int) -> Candidate | None:
    """Checkmate stage form of an index-order schedule: the nodes run between two
    first evaluations, sorted and deduplicated (None if that no longer fits)."""
    n = problem.n
    stages: list[list[int]] = []
    cur: set[int] = set()
    t = 0
    for v in seq:
        cur.add(v)
        if t < n and v == t:
            stages.append(sorted(cur))
            cur = set()
            t += 1
    if t < n:
        return None
    if cur:
        stages.append(sorted(cur))
    flat = [v for st in stages for v in st]
    try:
        peak, cost = simulate_indexed(problem, flat)
    except ValueError:
        return None
    if peak > budget:
        return None
    return Candidate(tuple(flat), cost, peak, "dtr-staged", tuple(tuple(s) for s in stages))


def quick_schedule(problem: RematProblem, budget: int) -> Candidate | None:
    """Cheapest schedule of the index-order heuristics (no order search): for bisection."""
    found = heuristic_schedules(problem, budget, time.perf_counter() + 1e9, 0, 0.0, False)
    return min(found, key=lambda c: c.cost, default=None)
