"""Independent validator of a Plan: replays its action schedule on the Problem.

It shares nothing with the solver's optimization model (only the plain-data
Problem and Plan), so a bug in the model's accounting cannot hide in a shared
helper: every byte and every second is re-derived here from the schedule's
semantics (see ``planner.solver.plan``'s module docstring).

Time model: one compute clock plus one FIFO queue per copy channel. A transfer
issued at compute time ``tau`` starts at ``max(tau, channel free time)`` and takes
``bytes / bandwidth``; ``wait`` moves the clock to the transfer's end (a stall when
that is later). Ops, recomputes and (de)quantizes advance the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.errors import InvalidPlan
from planner.solver.plan import Action, Plan
from planner.solver.problem import (
    DEVICE,
    DISK,
    HOST,
    QUANT_BITS,
    Problem,
    Tensor,
    quantize_scratch_bytes,
    quantized_bytes,
)

#: Bytes per element by dtype name (with or without the ``torch.`` prefix).
ITEMSIZE = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2,
    "bfloat16": 2, "int64": 8, "long": 8, "int32": 4, "int": 4, "int16": 2,
    "short": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip

#: Device-copy states. FETCHING: allocated by a prefetch whose copy has not been
#: waited on, so it counts against the budget but may not be read.
ABSENT, READY, FETCHING = 0, 1, 2


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype``; raises KeyError for an unknown name."""
    return ITEMSIZE[dtype.removeprefix("torch.")]


@dataclass
class Replay:
    """What a replay measured: memory per step and a time breakdown.

    ``seconds == compute_seconds + recompute_seconds + quantize_seconds +
    copy_seconds + stall_seconds``, where ``copy_seconds`` is what copies take from
    the ops on a device whose cores run them (``Bandwidths.copy_compute_share``) and
    the delivery of gradients; ``bytes_moved`` is keyed by channel (disk_read, disk_write,
    host_to_device, device_to_host), as in ``Bandwidths``.
    """

    peak_bytes: int
    peak_step: int
    seconds: float
    stall_seconds: float
    compute_seconds: float
    recompute_seconds: float
    quantize_seconds: float
    bytes_moved: dict[str, int]
    copy_seconds: float = 0.0
    resident_bytes: list[int] = field(default_factory=list)
    #: per step, the highest resident bytes while an op (or a recompute) runs, and
    #: at the moments between: arrivals and memory actions (copies, (de)quantizing,
    #: deliveries), which a compiled run of ops never covers
    op_bytes: list[int] = field(default_factory=list)
    between_ops_bytes: list[int] = field(default_factory=list)


@dataclass
class _Transfer:
    tier: str
    read: bool  # True: tier -> device (prefetch); False: device -> tier (offload)
    fmt: str | None  # quantized format of the bytes moved, None for full precision
    end: float


def validate(problem: Problem, plan: Plan) -> Replay:
    """Replay ``plan`` on ``problem``; raise InvalidPlan at the first violation,
    naming the step, the action (or op) and the tensor."""
    if plan.fingerprint != problem.fingerprint():
        raise InvalidPlan(
            f"plan fingerprint {plan.fingerprint} does not match the problem's "
            f"{problem.fingerprint()}: the plan was made for another graph; re-plan"
        )
    if plan.replay_budget_bytes != problem.budget_bytes:
        raise InvalidPlan(
            f"plan budget {plan.replay_budget_bytes} B differs from the problem's "
            f"{problem.budget_bytes} B; re-plan for this budget"
        )
    return _Replayer(problem, plan).run()


def _channel(tier: str, read: bool) -> str:
    if tier == DISK:
        return "disk_read" if read else "disk_write"
    return "host_to_device" if read else "device_to_host"


class _Replayer:
    """The mutable state of one replay; ``run`` walks the steps once, so the cost
    is linear in steps + actions + uses."""

    def __init__(self, problem: Problem, plan: Plan) -> None:
        self.problem = problem
        self.plan = plan
        n, steps = len(problem.tensors), problem.num_steps
        self.by_name = {t.name: i for i, t in enumerate(problem.tensors)}
        self.by_index = {t.index: i for i, t in enumerate(problem.tensors)}
        #: a buffer updated in place -> its update, which writes its home (``writes_home_of``)
        self.update_of = {
            self.by_index[t.writes_home_of]: i
            for i, t in enumerate(problem.tensors)
            if t.writes_home_of is not None
        }
        self.status = [ABSENT] * n
        self.dev_fmt: list[str | None] = [None] * n  # format of the device copy
        self.dev_bytes = [0] * n
        self.appeared = [False] * n
        self.copies: list[dict[str, str | None]] = [{} for _ in range(n)]  # complete tier copies
        self.pending: list[list[_Transfer]] = [[] for _ in range(n)]
        self.delivered: set[int] = set()  # gradients handed to their parameter's .grad
        #: tensor -> name of the output written into its memory: never read again
        self.taken_over: dict[int, str] = {}
        self.used = 0
        self.clock = self.stall = self.compute = self.recompute = self.quant = 0.0
        self.copying = 0.0
        self.free_at: dict[str, float] = {}
        self.moved = {c: 0 for c in ("disk_read", "disk_write", "host_to_device", "device_to_host")}
        self.resident = [0] * steps
        self.op_resident = [0] * steps
        self.between_ops_resident = [0] * steps
        self.peak, self.peak_step, self.step = 0, 0, 0
        self.where = "initial state"
        # Per-step lists, built once so the walk never scans all tensors per step.
        self.reads: list[list[int]] = [[] for _ in range(steps)]
        self.outputs: list[list[int]] = [[] for _ in range(steps)]
        self.arrivals: list[list[int]] = [[] for _ in range(steps)]
        for i, t in enumerate(problem.tensors):
            for u in t.uses:
                if 0 <= u < steps:
                    self.reads[u].append(i)
            if t.by_op and 0 <= t.appears_at < steps:
                self.outputs[t.appears_at].append(i)
            elif not t.by_op and not t.persistent and 0 < t.appears_at < steps:
                self.arrivals[t.appears_at].append(i)
        #: weights stored quantized on the device: their codes' bytes, and the steps
        #: (with scratch bytes) whose op reads the codes directly
        self.stored: dict[int, int] = {}
        self.fused: dict[int, dict[int, int]] = {}
        #: weights whose home tier holds them quantized: the format
        self.home_format: dict[int, str] = {}
        self.actions: dict[tuple[int, str], list[tuple[int, Action]]] = {}
        for k, a in enumerate(plan.actions):
            if not 0 <= a.step < steps:
                raise InvalidPlan(
                    f"plan.actions[{k}] {a.kind} {a.tensor!r}: step {a.step} is outside "
                    f"0..{steps - 1}"
                )
            self.actions.setdefault((a.step, a.when), []).append((k, a))
        self.home = self.read_homes()

    # -- helpers ----------------------------------------------------------------

    def fail(self, what: str) -> InvalidPlan:
        return InvalidPlan(f"step {self.step}, {self.where}: {what}")

    def read_homes(self) -> dict[int, str]:
        """Home tier of each persistent tensor, from the plan's decisions."""
        decided = {d.name: d.home for d in self.plan.tensors}
        homes = {}
        for i, t in enumerate(self.problem.tensors):
            if not t.persistent:
                continue
            home = decided.get(t.name)
            if home is None:
                raise InvalidPlan(
                    f"persistent tensor {t.name!r} has no decision (home) in the plan"
                )
            tier, _, fmt = home.partition(":")
            if fmt:  # "<where>:<format>": stored on the device, or its tier, quantized
                if fmt != self.problem.quantize or not t.quantizable:
                    raise InvalidPlan(
                        f"tensor {t.name!r}: home {home!r} holds it quantized, but it is not "
                        f"quantizable as {fmt!r} in this problem (quantize="
                        f"{self.problem.quantize!r})"
                    )
                self.fused[i] = dict(t.fused_uses)
                if tier == DEVICE:
                    self.stored[i] = self.qbytes(t, fmt)
                    homes[i] = home
                    continue
                self.home_format[i] = fmt
                home = tier
            if home != DEVICE and home not in self.problem.tiers:
                raise InvalidPlan(
                    f"tensor {t.name!r}: home {home!r} is not 'device' nor a tier of this "
                    f"problem {self.problem.tiers}"
                )
            homes[i] = home
        return homes

    def note(self, level: int, op: bool = False) -> None:
        """Record ``level`` resident bytes at this moment (``op``: while an op or a
        recompute runs); fail above the budget."""
        if level > self.resident[self.step]:
            self.resident[self.step] = level
        by_kind = self.op_resident if op else self.between_ops_resident
        if level > by_kind[self.step]:
            by_kind[self.step] = level
        if level > self.peak:
            self.peak, self.peak_step = level, self.step
        if level > self.problem.budget_bytes:
            raise self.fail(
                f"{level} B resident exceeds the budget of {self.problem.budget_bytes} B "
                f"(largest on the device: {self.largest()})"
            )

    def largest(self, k: int = 3) -> str:
        """The ``k`` biggest device copies, for an over-budget message."""
        top = sorted(range(len(self.dev_bytes)), key=self.dev_bytes.__getitem__)[-k:]
        names = self.problem.tensors
        return ", ".join(
            f"{names[i].name!r} {self.dev_bytes[i]} B" for i in reversed(top) if self.dev_bytes[i]
        )

    def place(self, i: int, nbytes: int, status: int, fmt: str | None = None) -> None:
        """Allocate a device copy of tensor ``i`` (the caller then calls ``note``)."""
        self.status[i], self.dev_fmt[i], self.dev_bytes[i] = status, fmt, nbytes
        self.used += nbytes

    def drop(self, i: int) -> None:
        self.used -= self.dev_bytes[i]
        self.status[i], self.dev_fmt[i], self.dev_bytes[i] = ABSENT, None, 0

    def qbytes(self, t: Tensor, fmt: str) -> int:
        try:
            size = itemsize(t.dtype)
        except KeyError:
            raise self.fail(f"cannot quantize {t.name!r}: unknown dtype {t.dtype!r}") from None
        return quantized_bytes(t.nbytes, size, fmt, t.last_dim)

    def scratch(self, t: Tensor) -> int:
        """Temporaries of one (de)quantize of ``t`` (the blocked torch kernels')."""
        return quantize_scratch_bytes(t.nbytes, itemsize(t.dtype))

    def readable(self, i: int) -> str | None:
        """Why tensor ``i`` cannot be read now, or None if it can."""
        if self.status[i] == ABSENT:
            return "not resident"
        if self.status[i] == FETCHING:
            return "still waiting on its prefetch"
        if self.dev_fmt[i] is not None:
            return f"stored quantized ({self.dev_fmt[i]})"
        return None

    def reads_codes(self, i: int, s: int) -> bool:
        """Whether op ``s`` can read weight ``i`` quantized (a fused use): its codes
        are stored on the device for good, or fetched and resident now."""
        if s not in self.fused.get(i, {}):
            return False
        return i in self.stored or (self.status[i] == READY and self.dev_fmt[i] is not None)

    def transfer(self, i: int, tier: str, read: bool, fmt: str | None, nbytes: int) -> None:
        """Queue a copy on its channel (FIFO behind earlier copies on that channel)."""
        bw = self.problem.bandwidths
        try:
            rate = bw.read(tier) if read else bw.write(tier)
        except ValueError as e:
            raise self.fail(str(e)) from None
        channel = _channel(tier, read)
        start = max(self.clock, self.free_at.get(channel, 0.0))
        copy = (tier, "read" if read else "write")
        end = start + nbytes / rate + bw.fixed_seconds(copy)
        self.free_at[channel] = end
        self.moved[channel] += nbytes
        # a copy the ops' cores carry out (a CPU device) also takes that compute
        lost = bw.copy_compute_seconds(copy, nbytes)
        self.clock += lost
        self.copying += lost
        self.pending[i].append(_Transfer(tier, read, fmt, end))

    # -- the walk ---------------------------------------------------------------

    def run(self) -> Replay:
        p = self.problem
        for i, t in enumerate(p.tensors):
            if t.persistent:
                self.appeared[i] = True
                if i in self.stored:
                    self.used += self.stored[i]
                elif self.home[i] == DEVICE:
                    self.place(i, t.nbytes, READY)
                else:
                    self.copies[i][self.home[i]] = self.home_format.get(i)
            elif not t.by_op and t.appears_at <= 0:
                self.appeared[i] = True
                self.place(i, t.nbytes, READY)
        if p.num_steps:
            self.note(self.used)
        for s in range(p.num_steps):
            self.step = s
            self.resident[s] = self.used
            for i in self.arrivals[s]:
                self.where = f"arrival of {p.tensors[i].name!r}"
                self.appeared[i] = True
                self.place(i, p.tensors[i].nbytes, READY)
                self.note(self.used)
            for k, a in self.actions.get((s, "before"), ()):
                self.act(k, a)
            self.run_op(s)
            for k, a in self.actions.get((s, "after"), ()):
                self.act(k, a)
        self.check_end()
        return Replay(
            peak_bytes=self.peak,
            peak_step=self.peak_step,
            seconds=self.clock,
            stall_seconds=self.stall,
            compute_seconds=self.compute,
            recompute_seconds=self.recompute,
            quantize_seconds=self.quant,
            copy_seconds=self.copying,
            bytes_moved=dict(self.moved),
            resident_bytes=self.resident,
            op_bytes=self.op_resident,
            between_ops_bytes=self.between_ops_resident,
        )

    def run_op(self, s: int) -> None:
        step, tensors = self.problem.steps[s], self.problem.tensors
        self.where = f"op {step.name!r}"
        scratch = step.workspace_bytes
        for i in self.reads[s]:
            why = self.readable(i)
            if why is not None and self.reads_codes(i, s):
                scratch += self.fused[i][s]  # reads the quantized codes in a fused op
                self.spend_fused_time(i, s)
            elif why is not None:
                raise self.fail(f"reads {tensors[i].name!r}, which is {why}")
        reuse = step.reuse
        for i in self.outputs[s]:
            if self.status[i] != ABSENT:
                raise self.fail(f"output {tensors[i].name!r} is already on the device")
            if reuse is not None and tensors[i].index == reuse[1]:
                self.hand_over(self.by_index[reuse[0]], i)
            self.appeared[i] = True
            self.place(i, tensors[i].nbytes, READY)
        if self.used + scratch > self.problem.budget_bytes:
            outs = [tensors[i].name for i in self.outputs[s]]
            raise self.fail(
                f"outputs {outs} + workspace {scratch} B bring resident bytes to "
                f"{self.used + scratch} B, over the budget of "
                f"{self.problem.budget_bytes} B"
            )
        self.note(self.used + scratch, op=True)
        self.clock += step.seconds
        self.compute += step.seconds

    def hand_over(self, j: int, i: int) -> None:
        """The op writes output ``i`` into the buffer of input ``j``, which it read
        for the last time: ``j`` leaves the device as ``i`` arrives in its bytes."""
        t, out = self.problem.tensors[j], self.problem.tensors[i]
        why = self.readable(j)
        if why is not None or self.pending[j]:
            raise self.fail(
                f"output {out.name!r} reuses the buffer of {t.name!r}, which is "
                f"{why or 'still being copied'}"
            )
        if t.nbytes != out.nbytes or t.pinned and t.last_step(self.problem.num_steps) > self.step:
            raise self.fail(f"{out.name!r} cannot take over the buffer of {t.name!r}")
        self.drop(j)
        # its values are gone: a tier's copy of a buffer updated in place is its
        # home, which the update's rows are written over as the op makes them
        self.copies[j].clear()
        self.taken_over[j] = out.name

    def act(self, k: int, a: Action) -> None:
        """Apply one action, checking its preconditions first."""
        self.where = f"{a.when} action #{k} {a.kind} {a.tensor!r}"
        i = self.by_name.get(a.tensor)
        if i is None:
            raise self.fail(f"unknown tensor {a.tensor!r}")
        getattr(self, f"do_{a.kind}")(i, a)

    def check_tier(self, a: Action) -> str:
        if a.tier is None or a.tier not in self.problem.tiers:
            raise self.fail(f"unknown tier {a.tier!r}; this problem has {self.problem.tiers}")
        return a.tier

    def do_prefetch(self, i: int, a: Action) -> None:
        t, tier = self.problem.tensors[i], self.check_tier(a)
        if self.status[i] != ABSENT:
            state = "waiting on a prefetch" if self.status[i] == FETCHING else "resident"
            raise self.fail(f"{t.name!r} is already {state}")
        if i in self.taken_over:
            raise self.fail(
                f"{t.name!r} was overwritten by {self.taken_over[i]!r}, which took over its "
                f"memory: no copy of its values is left to prefetch"
            )
        if tier not in self.copies[i]:
            raise self.fail(f"{tier} holds no complete copy of {t.name!r} (offload and wait first)")
        fmt = self.copies[i][tier]
        nbytes = t.nbytes if fmt is None else self.qbytes(t, fmt)
        self.place(i, nbytes, FETCHING, fmt)
        self.note(self.used)
        self.transfer(i, tier, True, fmt, nbytes)

    def do_offload(self, i: int, a: Action) -> None:
        t, tier = self.problem.tensors[i], self.check_tier(a)
        if self.status[i] != READY:
            raise self.fail(f"{t.name!r} is not resident, so cannot be offloaded")
        self.transfer(i, tier, False, self.dev_fmt[i], self.dev_bytes[i])

    def do_wait(self, i: int, a: Action) -> None:
        if not self.pending[i]:
            raise self.fail(f"nothing is pending for {self.problem.tensors[i].name!r}")
        end = max(x.end for x in self.pending[i])
        if end > self.clock:
            self.stall += end - self.clock
            self.clock = end
        for x in self.pending[i]:
            if x.read:
                self.status[i] = READY
            else:
                self.copies[i][x.tier] = x.fmt
        self.pending[i] = []

    def do_free(self, i: int, a: Action) -> None:
        t = self.problem.tensors[i]
        if self.pending[i]:
            raise self.fail(f"{t.name!r} has a transfer pending; wait before freeing it")
        if self.status[i] == ABSENT:
            raise self.fail(f"{t.name!r} is not resident, so cannot be freed")
        if t.pinned and self.step < t.last_step(self.problem.num_steps):
            raise self.fail(f"{t.name!r} is pinned: it must stay on the device to its last use")
        self.drop(i)

    def do_recompute(self, i: int, a: Action) -> None:
        t, tensors = self.problem.tensors[i], self.problem.tensors
        r = t.recompute
        if r is None:
            raise self.fail(f"{t.name!r} has no recompute recipe")
        if not self.appeared[i]:
            raise self.fail(f"{t.name!r} cannot be recomputed before its producer first runs")
        if self.status[i] != ABSENT:
            raise self.fail(f"{t.name!r} is already on the device")
        scratch = r.extra_bytes
        for j in r.inputs:
            if j not in self.by_index:
                raise self.fail(f"recipe of {t.name!r} reads unknown tensor index {j}")
            k = self.by_index[j]
            why = self.readable(k)
            if why is None:
                continue
            # not on the device: readable only as codes, by a replayed op that fuses them
            fused_at = next((s for s, _ in r.replayed if self.reads_codes(k, s)), None)
            if fused_at is None:
                raise self.fail(f"recipe of {t.name!r} reads {tensors[k].name!r}, which is {why}")
            scratch += self.fused[k][fused_at]  # reads the codes
            self.spend_fused_time(k, fused_at)
        self.place(i, t.nbytes, READY)
        self.note(self.used + scratch, op=True)
        self.clock += r.seconds
        self.recompute += r.seconds

    def do_quantize(self, i: int, a: Action) -> None:
        t, fmt = self.problem.tensors[i], a.tier
        if fmt not in QUANT_BITS or fmt != self.problem.quantize:
            raise self.fail(
                f"format {fmt!r} is not the problem's quantize={self.problem.quantize!r}"
            )
        if not t.quantizable:
            raise self.fail(f"{t.name!r} is not quantizable")
        self.require_full_copy(i, "quantiz")
        q = self.qbytes(t, fmt)
        self.note(self.used + q + self.scratch(t))  # both copies exist while it runs
        self.drop(i)
        self.place(i, q, READY, fmt)
        self.spend_quantize_time(t.nbytes + q)

    def require_full_copy(self, i: int, verb: str) -> None:
        """Tensor ``i`` must be resident in full precision with no copy pending
        (``verb``: the action's stem, "quantiz" or "deliver")."""
        name = self.problem.tensors[i].name
        if self.status[i] != READY or self.dev_fmt[i] is not None:
            raise self.fail(f"{name!r} is not resident in full precision, so cannot be {verb}ed")
        if self.pending[i]:
            raise self.fail(f"{name!r} has a transfer pending; wait before {verb}ing it")

    def do_dequantize(self, i: int, a: Action) -> None:
        t = self.problem.tensors[i]
        if i in self.stored:  # a full copy for one use; the stored codes stay
            if self.status[i] != ABSENT:
                raise self.fail(f"{t.name!r} already has a full-precision copy")
            self.place(i, t.nbytes, READY)
            self.note(self.used + self.scratch(t))
            self.spend_quantize_time(dequantize=True, nbytes=t.nbytes + self.stored[i])
            return
        if self.status[i] != READY or self.dev_fmt[i] is None:
            raise self.fail(f"{t.name!r} is not resident quantized, so cannot be dequantized")
        if self.pending[i]:
            raise self.fail(f"{t.name!r} has a transfer pending; wait before dequantizing it")
        q = self.dev_bytes[i]
        self.note(self.used + t.nbytes + self.scratch(t))  # both copies exist while it runs
        self.drop(i)
        self.place(i, t.nbytes, READY)
        self.spend_quantize_time(dequantize=True, nbytes=t.nbytes + q)

    def do_deliver(self, i: int, a: Action) -> None:
        t = self.problem.tensors[i]
        tier = self.check_tier(a)
        if not t.deliverable:
            raise self.fail(f"{t.name!r} is not a parameter's gradient that can be delivered")
        if i in self.delivered:  # its .grad would get it twice
            raise self.fail(f"{t.name!r} was delivered already")
        self.require_full_copy(i, "deliver")
        if t.writes_home_of is not None:  # to its buffer's home, which must be a tier
            home = self.home.get(self.by_index[t.writes_home_of], DEVICE)
            if home != tier:
                raise self.fail(
                    f"{t.name!r} is written back to {tier}, but its buffer's home is {home}"
                )
        if t.delivery_needs_home_of is not None:  # CUDA: a copy to the host, then wait, free
            if not self.param_off_device(t) or tier != HOST:
                raise self.fail(
                    f"{t.name!r} can be delivered only to the host tier, and only when its "
                    f"parameter's home is a tier (a .grad lives on its parameter's device)"
                )
            self.transfer(i, tier, False, None, t.delivered_bytes())
            self.delivered.add(i)
            return
        seconds = self.problem.bandwidths.deliver_seconds(t.delivered_bytes())
        self.clock += seconds
        self.copying += seconds
        self.drop(i)
        self.delivered.add(i)

    def spend_fused_time(self, i: int, s: int) -> None:
        """A fused op dequantizes what it reads of weight ``i`` as it runs."""
        q = self.stored.get(i, self.dev_bytes[i])
        self.spend_quantize_time(
            dequantize=True, nbytes=self.problem.tensors[i].fused_work_bytes(s, q)
        )

    def spend_quantize_time(self, nbytes: int, dequantize: bool = False) -> None:
        bw = self.problem.bandwidths
        seconds = bw.dequantize_seconds(nbytes) if dequantize else bw.quantize_seconds(nbytes)
        self.clock += seconds
        self.quant += seconds

    def return_gradients_to_the_host(self) -> None:
        """CUDA: each gradient not delivered whose parameter is homed off the device
        is copied down to it after the last op (``returned_to_host_seconds``)."""
        bw = self.problem.bandwidths
        for i, t in enumerate(self.problem.tensors):
            if i not in self.delivered and self.param_off_device(t):
                seconds = bw.returned_to_host_seconds(t.nbytes)
                self.clock += seconds
                self.copying += seconds

    def param_off_device(self, t: Tensor) -> bool:
        """CUDA: whether gradient ``t``'s parameter (``delivery_needs_home_of``) is
        homed off the device, where its ``.grad`` then lives."""
        param = self.by_index.get(t.delivery_needs_home_of)  # type: ignore[arg-type]
        return param is not None and not self.home.get(param, DEVICE).startswith(DEVICE)

    def check_end(self) -> None:
        """The end state: returned tensors resident, fetched weights gone, the
        device-homed ones back as they started, no copy in flight."""
        self.step = max(self.problem.num_steps - 1, 0)
        self.where = "end of plan"
        self.return_gradients_to_the_host()
        for i, t in enumerate(self.problem.tensors):
            if self.pending[i]:
                raise self.fail(f"a transfer of {t.name!r} is still pending (no wait)")
            home = self.home.get(i)
            if i in self.update_of and home not in (None, DEVICE):
                if self.update_of[i] not in self.delivered:
                    raise self.fail(
                        f"{t.name!r} (home {home}) was updated but its update "
                        f"{self.problem.tensors[self.update_of[i]].name!r} was not written back"
                    )
            elif i in self.update_of:  # at home on the device: its update holds its bytes
                continue
            if t.until_end and i not in self.delivered and self.readable(i) is not None:
                raise self.fail(f"{t.name!r} is returned to the caller but is {self.readable(i)}")
            if home is not None and home != DEVICE and self.status[i] != ABSENT:
                raise self.fail(f"{t.name!r} (home {home}) is still on the device")
            if home == DEVICE and self.readable(i) is not None:
                raise self.fail(
                    f"{t.name!r} (home device) must end resident but is {self.readable(i)}"
                )
