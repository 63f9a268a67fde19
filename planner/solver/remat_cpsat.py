"""Checkmate's R/S formulation of rematerialization as a CP-SAT model.

Stage t (0..n-1) is the first evaluation of node t in the fixed topological order;
stage n evaluates a virtual sink that reads every output, which is how "outputs stay
resident until the end" enters the model. Within a stage nodes run in ascending
index. With every candidate allowed (``exact``) the optimum is the optimum of the
fixed-order formulation; the default path restricts ``R[t]`` to a window of recent
ancestors plus what the greedy used, which shrinks the model by an order of
magnitude and keeps the greedy schedule feasible, so it can only improve on it.

Variables (all boolean unless said):
  R[t,i]  node i is evaluated in stage t            (i in cand[t])
  S[t,i]  value i is resident across the start of stage t   (i < t)
  F[t,i,k] value i is freed right after step k of stage t (k reads i, or k == i)
  L[t,i,a] some reader of i after its a-th in-stage reader runs (suffix OR)
  U[t,k]  integer: bytes resident while step k of stage t runs
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from planner.solver.interruptible import solve_interruptibly
from planner.solver.remat_problem import RematProblem

log = logging.getLogger(__name__)

COST_SCALE = 10_000  # the largest node cost becomes this many integer units


@dataclass(frozen=True)
class CpSatConfig:
    """How to solve: limits and seeds (fixed so that results repeat)."""

    time_limit: float = 30.0
    num_workers: int = 2
    random_seed: int = 0
    relative_gap: float = 0.0
    log_search: bool = False
    # CP-SAT's deterministic time (about seconds, independent of machine load): a
    # limit that makes a capped solve return the same schedule on every run.
    deterministic_time: float | None = None


@dataclass(frozen=True)
class CpSatResult:
    stages: tuple[tuple[int, ...], ...]  # without the virtual sink
    status: str
    objective: float  # in the problem's cost units (rescaled)
    bound: float
    seconds: float


class CheckmateModel:
    """One CP-SAT model; each constraint family is added by its own ``_add_...`` method."""

    def __init__(
        self,
        problem: RematProblem,
        budget: int,
        cand: Sequence[Sequence[int]],
    ) -> None:
        self.p = problem
        n = problem.n
        self.n = n
        self.sink = n
        self.preds: list[tuple[int, ...]] = [*problem.preds, problem.outputs]
        self.succs: list[tuple[int, ...]] = [s if s else (n,) for s in problem.succs] + [()]
        unit = math.gcd(*problem.ram, budget) or 1
        self.ram = [r // unit for r in problem.ram] + [0]
        self.cap = budget // unit
        top = max(problem.cpu, default=1.0) or 1.0
        self.cost_unit = top / COST_SCALE
        self.cpu = [round(c / self.cost_unit) for c in problem.cpu] + [0]
        self.cand = [sorted({*c, t}) for t, c in enumerate(cand)]
        assert len(self.cand) == n + 1
        self.m = cp_model.CpModel()
        self.R: list[dict[int, cp_model.IntVar]] = []
        self.S: list[dict[int, cp_model.IntVar]] = []
        self.U: list[dict[int, cp_model.IntVar]] = []
        self.F: dict[tuple[int, int, int], cp_model.IntVar] = {}
        self.L: dict[tuple[int, int, int], cp_model.IntVar] = {}
        self._add_variables()
        self._add_dependencies()
        self._add_retention()
        self._add_memory()
        self._add_objective()

    def _add_variables(self) -> None:
        """R on candidates, R[t,t] = 1; S[t,i] only where some later-allowed reader exists."""
        last_r = [-1] * (self.n + 1)
        for t, c in enumerate(self.cand):
            for i in c:
                last_r[i] = t
        for t, c in enumerate(self.cand):
            r = {i: self.m.new_bool_var(f"R{t}_{i}") for i in c}
            self.m.add(r[t] == 1)
            self.R.append(r)
            s = {}
            for i in range(t):
                if any(last_r[j] >= t for j in self.succs[i]):
                    s[i] = self.m.new_bool_var(f"S{t}_{i}")
            self.S.append(s)

    def _add_dependencies(self) -> None:
        """R[t,j] <= R[t,i] + S[t,i] for every edge i -> j: inputs are resident when j runs."""
        for t in range(self.n + 1):
            r, s = self.R[t], self.S[t]
            for j in self.cand[t]:
                for i in self.preds[j]:
                    terms = [v for v in (r.get(i), s.get(i)) if v is not None]
                    if not terms:
                        self.m.add(r[j] == 0)
                    else:
                        self.m.add(r[j] <= sum(terms))

    def _add_retention(self) -> None:
        """S[t+1,i] <= R[t,i] + S[t,i]: a value crosses a stage boundary only if it exists."""
        for t in range(self.n):
            for i, s_next in self.S[t + 1].items():
                terms = [v for v in (self.R[t].get(i), self.S[t].get(i)) if v is not None]
                if not terms:
                    self.m.add(s_next == 0)
                else:
                    self.m.add(s_next <= sum(terms))

    def _add_memory(self) -> None:
        """U[t,k] = U[t,k-] - freed(k-) + ram_k R[t,k] <= budget, U[t,first] counts S[t].

        freed(k) = sum over i in preds(k)+{k} of ram_i F[t,i,k], with F allowed only
        when k runs, no later in-stage reader of i runs (L) and i is not kept into
        stage t+1. The constraints are one-sided: freeing less only overestimates
        memory, and the budget pushes F up where it is legal.
        """
        m = self.m
        for t in range(self.n + 1):
            r, s = self.R[t], self.S[t]
            s_next = self.S[t + 1] if t < self.n else {}
            # F variables per (reader position k, value i)
            freed: dict[int, list[tuple[int, cp_model.IntVar]]] = {k: [] for k in self.cand[t]}
            values = set(r) | set(s)
            for i in sorted(values):
                readers = [j for j in self.succs[i] if j in r]
                later: list[cp_model.IntVar | None] = [None] * (len(readers) + 1)
                # later[a] = OR of R over readers[a:], built as a suffix chain
                for a in range(len(readers) - 1, -1, -1):
                    v = m.new_bool_var(f"L{t}_{i}_{a}")
                    self.L[(t, i, a)] = v
                    m.add(v >= r[readers[a]])
                    if later[a + 1] is not None:
                        m.add(v >= later[a + 1])
                    later[a] = v
                points = ([(i, 0)] if i in r else []) + [(k, a + 1) for a, k in enumerate(readers)]
                for k, a in points:
                    f = m.new_bool_var(f"F{t}_{i}_{k}")
                    self.F[(t, i, k)] = f
                    m.add(f <= r[k])
                    other = later[a]
                    if other is not None:
                        m.add(f + other <= 1)
                    if i in s_next:
                        m.add(f + s_next[i] <= 1)
                    freed[k].append((i, f))
            u_row: dict[int, cp_model.IntVar] = {}
            prev: int | None = None
            for k in self.cand[t]:
                u = m.new_int_var(0, self.cap, f"U{t}_{k}")
                if prev is None:
                    m.add(u == sum(self.ram[i] * v for i, v in s.items()) + self.ram[k] * r[k])
                else:
                    rel = sum(self.ram[i] * f for i, f in freed[prev])
                    m.add(u == u_row[prev] - rel + self.ram[k] * r[k])
                u_row[k] = u
                prev = k
            self.U.append(u_row)

    def _add_objective(self) -> None:
        """Minimize total compute: every R[t,i] costs node i's (integer-scaled) cost."""
        self.m.minimize(sum(self.cpu[i] * v for r in self.R for i, v in r.items() if self.cpu[i]))

    def add_hint(self, stages: Sequence[Sequence[int]]) -> bool:
        """Hint a complete solution derived from a stage schedule; False if it is infeasible."""
        sol = _assignment(self, stages)
        if sol is None:
            return False
        for var, val in sol.items():
            self.m.add_hint(var, val)
        return True

    def solve(self, cfg: CpSatConfig) -> CpSatResult:
        solver = cp_model.CpSolver()
        prm = solver.parameters
        prm.max_time_in_seconds = max(0.05, cfg.time_limit)
        prm.num_workers = cfg.num_workers
        prm.random_seed = cfg.random_seed
        prm.interleave_search = cfg.num_workers > 1  # deterministic parallel search
        prm.relative_gap_limit = cfg.relative_gap
        prm.log_search_progress = cfg.log_search
        if cfg.deterministic_time is not None:
            prm.max_deterministic_time = cfg.deterministic_time
        t0 = time.perf_counter()
        code = solve_interruptibly(solver, self.m)  # Ctrl-C stops it
        secs = time.perf_counter() - t0
        status = solver.status_name(code)
        if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return CpSatResult((), status, math.inf, solver.best_objective_bound, secs)
        stages = tuple(
            tuple(i for i in self.cand[t] if i != self.sink and solver.value(self.R[t][i]))
            for t in range(self.n + 1)
        )
        return CpSatResult(
            stages,
            status,
            solver.objective_value * self.cost_unit,
            solver.best_objective_bound * self.cost_unit,
            secs,
        )

    def num_vars(self) -> int:
        return len(self.m.proto.variables)


def _assignment(model: CheckmateModel, stages: Sequence[Sequence[int]]) -> dict | None:
    """Values of every model variable for a stage schedule (greedy output), or None."""
    n = model.n
    run = [set(st) for st in stages[:n]]
    run.append(set(stages[n]) if len(stages) > n else set())
    run[n].add(n)
    for t in range(n + 1):
        if not run[t] <= set(model.R[t]):
            return None
    # S from reads: a read in stage t_r not served in-stage is served by the last copy.
    keep: list[set[int]] = [set() for _ in range(n + 1)]
    last_copy = [-1] * (n + 1)
    for t in range(n + 1):
        for j in sorted(run[t]):
            for i in model.preds[j]:
                if i in run[t]:
                    continue
                if last_copy[i] < 0:
                    return None
                for tt in range(last_copy[i] + 1, t + 1):
                    keep[tt].add(i)
        for j in run[t]:
            last_copy[j] = t
    sol: dict = {}
    for t in range(n + 1):
        for i, v in model.R[t].items():
            sol[v] = int(i in run[t])
        for i, v in model.S[t].items():
            sol[v] = int(i in keep[t])
        if not keep[t] <= set(model.S[t]):
            return None
    # L, F, U by their exact definitions
    for (t, i, a), v in model.L.items():
        readers = [j for j in model.succs[i] if j in model.R[t]]
        sol[v] = int(any(j in run[t] for j in readers[a:]))
    for t in range(n + 1):
        u = sum(model.ram[i] for i in keep[t])
        freed_prev = 0
        for k in model.cand[t]:
            u = u - freed_prev + model.ram[k] * (k in run[t])
            if u > model.cap:
                log.debug("hint exceeds memory at stage %d step %d", t, k)
                return None
            sol[model.U[t][k]] = u
            freed_prev = 0
            for i in [*model.preds[k], k]:
                f = model.F.get((t, i, k))
                if f is None:
                    continue
                readers_after = any(j in run[t] and j > k for j in model.succs[i])
                kept = i in keep[t + 1] if t < n else False
                val = int(k in run[t] and not readers_after and not kept)
                sol[f] = val
                freed_prev += model.ram[i] * val
    return sol
