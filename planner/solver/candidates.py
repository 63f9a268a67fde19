"""Candidate decisions: for every tensor, the gaps between the steps at which it
must be on the device, and for every gap the options the solver may pick.

An option is described by what it costs, never by how it is chosen, so the
optimization model, the baselines and the schedule builder all read the same
facts:

- ``present``: step intervals inside the gap during which the full tensor is on
  the device (outside the steps where it is needed, which are always counted);
- ``partial``: bytes held inside the gap outside ``present`` (a quantized copy);
- ``extras``: transient bytes at a step (a recompute's side outputs, a quantized
  copy beside the full one while (de)quantizing, a fused op's scratch);
- ``spans``: other ``(lo, hi, bytes)`` holdings (a weight stored quantized holds
  its codes for the whole run; at a fused use its full copy is charged to the
  options that have one);
- ``seconds``: compute it adds (recompute, (de)quantize);
- ``transfers``: bytes moved on a copy channel over a window of steps.

Copy windows are fixed here from the cost model: a prefetch is issued just early
enough that the compute of the steps before the use hides it; an offload's write
runs over just enough steps after the last use. The model then only decides
whether, not when, which keeps it linear (FlexGen's cost model does the same).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from planner.solver.problem import (
    DISK,
    HOST,
    Problem,
    Tensor,
    quantize_scratch_bytes,
    quantized_bytes,
)

KEEP = "keep"
HOME = "home"  # persistent tensor kept on the device across calls
#: ``stored:<format>``: a weight kept on the device quantized for good; each use
#: dequantizes it, or reads it quantized when the op is fused (``fused_uses``). Its
#: home gap and all its gaps between uses carry this option, chosen together.
STORED = "stored"
#: ``qoffload:<tier>``: an activation offloaded, and read back, quantized.
QOFFLOAD = "qoffload"
#: ``qfetch:<tier>``: a weight whose home is the tier, holding it quantized (written
#: once at plan time): before each run of uses its codes are read (a fraction of
#: the bytes on the slow channel, FlexGen's compressed weights), then read by fused
#: ops directly or dequantized once for the run, and freed after it. Like
#: ``stored``, chosen on the home gap for all the tensor's gaps together.
QFETCH = "qfetch"
#: Choices a weight makes once, on its home gap, for every gap it has.
WHOLE_TENSOR_CHOICES = (STORED, QFETCH)
#: ``deliver:<tier>``: a parameter's gradient handed to the parameter's ``.grad``
#: right after its last event, instead of staying on the device until the step
#: returns it (the gap from there to the end offers it). On a CPU device
#: ``deliver:disk``, written at once into a file-backed ``.grad``; on CUDA
#: ``deliver:host``, copied to host memory in the background like an offload's
#: write (``:sync``: waited for at once), for a parameter whose home is a tier.
#: A buffer's update (``writes_home_of``) is delivered the same ways, over the
#: buffer's copy in its home tier.
DELIVER = "deliver"


@dataclass(frozen=True)
class Transfer:
    channel: tuple[str, str]  # (tier, "read" | "write")
    nbytes: int
    window: tuple[int, int]  # inclusive steps whose compute hides it; (s, s-1) if none


@dataclass(frozen=True)
class Option:
    # keep | home | offload:T | reload:T | fetch:T | recompute | quantize:F | stored:F |
    # qoffload:T (plus :late read variants)
    choice: str
    present: tuple[tuple[int, int], ...] = ()
    partial: int = 0
    extras: tuple[tuple[int, int], ...] = ()  # (step, bytes)
    spans: tuple[tuple[int, int, int], ...] = ()  # (lo, hi, bytes)
    seconds: float = 0.0
    transfers: tuple[Transfer, ...] = ()
    #: (tensor, step): recompute needs that tensor resident (kept) at that step
    needs: tuple[tuple[int, int], ...] = ()
    #: the window's first step for prefetches and the free step for writes
    prefetch_at: int | None = None
    write_done_at: int | None = None


@dataclass
class Gap:
    """The interval between two consecutive steps ``start < end`` at which tensor
    ``tensor`` is needed (``start == -1``: before the first use of a persistent
    tensor, which is on the device only if its home is)."""

    tensor: int
    position: int
    start: int
    end: int
    options: list[Option] = field(default_factory=list)

    def option(self, choice: str) -> Option:
        for o in self.options:
            if o.choice == choice:
                return o
        raise KeyError(choice)


@dataclass
class Candidates:
    """All gaps of all movable tensors plus the bytes that no decision changes."""

    problem: Problem
    gaps: list[Gap]
    fixed: list[int]  # bytes per step that are resident whatever is chosen
    gaps_of: dict[int, list[int]]  # tensor -> its gaps' indices, in order
    home_gap: dict[int, int]  # persistent tensor -> the gap holding its home option
    #: a buffer updated in place: its home gap <-> its update's final gap, both ways
    #: (``write_back_pairs``); their choices go together (``partner_choice``)
    partners: dict[int, int] = field(default_factory=dict)
    #: tensor -> the step whose output takes over its memory (``Step.reuse``): no
    #: choice holds it after that step (a buffer's in-place update has its bytes)
    handed_over: dict[int, int] = field(default_factory=dict)


def build_candidates(problem: Problem) -> Candidates:
    T = problem.num_steps
    delta = [0] * (T + 1)

    def hold(lo: int, hi: int, nbytes: int) -> None:
        if lo <= hi:
            delta[lo] += nbytes
            delta[hi + 1] -= nbytes

    for step in problem.steps:
        hold(step.index, step.index, step.workspace_bytes)
        if step.reuse is not None:  # the output is written into the dying input
            hold(step.index, step.index, -problem.tensors[step.reuse[1]].nbytes)
    gaps: list[Gap] = []
    gaps_of: dict[int, list[int]] = {}
    home_gap: dict[int, int] = {}
    written_in_place = {t.writes_home_of for t in problem.tensors if t.writes_home_of is not None}
    for tensor in problem.tensors:
        events = own_steps(tensor, T)
        deliver_from = _delivery_start(tensor, T)
        for lo, hi in fixed_spans(problem, tensor, events, T):
            hold(lo, hi, tensor.nbytes)
        if tensor.pinned or not events:
            continue
        stored = _stored_format(problem, tensor)
        own = []
        if tensor.persistent:
            first = Gap(tensor.index, 0, -1, events[0])
            first.options = _first_gap_options(
                problem, tensor, events, tensor.index in written_in_place
            )
            if stored:
                first.options = _with_stored_option(problem, tensor, events, first.options)
                first.options += [
                    _quantized_fetch_option(problem, tensor, events, tier) for tier in problem.tiers
                ]
            decided = problem.fixed_homes.get(tensor.name)
            if decided is not None:
                first.options = _at_home(first.options, decided)
            home_gap[tensor.index] = len(gaps)
            own.append(len(gaps))
            gaps.append(first)
        for a, b in zip(events, events[1:]):
            if b - a < 2:
                continue  # adjacent steps: nothing to decide
            gap = Gap(tensor.index, len(own), a, b)
            gap.options = _gap_options(problem, tensor, a, b)
            if stored:  # decided on the home gap (see WHOLE_TENSOR_CHOICES)
                whole = [Option(f"{STORED}:{stored}")]
                whole += [Option(f"{QFETCH}:{tier}") for tier in problem.tiers]
                # only those the home gap kept: a home fixed by another shape's plan
                # leaves it without some, which a later gap still offered (the model
                # chose one there, unlinked, and the plan had no such home: GPT-2
                # with extra_example_inputs and quantize= at its smallest budget)
                home = home_gap.get(tensor.index)
                at_home = {o.choice for o in gaps[home].options} if home is not None else None
                gap.options += [o for o in whole if at_home is None or o.choice in at_home]
            own.append(len(gaps))
            gaps.append(gap)
        if deliver_from is not None:
            final = Gap(tensor.index, len(own), deliver_from, T)
            final.options = _delivery_options(problem, tensor, deliver_from)
            own.append(len(gaps))
            gaps.append(final)
        gaps_of[tensor.index] = own
    fixed, running = [], 0
    for t in range(T):
        running += delta[t]
        fixed.append(running)
    if problem.bandwidths.copy_compute_share or problem.bandwidths.copy_issue:
        for gap in gaps:
            gap.options = [_with_copy_compute(problem, o) for o in gap.options]
    handed_over = {s.reuse[0]: s.index for s in problem.steps if s.reuse is not None}
    cands = Candidates(problem, gaps, fixed, gaps_of, home_gap, handed_over=handed_over)
    cands.partners = write_back_pairs(cands)
    _link_recompute_needs(cands)
    return cands


def write_back_pairs(cands: Candidates) -> dict[int, int]:
    """The home gap of each buffer updated in place and its update's final gap
    (``writes_home_of``), both ways. A buffer whose update has no final gap (one
    pinned, which translation does not make today) has nowhere to be written back
    from: it keeps only its home on the device."""
    pairs: dict[int, int] = {}
    for tensor in cands.problem.tensors:
        home = cands.home_gap.get(tensor.writes_home_of)  # type: ignore[arg-type]
        if home is None:
            continue
        final = [
            gi
            for gi in cands.gaps_of.get(tensor.index, ())
            if any(parse_choice(o.choice)[0] == DELIVER for o in cands.gaps[gi].options)
        ]
        if final:
            pairs[home], pairs[final[0]] = final[0], home
        else:
            gap = cands.gaps[home]
            gap.options = [o for o in gap.options if o.choice == HOME]
    return pairs


def partner_choice(cands: Candidates, gi: int, choice: str) -> str | None:
    """The choice gap ``gi``'s partner (``write_back_pairs``) must take when ``gi``
    takes ``choice``: a buffer fetched from a tier, its update written back there;
    at home on the device, its update kept; and the other way round. None if the
    partner has no such option (that choice cannot be taken), or ``gi`` has no
    partner."""
    other = cands.partners.get(gi)
    if other is None:
        return None
    kind, tier = parse_choice(choice)
    want = {"fetch": (DELIVER, tier), DELIVER: ("fetch", tier)}.get(kind)
    for option in cands.gaps[other].options:  # the first: not a late or sync variant
        if want is None and option.choice in (HOME, KEEP):
            return option.choice
        if want is not None and parse_choice(option.choice) == want:
            return option.choice
    return None


def own_steps(tensor: Tensor, T: int) -> list[int]:
    """The steps at which ``tensor`` is on the device whatever is chosen: its
    events, less the end for a gradient that may be delivered before it."""
    events = tensor.events(T)
    deliver_from = _delivery_start(tensor, T)
    if deliver_from is not None:  # the end is the final gap's to decide
        return [e for e in events if e <= deliver_from]
    return events


def _delivery_start(tensor: Tensor, T: int) -> int | None:
    """The last step a deliverable gradient is needed at, if it can leave before
    the end (else None): the final gap, from there to the end, decides. A buffer's
    update (``writes_home_of``) has that gap even when read at the last step, where
    written back it frees nothing, but lets its buffer live in a tier."""
    if not tensor.deliverable or tensor.pinned or not tensor.until_end:
        return None
    last = max([tensor.appears_at, *tensor.uses])
    return last if last < T - 1 or tensor.writes_home_of is not None else None


def _delivery_options(problem: Problem, tensor: Tensor, a: int) -> list[Option]:
    """The final gap of a deliverable gradient, from its last event ``a`` to the
    end: kept until the step returns it, or delivered (see ``DELIVER``). A buffer's
    update (``writes_home_of``) has the same choice: kept, it is the buffer's
    memory on the device; delivered, it is written back to the buffer's tier."""
    T = problem.num_steps
    keep = Option(KEEP, present=((a + 1, T - 1),))
    if tensor.delivery_needs_home_of is None:  # a CPU device: one synchronous pass
        seconds = problem.bandwidths.deliver_seconds(tensor.delivered_bytes())
        return [keep, Option(f"{DELIVER}:{DISK}", seconds=seconds)]
    options = [keep]
    # an update whose rows went down at its op (``write_back_bytes``) holds
    # nothing after ``a``: only the at-once form, priced for those rows
    write_end = _write_window_end(problem, tensor.nbytes, HOST, a)
    if write_end > a and not tensor.write_back_bytes:  # hidden behind the ops to write_end
        window = (a + 1, write_end)
        options.append(
            Option(
                f"{DELIVER}:{HOST}",
                present=(window,),
                transfers=(Transfer((HOST, "write"), tensor.nbytes, window),),
                write_done_at=write_end,
            )
        )
    options.append(  # waited for at once: nothing held after ``a``
        Option(
            f"{DELIVER}:{HOST}:sync",
            transfers=(Transfer((HOST, "write"), tensor.delivered_bytes(), (a + 1, a)),),
            write_done_at=a,
        )
    )
    return options


def _with_copy_compute(problem: Problem, option: Option) -> Option:
    """The option with the compute time its copies take (``copy_compute_share``,
    ``copy_issue``)."""
    if not option.transfers:
        return option
    bw = problem.bandwidths
    extra = sum(bw.copy_compute_seconds(tr.channel, tr.nbytes) for tr in option.transfers)
    return dataclasses.replace(option, seconds=option.seconds + extra)


def _first_gap_options(
    problem: Problem, tensor: Tensor, events: list[int], written_in_place: bool = False
) -> list[Option]:
    """Persistent tensors: on the device for good (``home``) or fetched from a
    tier before the first use (and freed after the last). ``written_in_place``: a
    buffer whose update is written into it at its last use, after which the update
    (``writes_home_of``) holds its memory."""
    T = problem.num_steps
    # before the first use and after the last; between uses the gaps' own ``keep``
    # holds it (the model forces keep there when home is the device)
    windows = [(0, events[0] - 1)]
    if not written_in_place:
        windows.append((events[-1] + 1, T - 1))
    outside = [(lo, hi) for lo, hi in windows if lo <= hi]
    options = [Option(HOME, present=tuple(outside))]
    for tier in problem.tiers:
        window = _read_window(problem, tensor.nbytes, tier, 0, events[0])
        options.append(
            Option(
                f"fetch:{tier}",
                present=((window[0], events[0] - 1),) if window[0] < events[0] else (),
                transfers=(Transfer((tier, "read"), tensor.nbytes, window),),
                prefetch_at=window[0],
            )
        )
        if window[0] < events[0]:
            options.append(_late(f"fetch:{tier}", tier, tensor.nbytes, events[0]))
    return options


def _at_home(options: list[Option], home: str) -> list[Option]:
    """The home-gap options that keep a persistent tensor's home at ``home`` as a
    plan's decisions name it (``Problem.fixed_homes``): "device" (on the device for
    good), a tier (fetched from there), "device:<format>" (stored quantized on the
    device) or "<tier>:<format>" (fetched from the tier as codes)."""
    place, _, fmt = home.partition(":")
    if place == "device":
        wanted = (STORED, fmt) if fmt else (HOME, None)
    else:
        wanted = (QFETCH if fmt else "fetch", place)
    kept = [o for o in options if parse_choice(o.choice) == wanted]
    if not kept:
        raise ValueError(f"no option keeps the home {home!r} (options: {options})")
    return kept


def _stored_format(problem: Problem, tensor: Tensor) -> str | None:
    """The format a weight may be stored in on the device, or None."""
    allowed = "weights" in problem.quantize_uses
    if tensor.persistent and tensor.quantizable and problem.quantize and allowed:
        return problem.quantize
    return None


def _quantized_sizes(problem: Problem, tensor: Tensor) -> tuple[str, int, int]:
    """The problem's format, and a quantized copy's bytes and (de)quantize scratch
    for ``tensor``."""
    fmt = problem.quantize
    assert fmt is not None
    size = _itemsize(tensor.dtype)
    q = quantized_bytes(tensor.nbytes, size, fmt, tensor.last_dim)
    return fmt, q, quantize_scratch_bytes(tensor.nbytes, size)


def _with_stored_option(
    problem: Problem, tensor: Tensor, events: list[int], options: list[Option]
) -> list[Option]:
    """Add ``stored:<format>`` to a weight's home gap: its codes are held at every
    step; a fused use holds the op's scratch, any other use a full copy that is
    dequantized before it (``seconds``) and freed after. The other options hold the
    full copy at fused uses too (those steps are left out of the fixed bytes)."""
    fmt, q, scratch = _quantized_sizes(problem, tensor)
    T = problem.num_steps
    fused = dict(tensor.fused_uses)
    full_at = tuple((e, e, tensor.nbytes) for e in events if e in fused)
    others = [dataclasses.replace(o, spans=o.spans + full_at) for o in options]
    # every use dequantizes the codes: into a full copy, or block by block inside a
    # fused op (which also keeps a free choice from going lossy for nothing)
    bw = problem.bandwidths
    stored = Option(
        f"{STORED}:{fmt}",
        spans=((0, T - 1, q),),
        extras=tuple((e, fused.get(e, scratch)) for e in events),
        seconds=sum(
            bw.dequantize_seconds(
                tensor.fused_work_bytes(e, q) if e in fused else tensor.nbytes + q
            )
            for e in events
        ),
    )
    return [*others, stored]


def use_runs(events: list[int]) -> list[list[int]]:
    """``events`` split where a gap lies between two of them (two or more steps
    apart, as ``build_candidates`` makes gaps): within a run nothing can be moved."""
    runs: list[list[int]] = []
    for e in events:
        if runs and e - runs[-1][-1] < 2:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _quantized_fetch_option(
    problem: Problem, tensor: Tensor, events: list[int], tier: str
) -> Option:
    """``qfetch:<tier>`` for a weight's home gap (see ``QFETCH``). Per run of uses:
    the codes are read over the compute before it (one transfer each, the window
    opening after the previous run) and held from the read to the run's end. A run
    of fused uses reads them in place (each use's scratch); any other run
    dequantizes them once before its first use into a full copy for the run (codes,
    full copy and scratch coexist then), and its fused uses hold that copy too,
    since the fixed bytes leave them out."""
    fmt, q, scratch = _quantized_sizes(problem, tensor)
    bw = problem.bandwidths
    fused = dict(tensor.fused_uses)
    spans: list[tuple[int, int, int]] = []
    extras: list[tuple[int, int]] = []
    transfers: list[Transfer] = []
    seconds, lo = 0.0, 0
    for run in use_runs(events):
        first, last = run[0], run[-1]
        window = _read_window(problem, q, tier, lo, first)
        transfers.append(Transfer((tier, "read"), q, window))
        spans.append((window[0], first - 1, q))
        if all(e in fused for e in run):
            spans.append((first, last, q))
            extras += [(e, fused[e]) for e in run]
            seconds += sum(bw.dequantize_seconds(tensor.fused_work_bytes(e, q)) for e in run)
        else:
            extras.append((first, q + scratch))
            spans += [(e, e, tensor.nbytes) for e in run if e in fused]
            seconds += bw.dequantize_seconds(tensor.nbytes + q)
        lo = last + 1
    return Option(
        f"{QFETCH}:{tier}",
        spans=tuple(spans),
        extras=tuple(extras),
        seconds=seconds,
        transfers=tuple(transfers),
        prefetch_at=transfers[0].window[0],
    )


def _late(
    choice: str,
    tier: str,
    nbytes: int,
    b: int,
    write: Transfer | None = None,
    write_end: int | None = None,
    variant: str = "late",
) -> Option:
    """Read just before the use ``b``: nothing held before it, the whole read a
    stall. What makes budgets below the hidden-prefetch ones feasible. (``sync``:
    the write before it is waited for at once too.)"""
    present: tuple[tuple[int, int], ...] = ()
    if write is not None and write_end is not None:
        present = ((write.window[0], write_end),)
    transfers = ((write,) if write is not None else ()) + (
        Transfer((tier, "read"), nbytes, (b, b - 1)),
    )
    return Option(
        f"{choice}:{variant}",
        present=present,
        transfers=transfers,
        prefetch_at=b,
        write_done_at=write_end,
    )


def _gap_options(problem: Problem, tensor: Tensor, a: int, b: int) -> list[Option]:
    inside = ((a + 1, b - 1),)
    options = [Option(KEEP, present=inside)]
    for tier in problem.tiers:
        read = _read_window(problem, tensor.nbytes, tier, a + 1, b)
        reads = (Transfer((tier, "read"), tensor.nbytes, read),)
        fetch_present = ((read[0], b - 1),) if read[0] < b else ()
        if tensor.persistent:
            if read[0] > a + 1:
                options.append(
                    Option(
                        f"fetch:{tier}", present=fetch_present, transfers=reads, prefetch_at=read[0]
                    )
                )
            if read[0] < b:
                options.append(_late(f"fetch:{tier}", tier, tensor.nbytes, b))
            continue
        write_end = _write_window_end(problem, tensor.nbytes, tier, a)
        if write_end + 1 < b:
            write = Transfer((tier, "write"), tensor.nbytes, (a + 1, write_end))
            options.append(_late(f"offload:{tier}", tier, tensor.nbytes, b, write, write_end))
        # also wait for the write at once: nothing held after ``a``, where even a write
        # that one step hides holds the tensor through that step (with fast copies,
        # the CNN training example's floor was 32.6% of its peak without this, 27.4%
        # with it)
        if write_end > a:
            sync = Transfer((tier, "write"), tensor.nbytes, (a + 1, a))
            options.append(_late(f"offload:{tier}", tier, tensor.nbytes, b, sync, a, "sync"))
        if write_end + 1 < read[0]:
            read_from = max(read[0], write_end + 1)
            options.append(
                Option(
                    f"offload:{tier}",
                    present=((a + 1, write_end), (read_from, b - 1)),
                    transfers=(Transfer((tier, "write"), tensor.nbytes, (a + 1, write_end)),)
                    + reads,
                    prefetch_at=read_from,
                    write_done_at=write_end,
                )
            )
        if read[0] > a + 1:
            options.append(
                Option(
                    f"reload:{tier}", present=fetch_present, transfers=reads, prefetch_at=read[0]
                )
            )
        if read[0] < b:
            options.append(_late(f"reload:{tier}", tier, tensor.nbytes, b))
    if tensor.recompute is not None:
        r = tensor.recompute
        options.append(
            Option(
                "recompute",
                extras=((b, r.extra_bytes),) if r.extra_bytes else (),
                seconds=r.seconds,
                needs=tuple((i, b) for i in r.inputs),
            )
        )
    # a weight is quantized by its home alone (``_with_stored_option``,
    # ``_quantized_fetch_option``), so that every read of it reads the same round
    # trip: held quantized between two reads, a frozen weight's forward read the
    # exact value and its backward the round trip, which no eager model computes
    # (nor a reference the user could build)
    if tensor.quantizable and problem.quantize and not tensor.persistent:
        fmt, q, scratch = _quantized_sizes(problem, tensor)
        both = q + scratch  # beside the full copy
        bw = problem.bandwidths
        seconds = bw.quantize_seconds(tensor.nbytes + q) + bw.dequantize_seconds(tensor.nbytes + q)
        if "activations" in problem.quantize_uses:
            options.append(
                Option(f"quantize:{fmt}", partial=q, extras=((a, both), (b, both)), seconds=seconds)
            )
        if "transfers" in problem.quantize_uses:
            for tier in problem.tiers:
                option = _quantized_offload(problem, tier, q, a, b, both, seconds)
                if option is not None:
                    options.append(option)
    return options


def _quantized_offload(
    problem: Problem, tier: str, q: int, a: int, b: int, both: int, seconds: float
) -> Option | None:
    """``qoffload:T``: quantize after ``a``, write the ``q`` quantized bytes to ``T``,
    read them back before ``b`` and dequantize (FlexGen's compressed transfers): a
    fraction of the bytes on the slow channel, for two passes over memory."""
    write_end = _write_window_end(problem, q, tier, a)
    read = _read_window(problem, q, tier, a + 1, b)
    if write_end + 1 >= read[0]:
        return None
    read_from = max(read[0], write_end + 1)
    return Option(
        f"{QOFFLOAD}:{tier}",
        spans=((a + 1, write_end, q), (read_from, b - 1, q)),
        extras=((a, both), (b, both)),
        seconds=seconds,
        transfers=(
            Transfer((tier, "write"), q, (a + 1, write_end)),
            Transfer((tier, "read"), q, read),
        ),
        prefetch_at=read_from,
        write_done_at=write_end,
    )


def _link_recompute_needs(cands: Candidates) -> None:
    """Drop recompute options whose inputs cannot be resident at the use: an input
    must be needed at that very step, pinned and alive, or have a gap (or home)
    covering it whose ``keep`` the model can require."""
    problem = cands.problem
    T = problem.num_steps
    for gap in cands.gaps:
        kept = []
        for option in gap.options:
            if option.choice == "recompute" and not all(
                _can_hold(cands, problem.tensors[r], step, T) for r, step in option.needs
            ):
                continue
            kept.append(option)
        gap.options = kept


def fixed_spans(
    problem: Problem, tensor: Tensor, events: list[int], T: int
) -> list[tuple[int, int]]:
    """The spans of steps (first, last) ``tensor`` is on the device whatever is
    chosen (``events``: its ``own_steps``): all its steps if it has no gaps
    (pinned, or never needed), else its own steps (less the fused uses of a weight
    that may be stored quantized, where its home gap's options say what is held)
    and, for a tangent handed in before its first use, the steps until then.
    ``build_candidates`` sums these into ``Candidates.fixed``; a BudgetTooSmall
    message names them at the floor's step."""
    if tensor.pinned or not events:
        return [_fixed_span(tensor, events, T)]
    fused = {step for step, _ in tensor.fused_uses} if _stored_format(problem, tensor) else set()
    spans = [(e, e) for e in events if e not in fused]
    if not tensor.persistent and not tensor.by_op and events[0] > tensor.appears_at:
        spans.append((tensor.appears_at, events[0]))
    return spans


def _fixed_span(tensor: Tensor, events: list[int], T: int) -> tuple[int, int]:
    """The steps a tensor without gaps (pinned, or never needed) is on the device:
    every step for weights and what the caller hands in before the first step,
    else from when it appears to its last step."""
    if tensor.persistent or (not tensor.by_op and tensor.appears_at == 0):
        return 0, T - 1
    lo = 0 if not tensor.by_op and not events else tensor.appears_at
    return lo, tensor.last_step(T)


def _can_hold(cands: Candidates, tensor: Tensor, step: int, T: int) -> bool:
    events = own_steps(tensor, T)
    if step in events:
        return True
    if step > cands.handed_over.get(tensor.index, step):  # pinned ones too
        return False
    if tensor.pinned:
        lo, hi = _fixed_span(tensor, events, T)
        return lo <= step <= hi
    return holder_gap(cands, tensor.index, step) is not None


def holder_gap(cands: Candidates, tensor: int, step: int) -> int | None:
    """The gap whose choice decides whether ``tensor`` is on the device at ``step``
    (a step that is not one of its own): the gap between two uses around it, whose
    ``keep`` holds it, else the home gap of a persistent tensor, whose ``home``
    holds it before its first and after its last use. None if no choice can: also
    after a step that wrote its output into the tensor's memory (a recompute that
    read a buffer after its in-place update, from the home the update had taken
    over, was chosen, and the validator rejected the solver's plan)."""
    if step > cands.handed_over.get(tensor, step):
        return None
    for gi in cands.gaps_of.get(tensor, []):
        gap = cands.gaps[gi]
        if gap.start >= 0 and gap.start < step < gap.end:
            return gi
    return cands.home_gap.get(tensor)


def holdings(option: Option, gap: Gap, nbytes: int) -> list[tuple[int, int, int]]:
    """``(lo, hi, bytes)``: the step intervals ``option`` holds bytes in, beyond the
    steps where the tensor is needed anyway (the one reading of an option's memory
    that the model, the baselines and the bounds all use)."""
    out = [(lo, hi, nbytes) for lo, hi in option.present if lo <= hi]
    if option.partial and not option.present:
        lo, hi = max(gap.start + 1, 0), gap.end - 1
        if lo <= hi:
            out.append((lo, hi, option.partial))
    out += [(t, t, b) for t, b in option.extras if b]
    out += [(lo, hi, b) for lo, hi, b in option.spans if b and lo <= hi]
    return out


def transfer_load(problem: Problem, tr: Transfer) -> tuple[list[float], float]:
    """How a copy loads its channel: per step of its window, the seconds of channel
    time it takes there (spread in proportion to the steps' compute), and the
    seconds its window's compute cannot hide (a stall however idle the channel)."""
    lo, hi = tr.window
    seconds = [problem.steps[t].seconds for t in range(lo, hi + 1)]
    covered = sum(seconds)
    need = problem.bandwidths.copy_seconds(tr.channel, tr.nbytes)
    shares = [s * min(1.0, need / covered) for s in seconds] if covered > 0 else []
    return shares, max(0.0, need - covered)


def _read_window(problem: Problem, nbytes: int, tier: str, lo: int, b: int) -> tuple[int, int]:
    """Steps [p, b-1] whose compute hides a read of ``nbytes`` finishing by ``b``;
    p never before ``lo``. Returns (p, b-1)."""
    need = problem.bandwidths.copy_seconds((tier, "read"), nbytes)
    p, covered = b, 0.0
    while p > lo and covered < need:
        p -= 1
        covered += problem.steps[p].seconds
    return (p, b - 1)


def _write_window_end(problem: Problem, nbytes: int, tier: str, a: int) -> int:
    need = problem.bandwidths.copy_seconds((tier, "write"), nbytes)
    e, covered = a, 0.0
    while e + 1 < problem.num_steps and covered < need:
        e += 1
        covered += problem.steps[e].seconds
    return e


def _complement(events: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    out, cur = [], lo
    for e in events:
        if e > cur:
            out.append((cur, e - 1))
        cur = e + 1
    if cur <= hi:
        out.append((cur, hi))
    return out


_ITEMSIZE = {
    "float64": 8,
    "int64": 8,
    "float32": 4,
    "int32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


@functools.cache
def parse_choice(choice: str) -> tuple[str, str | None]:
    """``"offload:disk:late"`` -> ``("offload", "disk")``; ``"keep"`` -> ``("keep", None)``.
    Cached: the greedy warm start asks about the same few strings ~10^5 times."""
    parts = choice.split(":")
    return parts[0], (parts[1] if len(parts) > 1 else None)


__all__ = [
    "DELIVER",
    "DISK",
    "HOME",
    "KEEP",
    "QFETCH",
    "QOFFLOAD",
    "STORED",
    "WHOLE_TENSOR_CHOICES",
    "Candidates",
    "Gap",
    "Option",
    "Transfer",
    "build_candidates",
    "holder_gap",
    "own_steps",
    "holdings",
    "parse_choice",
    "transfer_load",
    "use_runs",
]
