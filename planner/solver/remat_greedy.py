"""A simulation-based greedy rematerialization scheduler (DTR / Belady flavoured).

Why this shape: it walks the fixed topological order of :class:`RematProblem`, and
before each node's first evaluation ("stage t") it recomputes the missing ancestors
it needs *in index order, each at most once*. That is exactly the stage structure of
Checkmate's R/S matrices, so a greedy schedule converts losslessly into a complete,
feasible hint for the CP-SAT models. When memory is short it evicts the resident
value whose loss is cheapest: recompute cost per byte, discounted by how far away
its next use is (Belady's rule for the caching part of the problem).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from planner.solver.remat_problem import RematProblem, simulate_indexed

log = logging.getLogger(__name__)

# score(recompute_cost, bytes, distance_to_next_use) -> lower is evicted first.
Score = Callable[[float, int, int], float]

SCORES: dict[str, Score] = {
    "cost_per_byte_dist": lambda c, b, d: c / (max(b, 1) * d),
    "cost_per_byte_dist2": lambda c, b, d: c / (max(b, 1) * d * d),
    "cost_per_byte": lambda c, b, d: c / max(b, 1) - 1e-12 * d,
    "belady": lambda c, b, d: -float(d) + 1e-9 * c / max(b, 1),
    "cost_dist": lambda c, b, d: c / d,
}


@dataclass(frozen=True)
class GreedyResult:
    """A schedule as the list of stages: ``stages[t]`` evaluates ascending indices ending in t."""

    stages: tuple[tuple[int, ...], ...]
    peak: int
    cost: float
    score: str

    @property
    def sequence(self) -> list[int]:
        return [v for stage in self.stages for v in stage]


class _Infeasible(Exception):
    """The greedy could not fit a step: every resident value it may drop is pinned."""


def greedy_schedule(
    problem: RematProblem,
    budget: int,
    score: str = "cost_per_byte_dist",
    keep_outputs: bool = False,
    max_steps: int = 0,
) -> GreedyResult | None:
    """Schedule ``problem`` within ``budget`` with one eviction rule; None if it gets stuck.

    ``keep_outputs`` never evicts an output once computed (no end-of-graph recompute,
    but outputs occupy memory from their first evaluation on).
    """
    limit = max_steps or 50 * problem.n + 1000
    try:
        stages = _Greedy(problem, budget, SCORES[score], limit, keep_outputs).run()
    except _Infeasible:
        return None
    seq = [v for st in stages for v in st]
    peak, cost = simulate_indexed(problem, seq)
    if peak > budget:  # the simulation is conservative, so this is a bug guard
        log.warning("greedy(%s) produced peak %d > budget %d; discarded", score, peak, budget)
        return None
    name = f"{score}+keep_outputs" if keep_outputs else score
    return GreedyResult(tuple(tuple(s) for s in stages), peak, cost, name)


def best_greedy(problem: RematProblem, budget: int) -> GreedyResult | None:
    """The cheapest schedule over all eviction rules (each run is O(steps x resident))."""
    best: GreedyResult | None = None
    for name, keep in itertools.product(SCORES, (True, False)):
        res = greedy_schedule(problem, budget, name, keep)
        log.debug("greedy %s: %s", name, None if res is None else (res.cost, res.peak))
        if res is not None and (best is None or res.cost < best.cost - 1e-9):
            best = res
    return best


class _Greedy:
    """One greedy run; state is the resident set and the first-evaluation frontier."""

    def __init__(
        self, problem: RematProblem, budget: int, score: Score, max_steps: int, keep_outputs: bool
    ) -> None:
        self.p = problem
        self.keep_outputs = keep_outputs
        self.budget = budget
        self.score = score
        self.max_steps = max_steps
        self.is_output = [not s for s in problem.succs]
        self.resident: set[int] = set()
        self.mem = 0
        self.steps = 0
        # next_first[v]: index into succs[v] of the first successor not yet evaluated once.
        self.next_first = [0] * problem.n
        self.pin = [0] * problem.n  # how many waiting evaluations read each value
        self.final = False  # in the final stage every resident output is pinned

    def run(self) -> list[list[int]]:
        stages: list[list[int]] = []
        for t in range(self.p.n):
            stages.append(self._stage(t))
        end_stage = [o for o in self.p.outputs if o not in self.resident]
        if end_stage:  # evicted outputs are recomputed at the end: one more "stage"
            stages.append(self._recompute_outputs(end_stage))
        return stages

    def _next_use(self, v: int, t: int, depth: int = 3) -> int:
        """Distance from stage t to the next read of v; 0 means v can be dropped.

        A read is a future first evaluation of a successor (outputs: the end), or,
        up to ``depth`` levels, the recomputation of an evicted successor that is still
        needed: keeping an evicted value's inputs is what keeps its recompute cheap.
        """
        succ = self.p.succs[v]
        k = self.next_first[v]
        while k < len(succ) and succ[k] <= t:
            k += 1
        self.next_first[v] = k
        best = succ[k] - t if k < len(succ) else (self.p.n - t + 1 if self.is_output[v] else 0)
        if depth:
            for w in succ[:k]:
                if w not in self.resident:
                    d = self._next_use(w, t, depth - 1)
                    if d and (not best or d < best):
                        best = d
        return best

    def _stage(self, t: int) -> list[int]:
        order = [*self._closure([t]), t]
        self._run_order(order, t)
        return order

    def _recompute_outputs(self, outs: list[int]) -> list[int]:
        """Bring evicted outputs back one at a time; resident outputs stay pinned."""
        order: list[int] = []
        self.final = True
        for o in outs:
            if o not in self.resident:
                part = [*self._closure([o]), o]
                self._run_order(part, self.p.n)
                order.extend(part)
        return order

    def _closure(self, roots: list[int]) -> list[int]:
        """Missing ancestors needed to evaluate ``roots``, in ascending (topological) index."""
        need: set[int] = set()
        stack = [u for r in roots for u in self.p.preds[r] if u not in self.resident]
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            stack.extend(u for u in self.p.preds[v] if u not in self.resident and u not in need)
        return sorted(need)

    def _run_order(self, order: list[int], t: int) -> None:
        """Evaluate ``order`` once each; a value is pinned while a later step here reads it."""
        p = self.p
        pin = self.pin
        for v in order:
            for u in p.preds[v]:
                pin[u] += 1
        for v in order:
            self.steps += 1
            if self.steps > self.max_steps:
                raise _Infeasible
            self._make_room(p.ram[v], t)
            self.resident.add(v)
            self.mem += p.ram[v]
            for u in p.preds[v]:
                pin[u] -= 1
            for u in (*p.preds[v], v):
                if u in self.resident and not pin[u] and not self.is_output[u]:
                    if self._next_use(u, t) == 0:
                        self.resident.discard(u)
                        self.mem -= p.ram[u]

    def _recompute_cost(self, v: int, memo: dict[int, float]) -> float:
        """Cost of bringing v back if evicted now: v plus, recursively, its missing inputs.

        A tree sum (shared ancestors count once per path) memoised over one eviction
        round: it overstates deep cascades, which is the point, they are what to avoid.
        """
        p = self.p
        got = memo.get(v)
        if got is not None:
            return got
        # iterative post-order over missing ancestors
        stack = [(v, False)]
        while stack:
            u, done = stack.pop()
            if u in memo:
                continue
            missing = [w for w in p.preds[u] if w not in self.resident]
            if done or all(w in memo for w in missing):
                memo[u] = min(1e30, p.cpu[u] + sum(memo[w] for w in missing))
                continue
            stack.append((u, True))
            stack.extend((w, False) for w in missing if w not in memo)
        return memo[v]

    def _make_room(self, need: int, t: int) -> None:
        """Evict unpinned residents, cheapest loss first, until ``need`` more bytes fit."""
        if self.mem + need <= self.budget:
            return
        p = self.p
        cands: list[tuple[tuple[bool, float], int]] = []
        memo: dict[int, float] = {}
        for v in self.resident:
            if self.pin[v] or (self.is_output[v] and (self.keep_outputs or self.final)):
                continue
            dist = self._next_use(v, t)
            if dist == 0:
                cands.append(((False, -1.0), v))  # dead value still resident: free first
                continue
            rc = self._recompute_cost(v, memo)
            # Evicting v keeps its inputs alive until v is recomputed: count only the
            # bytes that really go, and push cascades (missing inputs) to the back.
            held = sum(
                p.ram[u] for u in p.preds[v] if u in self.resident and not self._next_use(u, t, 0)
            )
            missing = any(u not in self.resident for u in p.preds[v])
            gain = p.ram[v] - held
            key = self.score(rc, max(gain, 1), dist)
            cands.append(((missing or gain <= 0, key), v))
        cands.sort()
        for _, v in cands:
            self.resident.discard(v)
            self.mem -= p.ram[v]
            if self.mem + need <= self.budget:
                return
        raise _Infeasible
