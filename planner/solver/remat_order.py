"""Evaluation orders with a low no-recompute peak, found by a biased greedy + local search.

Why: on random layered DAGs the peak of a plain topological order is dominated by
long-lived values (skip edges) that the order happened to produce early. A better
order shrinks that peak with no recomputation at all, and whatever gap is left to the
budget is much easier for DTR (:mod:`remat_dtr`) to close: DTR's recomputations are
only cheap while the values they read are still around, so it works best over an
order that already nearly fits. Finding a min-peak order is NP-hard ("Neural
Topological Ordering for Computation Graphs", Gagrani et al. 2022, learns it); here a
memory-aware list scheduler is randomised through a per-node bias and the biases are
improved by hill climbing on (bytes-steps over the budget, peak).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.solver.remat_problem import RematProblem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredOrder:
    """A topological order and its no-recompute memory profile summary."""

    order: tuple[int, ...]
    peak: int
    overflow: int  # sum over steps of bytes above the target budget

    def key(self) -> tuple[int, int]:
        return (self.overflow, self.peak)


def order_profile(problem: RematProblem, order: Sequence[int]) -> list[int]:
    """Bytes resident at each step when ``order`` runs every node once (same semantics
    as :func:`remat_problem.simulate_indexed`, specialised to no repeats)."""
    p = problem
    pending = [len(s) for s in p.succs]
    mem = 0
    prof: list[int] = []
    for v in order:
        mem += p.ram[v]
        prof.append(mem)
        for u in p.preds[v]:
            pending[u] -= 1
            if pending[u] == 0:
                mem -= p.ram[u]
    return prof


def score_order(problem: RematProblem, order: Sequence[int], budget: int) -> ScoredOrder:
    prof = order_profile(problem, order)
    return ScoredOrder(
        tuple(order), max(prof, default=0), sum(m - budget for m in prof if m > budget)
    )


def biased_greedy_order(problem: RematProblem, bias: Sequence[float]) -> list[int]:
    """List scheduling: among ready nodes run the one with the smallest
    (output bytes - bytes it frees) / output bytes + bias[v]."""
    p = problem
    indeg = [len(pr) for pr in p.preds]
    pending = [len(s) for s in p.succs]
    ready = [v for v in range(p.n) if indeg[v] == 0]
    order: list[int] = []
    ram = p.ram
    while ready:
        best_k = 0
        best_key = 0.0
        for k, v in enumerate(ready):
            freed = 0
            for u in p.preds[v]:
                if pending[u] == 1:
                    freed += ram[u]
            key = (ram[v] - freed) / (ram[v] or 1) + bias[v]
            if k == 0 or key < best_key:
                best_key, best_k = key, k
        v = ready[best_k]
        ready[best_k] = ready[-1]
        ready.pop()
        order.append(v)
        for u in p.preds[v]:
            pending[u] -= 1
        for w in p.succs[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    return order


def search_orders(
    problem: RematProblem,
    budget: int,
    time_limit: float,
    seed: int = 0,
    restarts: int = 24,
    keep: int = 4,
    max_stall: int = 300,
    accept: Callable[[ScoredOrder], bool] | None = None,
) -> list[ScoredOrder]:
    """The ``keep`` best distinct orders found: index order, random restarts, then
    hill climbing on the biases of nodes that are resident where memory overflows.

    A climb ends after ``max_stall`` steps without strict improvement (a local
    optimum); ``accept`` (if given) is offered each local optimum and returning True
    ends the search, otherwise the next climb starts from a fresh random bias. That
    way a caller can try each optimum (with DTR) and the search keeps diversifying
    until one works or the time is up. Deterministic for a given seed as long as
    ``time_limit`` does not cut it short.
    """
    t0 = time.perf_counter()
    rng = random.Random(seed)
    n = problem.n
    pool: dict[tuple[int, ...], ScoredOrder] = {}

    def add(order: list[int]) -> ScoredOrder:
        s = score_order(problem, order, budget)
        pool.setdefault(s.order, s)
        return s

    def expired() -> bool:
        return time.perf_counter() - t0 >= time_limit

    add(list(range(n)))
    best_bias = [0.0] * n
    best = add(biased_greedy_order(problem, best_bias))
    for r in range(restarts):
        if time.perf_counter() - t0 > time_limit / 4:
            break
        bias = _random_bias(rng, n, r)
        s = add(biased_greedy_order(problem, bias))
        if s.key() < best.key():
            best, best_bias = s, bias
    iters = climbs = 0
    while not expired():
        climbs += 1
        stall = 0
        while best.overflow > 0 and stall < max_stall and not expired():
            iters += 1
            stall += 1
            bias = list(best_bias)
            for v in _overflow_nodes(problem, best, budget, rng):
                bias[v] += rng.gauss(0.0, 0.3)
            s = add(biased_greedy_order(problem, bias))
            if s.key() < best.key():
                stall = 0
            if s.key() <= best.key():
                best, best_bias = s, bias
        if accept is None or accept(best) or best.overflow == 0:
            break
        best_bias = _random_bias(rng, n, climbs)
        best = add(biased_greedy_order(problem, best_bias))
    ranked = sorted(pool.values(), key=ScoredOrder.key)
    log.info(
        "remat order search: %d orders, %d climbs (%d steps), best peak %d overflow %d in %.2fs",
        len(pool),
        climbs,
        iters,
        ranked[0].peak,
        ranked[0].overflow,
        time.perf_counter() - t0,
    )
    return ranked[:keep]


def _random_bias(rng: random.Random, n: int, k: int) -> list[float]:
    amp = (0.1, 0.3, 0.6, 1.0)[k % 4]
    return [amp * rng.random() for _ in range(n)]


def _overflow_nodes(
    problem: RematProblem, s: ScoredOrder, budget: int, rng: random.Random
) -> list[int]:
    """A few nodes to perturb: ones evaluated near a random over-budget (or the peak) step."""
    prof = order_profile(problem, s.order)
    hot = [k for k, m in enumerate(prof) if m > budget] or [prof.index(s.peak)]
    k = rng.choice(hot)
    lo, hi = max(0, k - 12), min(len(s.order), k + 4)
    return rng.sample(s.order[lo:hi], min(3, hi - lo))
