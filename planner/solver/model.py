"""The placement model in CP-SAT: one choice per gap, under the memory budget at
every step, minimizing added time (stalls, recomputation, (de)quantization).

Variables
    x[g, o] in {0, 1}: gap g takes option o; exactly one per gap.
    stall[t] >= 0: seconds step t waits on copies (in TIME_UNIT).
Constraints (each family in its own method)
    memory:   fixed[t] + sum_{g,o} x[g,o] * bytes_o(t) <= budget, at every step t
              where the sum could exceed the budget at all;
    channels: for each copy channel c and step t, the share of every chosen copy
              whose window covers t, sum x * load(t), <= seconds[t] + stall[t];
    home:     a persistent tensor kept on the device for good keeps every gap, and
              one fetched from a tier is fetched from that tier only; one stored
              quantized (``stored:F``), or fetched quantized (``qfetch:T``), is so
              in all its gaps;
    reload:   reading back an offloaded tensor without writing it again needs the
              previous gap to have written (or reloaded) it from the same tier;
    needs:    a recompute at step b needs each input kept on the device at b;
    delivery: on CUDA a gradient is delivered to the host only if its parameter's
              home is a tier (its ``.grad`` lives on the parameter's device); one
              not delivered to such a parameter is copied down at the end;
    write-back: a buffer's update (a key/value cache's) is written back to a tier
              exactly when the buffer is fetched from that tier.
Objective
    sum_t stall[t] + sum_{g,o} x[g,o] * (seconds_o + uncovered copy time_o)
    + the end's copies of gradients to parameters homed off the device.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from planner.solver.candidates import (
    DELIVER,
    HOME,
    KEEP,
    WHOLE_TENSOR_CHOICES,
    Candidates,
    Option,
    holder_gap,
    holdings,
    own_steps,
    parse_choice,
    transfer_load,
)
from planner.solver.interruptible import solve_interruptibly

log = logging.getLogger(__name__)

#: Seconds per time unit of the integer model.
TIME_UNIT = 1e-7


@dataclass
class ModelResult:
    status: str
    choices: list[str] | None  # per gap, the chosen option's name
    objective_seconds: float | None
    bound_seconds: float | None
    seconds: float


class PlacementModel:
    def __init__(self, cands: Candidates, minimize_peak: bool = False) -> None:
        """``minimize_peak``: find the lowest peak any plan reaches instead (the
        budget becomes a variable), to tell a caller the smallest budget."""
        self.cands = cands
        self.minimize_peak = minimize_peak
        self.problem = cands.problem
        self.model = cp_model.CpModel()
        self.x: list[dict[str, cp_model.IntVar]] = []
        self.stall: dict[int, cp_model.IntVar] = {}
        self.cost_terms: list = []
        self.peak: cp_model.IntVar | None = None
        self._add_choice_variables()
        self._add_memory_constraints()
        self._add_channel_constraints()
        self._add_home_constraints()
        self._add_reload_constraints()
        self._add_recompute_needs()
        self._add_delivery_constraints()
        self._add_write_back_constraints()
        if self.peak is not None:
            self.model.minimize(self.peak)
        else:
            self.model.minimize(sum(self.cost_terms) + sum(self.stall.values()))

    def _add_choice_variables(self) -> None:
        """x[g, o]; exactly one option per gap; direct costs into the objective."""
        for gi, gap in enumerate(self.cands.gaps):
            xs = {o.choice: self.model.new_bool_var(f"x{gi}_{o.choice}") for o in gap.options}
            # one variable per option: the memory rows index them in this order
            assert len(xs) == len(gap.options), f"gap {gi} repeats an option's name"
            self.model.add_exactly_one(xs.values())
            self.x.append(xs)
            for o in gap.options:
                cost = o.seconds + sum(transfer_load(self.problem, tr)[1] for tr in o.transfers)
                if cost > 0:
                    self.cost_terms.append(_time(cost) * xs[o.choice])

    def _add_memory_constraints(self) -> None:
        """Time-indexed rows where they stay small; on long graphs, where a row per
        step would repeat every long-lived gap at each step it spans, one
        cumulative constraint over optional intervals (Moccasin's formulation)."""
        size = sum(
            hi - lo + 1 for g in self.cands.gaps for o in g.options for lo, hi in _intervals(o, g)
        )
        if size > LINEAR_MEMORY_TERMS:
            self._add_memory_cumulative()
        else:
            self._add_memory_rows()

    def _add_memory_cumulative(self) -> None:
        """sum of the demands of the present intervals at any step <= the budget."""
        T = self.problem.num_steps
        fixed = self.cands.fixed
        intervals, demands = [], []
        start = 0
        for t in range(1, T + 1):
            if t == T or fixed[t] != fixed[start]:
                if fixed[start] > 0:
                    intervals.append(
                        self.model.new_fixed_size_interval_var(start, t - start, f"fixed{start}")
                    )
                    demands.append(int(fixed[start]))
                start = t
        for gi, gap in enumerate(self.cands.gaps):
            nbytes = self.problem.tensors[gap.tensor].nbytes
            for o in gap.options:
                var = self.x[gi][o.choice]
                for lo, hi, b in holdings(o, gap, nbytes):
                    intervals.append(
                        self.model.new_optional_fixed_size_interval_var(
                            lo, hi - lo + 1, var, f"m{gi}_{o.choice}_{lo}"
                        )
                    )
                    demands.append(int(b))
        if self.minimize_peak:
            top = sum(demands) + 1
            self.peak = self.model.new_int_var(0, top, "peak")
            capacity: int | cp_model.IntVar = self.peak
        else:
            capacity = self.problem.budget_bytes
        self.model.add_cumulative(intervals, demands, capacity)
        self.constrained_steps = T

    def _add_memory_rows(self) -> None:
        """One row per step; only steps whose worst case (every gap at its largest
        option) exceeds the budget can be violated, the others need none. Each row
        lists its terms gap by gap, option by option, as a loop over them would.

        Coefficients are bytes, as the validator counts them. They were once scaled
        to about two million units per problem, each term rounded up: a row's
        rounding added up to more than the slack a plan at the floor has, so at
        ``budget="min"`` CP-SAT was infeasible at once and the memory-minimizing
        baseline was kept (GPT-2 example, training: 0.96 s estimated per step
        against 0.39 s solved in bytes; measured side by side, the examples' steps
        took 0.61x (Llama) to 0.92x (U-Net) the time: benchmarks/min_budget_bench.py).
        Away from the floor the plans' estimates moved within the search's noise
        (0.3% either way on GPT-2 at 50-60%; the same on four other examples at 50%)."""
        T = self.problem.num_steps
        held = _held_by_step(self.cands, T)
        worst = np.asarray(self.cands.fixed, dtype=np.int64)
        if held.step.size:
            # a gap's options never all hold at once: its largest option's bytes
            new_gap = np.ones(held.step.size, dtype=bool)
            new_gap[1:] = (held.step[1:] != held.step[:-1]) | (held.gap[1:] != held.gap[:-1])
            starts = np.flatnonzero(new_gap)
            most = np.maximum.reduceat(held.nbytes, starts)
            worst += np.bincount(held.step[starts], weights=most, minlength=T).astype(np.int64)
        budget: int | cp_model.IntVar = self.problem.budget_bytes
        threshold = self.problem.budget_bytes
        if self.minimize_peak:
            top = int(worst.max(initial=0)) + 1
            self.peak = self.model.new_int_var(0, top, "peak")
            budget, threshold = self.peak, 0
        flat_vars = [x for xs in self.x for x in xs.values()]
        bounds = np.searchsorted(held.step, np.arange(T + 1))
        self.constrained_steps = 0
        for t in np.flatnonzero(worst > threshold).tolist():
            lo, hi = bounds[t], bounds[t + 1]
            expr = cp_model.LinearExpr.weighted_sum(
                [flat_vars[k] for k in held.option[lo:hi].tolist()], held.nbytes[lo:hi].tolist()
            )
            self.model.add(expr + int(self.cands.fixed[t]) <= budget)
            self.constrained_steps += 1

    def _add_channel_constraints(self) -> None:
        loads: dict[tuple[tuple[str, str], int], list] = defaultdict(list)
        steps = self.problem.steps
        for gi, gap in enumerate(self.cands.gaps):
            for o in gap.options:
                for tr in o.transfers:
                    shares, _ = transfer_load(self.problem, tr)
                    for t, share in enumerate(shares, start=tr.window[0]):
                        if share > 0:
                            loads[(tr.channel, t)].append((self.x[gi][o.choice], share))
        bound = _time(sum(self._bandwidth_free_total()))
        for (_, t), terms in loads.items():
            if t not in self.stall:
                self.stall[t] = self.model.new_int_var(0, bound, f"stall{t}")
            expr = cp_model.LinearExpr.weighted_sum(
                [v for v, _ in terms], [_time(share) for _, share in terms]
            )
            self.model.add(expr <= _time(steps[t].seconds) + self.stall[t])

    def _add_home_constraints(self) -> None:
        for tensor, home_gi in self.cands.home_gap.items():
            for choice, var in self.x[home_gi].items():
                if parse_choice(choice)[0] in WHOLE_TENSOR_CHOICES:  # every gap agrees
                    for gi in self.cands.gaps_of[tensor]:
                        if gi != home_gi:
                            self.model.add(self.x[gi][choice] == var)
            home = self.x[home_gi].get(HOME)
            if home is None:
                continue
            for gi in self.cands.gaps_of[tensor]:
                if gi == home_gi:
                    continue
                if KEEP in self.x[gi]:
                    self.model.add_implication(home, self.x[gi][KEEP])
                for choice, var in self.x[gi].items():
                    kind, tier = parse_choice(choice)
                    if kind == "fetch":  # only from the home tier
                        homes = [
                            v
                            for c, v in self.x[home_gi].items()
                            if parse_choice(c) == ("fetch", tier)
                        ]
                        if homes:
                            self.model.add(var <= cp_model.LinearExpr.sum(homes))
                        else:
                            self.model.add(var == 0)

    def _add_delivery_constraints(self) -> None:
        """deliver <= the parameter's home is a tier (any fetch option of its home
        gap); and a gradient not delivered to a parameter homed off the device costs
        its copy down at the end (``returned_to_host_seconds``): home off the device
        minus delivered, each 0 or 1."""
        for tensor in self.problem.tensors:
            param = tensor.delivery_needs_home_of
            home_gi = self.cands.home_gap.get(param) if param is not None else None
            if home_gi is None:
                continue
            off_device = [v for c, v in self.x[home_gi].items() if parse_choice(c)[0] == "fetch"]
            delivered = [
                var
                for gi in self.cands.gaps_of.get(tensor.index, ())
                for choice, var in self.x[gi].items()
                if parse_choice(choice)[0] == DELIVER
            ]
            for var in delivered:
                self.model.add(var <= cp_model.LinearExpr.sum(off_device))
            cost = _time(self.problem.bandwidths.returned_to_host_seconds(tensor.nbytes))
            if cost:
                self.cost_terms += [cost * v for v in off_device]
                self.cost_terms += [-cost * v for v in delivered]

    def _add_write_back_constraints(self) -> None:
        """A buffer's update written back (``writes_home_of``) goes to the tier the
        buffer is fetched from, exactly when it is fetched from one: per tier,
        written back == fetched. So it is kept to the end exactly when the buffer's
        home is the device, where it is the buffer's memory. An update used at the
        last step has no gap to leave in: its buffer stays at home on the device."""
        for tensor in self.problem.tensors:
            buffer = tensor.writes_home_of
            home_gi = self.cands.home_gap.get(buffer) if buffer is not None else None
            if home_gi is None:
                continue
            written: dict[str | None, list[cp_model.IntVar]] = defaultdict(list)
            for gi in self.cands.gaps_of.get(tensor.index, ()):
                for choice, var in self.x[gi].items():
                    kind, tier = parse_choice(choice)
                    if kind == DELIVER:
                        written[tier].append(var)
            fetched: dict[str | None, list[cp_model.IntVar]] = defaultdict(list)
            for choice, var in self.x[home_gi].items():
                kind, tier = parse_choice(choice)
                if kind == "fetch":
                    fetched[tier].append(var)
            for tier in set(written) | set(fetched):
                self.model.add(
                    cp_model.LinearExpr.sum(written[tier]) == cp_model.LinearExpr.sum(fetched[tier])
                )

    def _add_reload_constraints(self) -> None:
        for gaps in self.cands.gaps_of.values():
            previous = None
            for gi in gaps:
                for choice, var in self.x[gi].items():
                    kind, tier = parse_choice(choice)
                    if kind != "reload":
                        continue
                    sources: list[cp_model.IntVar] = []
                    if previous is not None:
                        for c, v in self.x[previous].items():
                            if parse_choice(c) in (("offload", tier), ("reload", tier)):
                                sources.append(v)
                    if sources:
                        self.model.add(var <= cp_model.LinearExpr.sum(sources))
                    else:
                        self.model.add(var == 0)
                previous = gi

    def _add_recompute_needs(self) -> None:
        """An input needed at step b is there if b is one of its own steps, if it
        is pinned, if the gap around b keeps it, or (weights outside their uses)
        if its home is the device."""
        T = self.problem.num_steps
        for gi, gap in enumerate(self.cands.gaps):
            if "recompute" not in self.x[gi]:
                continue
            var = self.x[gi]["recompute"]
            for r, step in gap.option("recompute").needs:
                tensor = self.problem.tensors[r]
                if step in own_steps(tensor, T) or tensor.pinned:
                    continue
                held_by = holder_gap(self.cands, r, step)
                holder = None
                if held_by is not None:
                    keeps = HOME if self.cands.gaps[held_by].start == -1 else KEEP
                    holder = self.x[held_by].get(keeps)
                if holder is None:
                    self.model.add(var == 0)
                else:
                    self.model.add_implication(var, holder)

    def _bandwidth_free_total(self) -> list[float]:
        return [s.seconds for s in self.problem.steps] + [
            self.problem.bandwidths.copy_seconds(tr.channel, tr.nbytes)
            for g in self.cands.gaps
            for o in g.options
            for tr in o.transfers
        ]

    def solve(
        self,
        time_limit: float,
        hint: list[str] | None = None,
        workers: int = 2,
        relative_gap: float = 0.002,
        wall_limit: float | None = None,
    ) -> ModelResult:
        """Solve within ``time_limit`` seconds of CP-SAT's deterministic time (a
        count of work, so the same problem gives the same plan however loaded the
        machine is), and ``wall_limit`` seconds of wall time (default: the same) as
        a backstop; where the backstop stops the search first (a busy machine), the
        plan depends on the load."""
        if hint is not None:
            for xs, choice in zip(self.x, hint):
                for c, v in xs.items():
                    self.model.add_hint(v, c == choice)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = wall_limit or time_limit
        solver.parameters.max_deterministic_time = time_limit
        solver.parameters.num_workers = workers
        # interleaved workers: the same portfolio, run deterministically
        solver.parameters.interleave_search = True
        solver.parameters.interleave_batch_size = INTERLEAVE_BATCH_SIZE
        solver.parameters.ignore_subsolvers.extend(IGNORED_SUBSOLVERS)
        solver.parameters.random_seed = 0
        solver.parameters.relative_gap_limit = relative_gap
        solver.parameters.log_search_progress = log.isEnabledFor(logging.DEBUG)
        start = time.perf_counter()
        callback = _Progress(start, peak=self.peak is not None)
        status = solve_interruptibly(solver, self.model, callback)  # Ctrl-C stops it
        elapsed = time.perf_counter() - start
        name = solver.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return ModelResult(name, None, None, None, elapsed)
        choices = [next(c for c, v in xs.items() if solver.value(v)) for xs in self.x]
        scale = 1 if self.peak is not None else TIME_UNIT
        return ModelResult(
            name,
            choices,
            solver.objective_value * scale,
            solver.best_objective_bound * scale,
            elapsed,
        )


class _Progress(cp_model.CpSolverSolutionCallback):
    """Logs each improving solution so long solves show progress: its added time,
    or, where the model minimizes the peak, its peak in bytes."""

    def __init__(self, start: float, peak: bool = False) -> None:
        super().__init__()
        self.start = start
        self.peak = peak

    def on_solution_callback(self) -> None:
        if self.peak:
            log.info(
                "solver: %.1fs incumbent peak %d bytes (bound %d)",
                time.perf_counter() - self.start,
                round(self.objective_value),
                round(self.best_objective_bound),
            )
            return
        log.info(
            "solver: %.1fs incumbent %.4fs added time (bound %.4fs)",
            time.perf_counter() - self.start,
            self.objective_value * TIME_UNIT,
            self.best_objective_bound * TIME_UNIT,
        )


#: Subsolver chunks per interleaved batch. CP-SAT's default (0: one per worker)
#: runs each batch to its end after the optimum is proven, and its chunks overran
#: the deterministic limit until the wall limit stopped them, so a plan depended on
#: the machine's load: problems proven optimal in 0.02-0.27 s took 0.6-2.0 s, and
#: GPT-2's training solves 1.4-2.0 s instead of 0.4-0.5 s, for the same plans.
INTERLEAVE_BATCH_SIZE = 1

#: Full-problem subsolvers left out of CP-SAT's portfolio. With batches of one
#: task the interleaved search runs its tasks one at a time, and a full
#: subsolver's task is a chunk of 1.0 deterministic seconds (fixed inside CP-SAT,
#: no parameter); a chunk of 'core', 'default_lp' or 'no_lp' took 2-6 s of wall
#: time here and improved nothing, and the optimum came from 'max_lp_sym', whose
#: turn came after all three. GPT-2 training at 50% waited 12-19 s for it, and on a
#: busy machine the wall limit cut the search first: plans of up to 34% more added
#: time, depending on the load. Without them, on 11 problems (the GPT-2, ResNet
#: and Llama examples at 42-75%, an 8-layer GPT-2, two synthetic graphs) the
#: optima were the same (one within the 0.2% gap; the 8-layer GPT-2 proven where
#: the full portfolio ran out of its 12 deterministic seconds), proven at 0.02-0.93
#: deterministic seconds instead of 0.23-4.0 on eight of them; 54% of the wall time
#: in all (one synthetic graph took 5.0 against 4.8 deterministic seconds).
IGNORED_SUBSOLVERS = ("core", "default_lp", "no_lp")

#: Above this many (step, option) terms, memory uses one cumulative constraint.
LINEAR_MEMORY_TERMS = 1_500_000


def _intervals(o: Option, gap) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return [(lo, hi) for lo, hi, _ in holdings(o, gap, 0)]


def _time(seconds: float) -> int:
    return int(math.ceil(seconds / TIME_UNIT))


@dataclass
class _StepHoldings:
    """Bytes each option holds, one entry per (step, option), sorted by step and
    then by option in gap-then-option order (``option`` indexes the model's
    variables flattened that way; ``gap`` is the option's gap)."""

    step: np.ndarray
    option: np.ndarray
    gap: np.ndarray
    nbytes: np.ndarray


def _held_by_step(cands: Candidates, T: int) -> _StepHoldings:
    """``holdings`` step by step, for every option at once (numpy): on long graphs a row per
    step repeats every long-lived gap at each step it spans (a million terms at
    4,500 steps), which a Python loop over them built in seconds."""
    option_ids, los, his, sizes = [], [], [], []
    gap_of_option: list[int] = []  # by the options' flat index
    for gi, gap in enumerate(cands.gaps):
        nbytes = cands.problem.tensors[gap.tensor].nbytes
        for o in gap.options:
            for lo, hi, b in holdings(o, gap, nbytes):
                option_ids.append(len(gap_of_option))
                los.append(max(lo, 0))
                his.append(min(hi, T - 1))
                sizes.append(b)
            gap_of_option.append(gi)
    k = max(len(gap_of_option), 1)
    starts = np.asarray(los, dtype=np.int64)
    lengths = np.maximum(np.asarray(his, dtype=np.int64) - starts + 1, 0)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = np.repeat(starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64) - first
    option = np.repeat(np.asarray(option_ids, dtype=np.int64), lengths)
    held = np.repeat(np.asarray(sizes, dtype=np.int64), lengths)
    # one entry per (step, option): an option's intervals may overlap
    keys, where = np.unique(step * k + option, return_inverse=True)
    summed = np.bincount(where, weights=held, minlength=keys.size).astype(np.int64)
    options = keys % k
    gaps = np.asarray(gap_of_option, dtype=np.int64)[options] if gap_of_option else options
    return _StepHoldings(keys // k, options, gaps, summed)
