"""Baselines in the same cost model, each a list of choices (one per gap).

- ``keep_all``: nothing moves (the unplanned run);
- ``recompute_all``: every value that can be recomputed from kept inputs is
  dropped and recomputed before its next use (checkpointing every op boundary it
  can, like selective activation checkpointing);
- ``offload_weights``: every weight lives in the slowest tier and is prefetched
  before each use (HF Accelerate's disk offload);
- ``greedy``: starting from keep-all, repeatedly take the move that frees the most
  bytes at the current peak step per second of time it adds (including the copy
  channels' congestion), until the budget holds. With ``budget=0`` it minimizes
  memory instead, which gives the smallest budget we can plan for.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from planner.solver.candidates import (
    HOME,
    KEEP,
    WHOLE_TENSOR_CHOICES,
    Candidates,
    Gap,
    Option,
    holder_gap,
    holdings,
    own_steps,
    parse_choice,
    partner_choice,
    transfer_load,
)

Choices = list[str]


def keep_all(cands: Candidates) -> Choices:
    """Everything kept where it is: weights at home (the device, unless a fixed
    home says a tier: ``Problem.fixed_homes``), a cache's update with its buffer."""
    choices = [_default(g) for g in cands.gaps]
    for tensor, home_gi in cands.home_gap.items():  # a fixed quantized home: every gap
        if parse_choice(choices[home_gi])[0] in WHOLE_TENSOR_CHOICES:
            for gi in cands.gaps_of[tensor]:
                if _has(cands.gaps[gi], choices[home_gi]):
                    choices[gi] = choices[home_gi]
    for gi, other in cands.partners.items():
        if cands.gaps[gi].start == -1:  # a buffer's home decides its update's last gap
            follow = partner_choice(cands, gi, choices[gi])
            if follow is not None:
                choices[other] = follow
    return choices


def recompute_all(cands: Candidates) -> Choices:
    choices = keep_all(cands)
    locked: set[int] = set()
    for gi, gap in enumerate(cands.gaps):
        if gi in locked or not _has(gap, "recompute"):
            continue
        holders = _holders(cands, gap.option("recompute"))
        if holders is None or any(choices[h] != _default(cands.gaps[h]) for h in holders):
            continue
        if gi in holders:
            continue
        choices[gi] = "recompute"
        locked.update(holders)
    return choices


def offload_weights(cands: Candidates) -> Choices:
    tier = cands.problem.tiers[-1]  # the slowest
    choices = keep_all(cands)
    for tensor, home_gi in cands.home_gap.items():
        fetch = f"fetch:{tier}"
        # a cache: its update written back to the tier, if it can be
        written_back = partner_choice(cands, home_gi, fetch)
        if not _has(cands.gaps[home_gi], fetch) or (
            home_gi in cands.partners and written_back is None
        ):
            continue
        choices[home_gi] = fetch
        for gi in cands.gaps_of[tensor]:
            if gi != home_gi and _has(cands.gaps[gi], fetch):
                choices[gi] = fetch
        if written_back is not None:
            choices[cands.partners[home_gi]] = written_back
    return choices


def greedy(cands: Candidates, budget: int | None = None, deadline: float | None = None) -> Choices:
    """Greedy descent on the peak. ``budget`` defaults to the problem's; 0 means
    "as low as it goes" (ties broken by added time). ``deadline``
    (``time.perf_counter()`` value): stop there with what it has."""
    import time

    target = cands.problem.budget_bytes if budget is None else budget
    state = _GreedyState(cands)
    for _ in range(4 * len(cands.gaps) + 1):
        if deadline is not None and time.perf_counter() > deadline:
            break
        t = int(np.argmax(state.memory))
        if state.memory[t] <= target:
            break
        move = state.best_move(t, minimize_memory=target == 0)
        if move is None:
            break
        state.apply(*move)
    return state.choices


class _GreedyState:
    def __init__(self, cands: Candidates) -> None:
        self.cands = cands
        self.problem = cands.problem
        self._contrib_cache: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
        self._transfer_cache: dict[tuple[int, str], list] = {}
        T = self.problem.num_steps
        self.seconds = np.array([s.seconds for s in self.problem.steps], dtype=float)
        self.choices = keep_all(cands)
        self.locked: set[int] = set()
        self.memory = np.array(cands.fixed, dtype=np.int64)
        self.loads: dict[tuple[str, str], np.ndarray] = {}
        # each gap's overall span (over all its options): the gaps a move at step t
        # can change are those whose span contains t
        self.gap_lo = np.full(len(cands.gaps), T, dtype=np.int64)
        self.gap_hi = np.full(len(cands.gaps), -1, dtype=np.int64)
        self._moves = _MoveCache(self)
        for gi, gap in enumerate(cands.gaps):
            self._add(gi, gap.option(self.choices[gi]), +1)
            for o in gap.options:
                for lo, hi, _ in self._contribution(gi, o):
                    self.gap_lo[gi] = min(self.gap_lo[gi], lo)
                    self.gap_hi[gi] = max(self.gap_hi[gi], hi)

    def _contribution(self, gi: int, option: Option) -> list[tuple[int, int, int]]:
        """(lo, hi, bytes) intervals this option holds (cached: options are fixed)."""
        key = (gi, option.choice)
        cached = self._contrib_cache.get(key)
        if cached is None:
            cached = self._contrib_cache[key] = self._compute_contribution(gi, option)
        return cached

    def _compute_contribution(self, gi: int, option: Option) -> list[tuple[int, int, int]]:
        gap = self.cands.gaps[gi]
        return holdings(option, gap, self.problem.tensors[gap.tensor].nbytes)

    def _add(self, gi: int, option: Option, sign: int) -> None:
        for lo, hi, b in self._contribution(gi, option):
            self.memory[lo : hi + 1] += sign * b
        for channel, lo, hi, shares, _ in self._transfers(gi, option):
            if shares is not None:
                load = self.loads.setdefault(channel, np.zeros(self.problem.num_steps))
                load[lo : hi + 1] += sign * shares
                self._moves.loads_changed(channel, lo, hi)

    def _transfers(self, gi: int, option: Option) -> list:
        """Per transfer: channel, window, its load shares (None if it loads no step)
        and the uncovered seconds (``transfer_load``'s facts, cached)."""
        key = (gi, option.choice)
        cached = self._transfer_cache.get(key)
        if cached is None:
            cached = []
            for tr in option.transfers:
                shares, uncovered = transfer_load(self.problem, tr)
                lo, hi = tr.window
                array = np.array(shares) if shares else None
                cached.append((tr.channel, lo, hi, array, uncovered))
            self._transfer_cache[key] = cached
        return cached

    def _added_time(self, gi: int, option: Option) -> float:
        cost = option.seconds
        for channel, lo, hi, shares, uncovered in self._transfers(gi, option):
            cost += uncovered
            if shares is not None:
                load = self.loads.get(channel)
                if load is None:
                    continue  # an idle channel: the window hides the copy
                window = load[lo : hi + 1]
                secs = self.seconds[lo : hi + 1]
                before = np.maximum(window - secs, 0).sum()
                after = np.maximum(window + shares - secs, 0).sum()
                cost += float(after - before)
        return cost

    def _held_at(self, gi: int, option: Option, t: int) -> int:
        return sum(b for lo, hi, b in self._contribution(gi, option) if lo <= t <= hi)

    def best_move(self, t: int, minimize_memory: bool) -> tuple[int, str] | None:
        """The move with the best score at peak step ``t``: bytes freed there per
        second added (or, minimizing memory, bytes freed with time breaking ties);
        the lowest gap, then the first option, wins a tie."""
        return self._moves.best(t, minimize_memory)

    def gap_best(
        self, gi: int, t: int, minimize_memory: bool, facts: dict[str, float | None]
    ) -> tuple[float, str] | None:
        """Gap ``gi``'s best move at step ``t`` (score, choice), None if it has none.
        ``facts`` caches what does not depend on ``t``: per choice, its added time,
        None where it is not allowed."""
        best: tuple[float, str] | None = None
        gap = self.cands.gaps[gi]
        current = gap.option(self.choices[gi])
        held = self._held_at(gi, current, t)
        for option in self.open_moves(gi):
            saved = held - self._held_at(gi, option, t)
            if parse_choice(option.choice)[0] in WHOLE_TENSOR_CHOICES:  # all its gaps
                saved += sum(
                    self._held_at(g, self.cands.gaps[g].option(self.choices[g]), t)
                    for g in self.cands.gaps_of[gap.tensor]
                    if g != gi
                )
            if saved <= 0:
                continue
            cost = self.move_cost(gi, option.choice, facts)
            if cost is None:
                continue
            score = saved / (cost + 1e-9) if not minimize_memory else saved - cost * 1e-3
            if best is None or score > best[0]:
                best = (score, option.choice)
        return best

    def open_moves(self, gi: int) -> list[Option]:
        """The options gap ``gi`` may move to from its current choice."""
        gap = self.cands.gaps[gi]
        current = self.choices[gi]
        if current in (KEEP, HOME):
            if gi in self.locked:
                return []
            return [o for o in gap.options if o.choice != current]
        # a move already made may still turn into its late-read variant
        return [o for o in gap.options if o.choice == current + ":late"]

    def move_cost(self, gi: int, choice: str, facts: dict[str, float | None]) -> float | None:
        """The seconds moving gap ``gi`` to ``choice`` adds, None where it is not
        allowed; kept in ``facts`` (it does not depend on the peak step)."""
        if choice not in facts:
            gap = self.cands.gaps[gi]
            option = gap.option(choice)
            allowed = self._allowed(gi, gap, option)
            facts[choice] = self._added_time(gi, option) if allowed else None
        return facts[choice]

    def _allowed(self, gi: int, gap: Gap, option: Option) -> bool:
        if not self._partner_allows(gi, option.choice):
            return False
        kind, tier = parse_choice(option.choice)
        own = self.cands.gaps_of[gap.tensor]
        if kind == "reload":
            pos = own.index(gi)
            previous = parse_choice(self.choices[own[pos - 1]])
            return pos > 0 and previous in (("offload", tier), ("reload", tier))
        if kind == "fetch" and gap.start >= 0:
            # allowed if the home is that tier already, or can move there with it
            home = self.cands.home_gap.get(gap.tensor)
            return home is not None and (
                parse_choice(self.choices[home]) == ("fetch", tier)
                or (
                    self.choices[home] == HOME
                    and home not in self.locked
                    and _has(self.cands.gaps[home], option.choice)
                )
            )
        if kind == "fetch" and gap.start == -1:
            return True
        if kind in WHOLE_TENSOR_CHOICES:  # on the home gap for all the tensor's gaps at once
            own = self.cands.gaps_of[gap.tensor]
            return gap.start == -1 and all(
                g not in self.locked and self.choices[g] == _default(self.cands.gaps[g])
                for g in own
            )
        if kind == "recompute":
            holders = _holders(self.cands, option)
            return (
                holders is not None
                and gi not in holders
                and all(self.choices[h] == _default(self.cands.gaps[h]) for h in holders)
            )
        return True

    def _partner_allows(self, gi: int, choice: str) -> bool:
        """A buffer updated in place and its update move together
        (``partner_choice``): a choice is open if the partner can follow."""
        other = self.cands.partners.get(gi)
        if other is None:
            return True
        follow = partner_choice(self.cands, gi, choice)
        return follow is not None and (self.choices[other] == follow or other not in self.locked)

    def apply(self, gi: int, choice: str) -> None:
        gap = self.cands.gaps[gi]
        home = self.cands.home_gap.get(gap.tensor)
        if (
            choice.startswith("fetch:")
            and gap.start >= 0
            and home is not None
            and self.choices[home] == HOME
        ):
            self.apply(home, choice)  # a weight fetched between uses lives in that tier
        if parse_choice(choice)[0] in WHOLE_TENSOR_CHOICES and gap.start == -1:
            for g in self.cands.gaps_of[gap.tensor]:
                if g != gi:
                    self.apply(g, choice)
        self._add(gi, gap.option(self.choices[gi]), -1)
        self.choices[gi] = choice
        option = gap.option(choice)
        self._add(gi, option, +1)
        self.locked.add(gi)
        self._moves.touched(gi)
        if choice == "recompute":
            for h in _holders(self.cands, option) or ():
                self.locked.add(h)
                self._moves.touched(h)
        other = self.cands.partners.get(gi)
        follow = partner_choice(self.cands, gi, choice)
        if other is not None and follow is not None and self.choices[other] != follow:
            self.apply(other, follow)


class _MoveCache:
    """Each gap's best move at the current peak step, re-evaluated only where a
    move made since can have changed it (and, when the peak step moves, with the
    added times and permissions kept from before). The peak step stays the same
    for most moves (a 2,000-step chain: 2 steps in 386 moves), and evaluating
    every gap that spans it for every move cost 70 ms a move there (27 of the
    29 s that ``solve`` took). A gap's best move reads: its own choice and lock; those of
    its tensor's other gaps (reload, fetch, whole-tensor moves); its partner's;
    those of its recomputes' holders; and the channel loads over its transfers'
    windows. A change to any of these marks it stale."""

    def __init__(self, state: _GreedyState) -> None:
        self.state = state
        cands = state.cands
        self.t: int | None = None  # the peak step the budget descent's scores are for
        self.spanning = np.zeros(0, dtype=np.int64)
        self.position: dict[int, int] = {}  # spanning gap -> its index there
        self.scores = np.zeros(0)
        self.choices: list[str | None] = []
        #: gap -> per option, what its best move reads that does not depend on t
        self.facts: dict[int, dict[str, float | None]] = {}
        self.stale: set[int] = set()
        self.changed_gaps: set[int] = set()
        # gap -> gaps whose best move reads its choice or lock
        self.readers: dict[int, set[int]] = {}
        for gi, other in cands.partners.items():
            self.readers.setdefault(other, set()).add(gi)
        for gi, gap in enumerate(cands.gaps):
            for o in gap.options:
                if o.choice == "recompute":
                    for h in _holders(cands, o) or ():
                        self.readers.setdefault(h, set()).add(gi)
        # one row per (gap, option transfer that loads its channel)
        channels: dict[tuple[str, str], int] = {}
        rows: list[tuple[int, int, int, int]] = []
        for gi, gap in enumerate(cands.gaps):
            for o in gap.options:
                for channel, lo, hi, shares, _ in state._transfers(gi, o):
                    if shares is not None:
                        rows.append((gi, channels.setdefault(channel, len(channels)), lo, hi))
        self.channel_ids = channels
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self.row_gap, self.row_channel, self.row_lo, self.row_hi = table.T
        self._flat: _FlatOptions | None = None  # built for the first minimizing move

    def touched(self, gi: int) -> None:
        self.changed_gaps.add(gi)

    def loads_changed(self, channel: tuple[str, str], lo: int, hi: int) -> None:
        cid = self.channel_ids.get(channel)
        if cid is None or not self.facts:  # nothing priced yet
            return
        hit = (self.row_channel == cid) & (self.row_lo <= hi) & (self.row_hi >= lo)
        self.stale.update(self.row_gap[hit].tolist())

    def best(self, t: int, minimize_memory: bool) -> tuple[int, str] | None:
        state = self.state
        cands = state.cands
        stale = self.stale
        for g in self.changed_gaps:
            stale.add(g)
            stale.update(cands.gaps_of[cands.gaps[g].tensor])
            stale.update(self.readers.get(g, ()))
        if self._flat is not None:
            self._flat.gaps_changed(self.changed_gaps)
        self.stale, self.changed_gaps = set(), set()
        for gi in stale:
            self.facts.pop(gi, None)
        if minimize_memory:
            if self._flat is None:
                self._flat = _FlatOptions(state)
            self.t = None  # the per-gap scores below are not kept up to date meanwhile
            return self._flat.best(t, self.facts)
        if t != self.t:
            self.t = t
            self.spanning = np.nonzero((state.gap_lo <= t) & (state.gap_hi >= t))[0]
            self.position = {int(gi): k for k, gi in enumerate(self.spanning)}
            self.scores = np.full(len(self.spanning), -np.inf)
            self.choices = [None] * len(self.spanning)
            todo: set[int] = set(self.position)
        else:
            todo = stale
        for gi in todo:
            k = self.position.get(gi)
            if k is None:
                continue
            found = state.gap_best(gi, t, False, self.facts.setdefault(gi, {}))
            self.scores[k], self.choices[k] = found if found is not None else (-np.inf, None)
        if not len(self.scores):
            return None
        k = int(np.argmax(self.scores))  # the first of equals: the lowest gap
        choice = self.choices[k]
        return None if choice is None else (int(self.spanning[k]), choice)


class _FlatOptions:
    """The memory-minimizing descent's moves, scored all at once. There the peak
    step moves with almost every move (809 distinct steps in 2,205 moves on a
    1,000-step chain), so every gap spanning it was scored anew each time: 194 s
    on a 5,000-step chain. Here the bytes each option holds at the step come from
    one pass over all options' intervals (numpy), and only the options freeing
    the most bytes are priced (added time breaks ties only: a move's score is
    bytes freed - 1e-3 x seconds added, never above the bytes it frees). The move
    is the one ``_GreedyState.gap_best`` over every spanning gap would pick."""

    def __init__(self, state: _GreedyState) -> None:
        self.state = state
        cands = state.cands
        gap_of: list[int] = []
        choice_of: list[str] = []
        whole: list[bool] = []
        tensor_of: list[int] = []
        iv_option: list[int] = []
        iv_lo: list[int] = []
        iv_hi: list[int] = []
        iv_bytes: list[int] = []
        self.first: list[int] = []  # each gap's first option's index
        for gi, gap in enumerate(cands.gaps):
            self.first.append(len(choice_of))
            for o in gap.options:
                k = len(choice_of)
                gap_of.append(gi)
                choice_of.append(o.choice)
                whole.append(parse_choice(o.choice)[0] in WHOLE_TENSOR_CHOICES)
                tensor_of.append(gap.tensor)
                for lo, hi, b in state._contribution(gi, o):
                    iv_option.append(k)
                    iv_lo.append(lo)
                    iv_hi.append(hi)
                    iv_bytes.append(b)
        self.gap_of = np.array(gap_of, dtype=np.int64)
        self.choice_of = choice_of
        self.whole = np.array(whole, dtype=bool)
        self.tensor_of = np.array(tensor_of, dtype=np.int64)
        self.gap_tensor = np.array([g.tensor for g in cands.gaps], dtype=np.int64)
        self.iv_option = np.array(iv_option, dtype=np.int64)
        self.iv_lo = np.array(iv_lo, dtype=np.int64)
        self.iv_hi = np.array(iv_hi, dtype=np.int64)
        self.iv_bytes = np.array(iv_bytes, dtype=np.float64)
        self.index = {(g, c): k for k, (g, c) in enumerate(zip(gap_of, choice_of))}
        self.current = np.zeros(len(cands.gaps), dtype=np.int64)  # option index per gap
        self.eligible = np.zeros(len(choice_of), dtype=bool)  # a move open from here
        self.gaps_changed(range(len(cands.gaps)))

    def gaps_changed(self, gaps: Iterable[int]) -> None:
        """Each gap's current option and the moves open from it (``gap_best``)."""
        state = self.state
        for gi in gaps:
            self.current[gi] = self.index[(gi, state.choices[gi])]
            first = self.first[gi]
            self.eligible[first : first + len(state.cands.gaps[gi].options)] = False
            for o in state.open_moves(gi):
                self.eligible[self.index[(gi, o.choice)]] = True

    def best(self, t: int, facts: dict[int, dict[str, float | None]]) -> tuple[int, str] | None:
        state = self.state
        covers = (self.iv_lo <= t) & (self.iv_hi >= t)
        held = np.bincount(
            self.iv_option, weights=self.iv_bytes * covers, minlength=len(self.choice_of)
        )
        held_now = held[self.current]  # per gap, by its current option
        by_tensor = np.bincount(
            self.gap_tensor, weights=held_now, minlength=int(self.tensor_of.max(initial=0)) + 1
        )
        mine = held_now[self.gap_of]
        saved = mine - held + self.whole * (by_tensor[self.tensor_of] - mine)
        spans = (state.gap_lo[self.gap_of] <= t) & (state.gap_hi[self.gap_of] >= t)
        candidates = np.nonzero(self.eligible & spans & (saved > 0))[0]
        if not len(candidates):
            return None
        order = candidates[np.lexsort((candidates, -saved[candidates]))]
        best: tuple[float, int] | None = None
        for k in order.tolist():
            if best is not None and saved[k] < best[0]:
                break  # a score is never above the bytes a move frees
            gi = int(self.gap_of[k])
            cost = state.move_cost(gi, self.choice_of[k], facts.setdefault(gi, {}))
            if cost is None:
                continue
            score = float(saved[k]) - cost * 1e-3
            if best is None or score > best[0] or (score == best[0] and k < best[1]):
                best = (score, k)
        if best is None:
            return None
        return int(self.gap_of[best[1]]), self.choice_of[best[1]]


def _holders(cands: Candidates, option: Option) -> list[int] | None:
    """Gaps that must keep their tensor for a recompute to read it; None if some
    input cannot be held at that step."""
    problem = cands.problem
    T = problem.num_steps
    holders = []
    for r, step in option.needs:
        tensor = problem.tensors[r]
        if step in own_steps(tensor, T) or tensor.pinned:
            continue
        found = holder_gap(cands, r, step)
        if found is None:
            return None
        holders.append(found)
    return holders


def _default(gap: Gap) -> str:
    if gap.start != -1:
        return KEEP
    return HOME if _has(gap, HOME) else gap.options[0].choice  # a fixed home in a tier


def _has(gap: Gap, choice: str) -> bool:
    return any(o.choice == choice for o in gap.options)


BASELINES = {
    "keep-all": keep_all,
    "recompute-all": recompute_all,
    "offload-weights": offload_weights,
    "greedy": greedy,
}
