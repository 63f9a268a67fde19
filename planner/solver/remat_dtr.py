"""Dynamic Tensor Rematerialization (Kirisame et al., 2021) as an offline simulation.

Why: the stage greedy in :mod:`remat_greedy` recomputes missing ancestors in index
order and evicts by a fixed rule; once a value it evicted needs ancestors that were
already freed, the recomputation cascades back to the graph inputs and it gets stuck.
DTR instead *walks* an evaluation order and, before computing a node, makes its
inputs resident by recursively recomputing the evicted ones (inputs are locked while
in use, so a recursion never evicts what it is building on). When memory runs out it
evicts the unlocked value whose loss is cheapest by a score ``h``; the default score
is DTR's ``e*`` estimate: the cost of recomputing the value *together with every
non-resident ancestor it would need*, per byte, per unit of staleness. Because every
recomputation is explicit in the trace, any run that finishes is a valid schedule.

Liveness is tracked by a reference count that also counts *evicted* readers: a value
is needed while some successor has not run yet, or it is an output, or an evicted
successor that is still needed would have to be recomputed from it. Values that are
not needed are freed at once at no cost; evicting a needed value is what costs.
"""

from __future__ import annotations

import heapq
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from planner.solver.remat_problem import RematProblem, simulate_indexed

log = logging.getLogger(__name__)

# eviction scores: (name, staleness measure); see _Dtr._score.
HEURISTICS: tuple[str, ...] = ("estar", "estar_next", "local", "local_next", "size_next")
COST_CAP = 1e18  # recompute estimates above this are treated as "never evict"


@dataclass(frozen=True)
class DtrResult:
    """One simulated schedule: indexed node sequence, its replayed peak and cost."""

    sequence: tuple[int, ...]
    peak: int
    cost: float
    name: str


class _Stuck(Exception):
    """Every resident value that could be evicted is locked, or the step cap is hit."""


def dtr_schedule(
    problem: RematProblem,
    budget: int,
    order: Sequence[int] | None = None,
    heuristic: str = "estar",
    max_steps: int = 0,
) -> DtrResult | None:
    """Simulate DTR over ``order`` (first evaluations; default: index order); None if stuck."""
    order = list(range(problem.n)) if order is None else list(order)
    limit = max_steps or 40 * problem.n + 1000
    sim = _Dtr(problem, budget, order, heuristic, limit)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 4 * problem.n + 2000))
    try:
        seq = sim.run()
    except _Stuck:
        return None
    finally:
        sys.setrecursionlimit(old)
    peak, cost = simulate_indexed(problem, seq)
    if peak > budget:  # the simulation over-approximates memory: this is a bug guard
        log.warning("dtr(%s) replayed peak %d > budget %d; discarded", heuristic, peak, budget)
        return None
    return DtrResult(tuple(seq), peak, cost, heuristic)


class _Dtr:
    """One DTR run. ``ref[v]`` counts reasons to keep v (see the module docstring)."""

    def __init__(
        self, problem: RematProblem, budget: int, order: list[int], heuristic: str, limit: int
    ) -> None:
        p = problem
        self.p = p
        self.budget = budget
        self.order = order
        self.heuristic = heuristic
        self.limit = limit
        n = p.n
        self.pos = [0] * n  # position of each node's first evaluation in ``order``
        for k, v in enumerate(order):
            self.pos[v] = k
        self.is_output = [not s for s in p.succs]
        self.resident = [False] * n
        self.computed = [False] * n
        self.lock = [0] * n
        self.last_use = [0] * n
        self.pending = [len(s) for s in p.succs]  # successors not yet evaluated once
        self.ref = [self.pending[v] + self.is_output[v] for v in range(n)]
        self.contrib = [False] * n  # v is evicted, needed, and so holds a ref on its preds
        # first-evaluation positions of each node's successors, for "next use" distance
        self.succ_pos = [sorted(self.pos[w] for w in p.succs[v]) for v in range(n)]
        self.next_k = [0] * n
        self.res_set: set[int] = set()
        self.mem = 0
        self.clock = 0
        self.now = 0  # position in ``order`` of the node being evaluated for the first time
        self.seq: list[int] = []
        self.final = False

    # ---- public driver ---------------------------------------------------------------

    def run(self) -> list[int]:
        for k, v in enumerate(self.order):
            self.now = k
            self._materialize(v)
            self._release_dead(v)
        self.final = True
        self.now = len(self.order)
        for o in range(self.p.n):  # outputs stay resident to the end: lock them
            if self.is_output[o] and self.resident[o]:
                self.lock[o] += 1
        for o in range(self.p.n):
            if self.is_output[o] and not self.resident[o]:
                self._materialize(o)
                self.lock[o] += 1
        return self.seq

    # ---- evaluation ----------------------------------------------------------------------

    def _materialize(self, v: int) -> None:
        """Make v resident: inputs first (recursively, each locked once resident)."""
        p = self.p
        for u in p.preds[v]:
            if not self.resident[u]:
                self._materialize(u)
            self.lock[u] += 1
            self.clock += 1
            self.last_use[u] = self.clock
        self._make_room(p.ram[v])
        self.seq.append(v)
        if len(self.seq) > self.limit:
            raise _Stuck
        self._set_resident(v)
        self.clock += 1
        self.last_use[v] = self.clock
        if not self.computed[v]:
            self.computed[v] = True
            for u in p.preds[v]:
                self.pending[u] -= 1
                self._deref(u)
        for u in p.preds[v]:
            self.lock[u] -= 1
        for u in p.preds[v]:
            self._release_dead(u)

    def _release_dead(self, v: int) -> None:
        if self.resident[v] and self.ref[v] <= 0 and not self.lock[v]:
            self._unset_resident(v)

    # ---- reference counting ----------------------------------------------------------------

    def _set_resident(self, v: int) -> None:
        self.resident[v] = True
        self.res_set.add(v)
        self.mem += self.p.ram[v]
        if self.contrib[v]:  # an evicted, needed value is back: its inputs lose a reason
            self.contrib[v] = False
            for u in self.p.preds[v]:
                self._deref(u)

    def _unset_resident(self, v: int) -> None:
        self.resident[v] = False
        self.res_set.discard(v)
        self.mem -= self.p.ram[v]
        if self.ref[v] > 0:  # evicting a needed value: recomputing it will read its inputs
            self.contrib[v] = True
            for u in self.p.preds[v]:
                self._addref(u)

    def _addref(self, u: int) -> None:
        stack = [u]
        while stack:
            w = stack.pop()
            self.ref[w] += 1
            if self.ref[w] == 1 and self.computed[w] and not self.resident[w]:
                self.contrib[w] = True
                stack.extend(self.p.preds[w])

    def _deref(self, u: int) -> None:
        stack = [u]
        while stack:
            w = stack.pop()
            self.ref[w] -= 1
            if self.ref[w] > 0:
                continue
            if self.resident[w]:
                if not self.lock[w]:
                    self._unset_resident(w)
            elif self.contrib[w]:
                self.contrib[w] = False
                stack.extend(self.p.preds[w])

    # ---- eviction ------------------------------------------------------------------------

    def _next_use(self, v: int) -> int:
        """Steps (in first-evaluation positions) until a not-yet-run successor of v runs."""
        sp = self.succ_pos[v]
        k = self.next_k[v]
        while k < len(sp) and sp[k] <= self.now:
            k += 1
        self.next_k[v] = k
        if k < len(sp):
            return sp[k] - self.now
        return len(self.order) - self.now + 1  # only outputs / remat reads remain

    def _recompute_cost(self, v: int, memo: dict[int, float]) -> float:
        """``e*``-style cost of v: v plus its non-resident ancestors (memoised tree sum)."""
        got = memo.get(v)
        if got is not None:
            return got
        p = self.p
        stack: list[tuple[int, bool]] = [(v, False)]
        while stack:
            u, expanded = stack.pop()
            if u in memo:
                continue
            missing = [w for w in p.preds[u] if not self.resident[w]]
            if expanded or all(w in memo for w in missing):
                memo[u] = min(COST_CAP, p.cpu[u] + sum(memo[w] for w in missing))
                continue
            stack.append((u, True))
            stack.extend((w, False) for w in missing if w not in memo)
        return memo[v]

    def _score(self, v: int, memo: dict[int, float]) -> float:
        p = self.p
        h = self.heuristic
        if h.startswith("estar"):
            cost = self._recompute_cost(v, memo)
        elif h.startswith("local"):
            cost = p.cpu[v] + sum(COST_CAP for u in p.preds[v] if not self.resident[u])
        else:
            cost = 1.0
        if h.endswith("_next"):
            far = float(self._next_use(v))  # Belady: the order is known in advance
        else:
            far = float(self.clock - self.last_use[v] + 1)  # DTR's staleness
        return cost / (max(p.ram[v], 1) * far)

    def _make_room(self, need: int) -> None:
        """Evict unlocked residents, lowest score first, until ``need`` more bytes fit."""
        if self.mem + need <= self.budget:
            return
        memo: dict[int, float] = {}
        heap: list[tuple[float, int]] = []
        for v in self.res_set:
            if self.lock[v] or (self.final and self.is_output[v]):
                continue
            heap.append((self._score(v, memo), v))
        heapq.heapify(heap)
        while self.mem + need > self.budget:
            if not heap:
                raise _Stuck
            _, v = heapq.heappop(heap)
            self._unset_resident(v)
