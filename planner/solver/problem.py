"""The placement problem as plain data: what the solver, the baselines and the
validator all read. No FX, no torch: numbers and names only.

A *tensor* here is one storage of the IR (a base and its views share bytes).
Steps are the ops in schedule order. Built from the IR by ``from_program``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

#: Tiers a tensor can live in between uses, nearest first.
DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (HOST, DISK)

#: Bytes of storage per element for each quantized format, as a fraction of the
#: original's, plus per-row/group scales (see ``quantized_bytes``).
QUANT_BITS = {"int8": 8, "int4": 4}

#: Elements the torch (de)quantizers process at a time, so their temporaries stay
#: small; ``quantize_scratch_bytes`` bounds those temporaries, which plans charge
#: to each (de)quantize.
QUANT_BLOCK_ELEMS = 16384


def quantize_scratch_bytes(nbytes: int, itemsize: int) -> int:
    """Up to five fp32 copies of one block (measured: 8-16 bytes per element; a
    block is at least one int4 group of 64)."""
    numel = nbytes // max(itemsize, 1)
    block = min(QUANT_BLOCK_ELEMS, (numel + 63) // 64 * 64)
    return 20 * block + 256


@dataclass(frozen=True)
class Step:
    """One op: its compute seconds and the scratch bytes it allocates.

    ``reuse``: (input tensor, output tensor) when the op writes its output into the
    buffer of an input that dies at this step (an ``out=`` call on it), so the
    output takes no new bytes: the input is gone after the op, the output lives on
    in its memory."""

    index: int
    name: str
    seconds: float
    workspace_bytes: int = 0
    reuse: tuple[int, int] | None = None
    #: the user's source line that produced the op, if known (for messages)
    source: str | None = None


@dataclass(frozen=True)
class Recompute:
    """How to make a tensor again: replay step ``step`` (its producer), which
    reads ``inputs`` (tensor indices) and takes ``seconds``; while it runs it also
    holds ``extra_bytes`` (its other outputs and workspace, freed right after).

    ``chain``: ``(step, tensor)`` pairs replayed first, in order, each remaking one
    tensor the producer (or a later chain op) reads that is dead by the time the
    tensor is made, so no plan could keep it for the replay: ReLU's input is a
    BatchNorm output nothing else reads, a tanh-GELU's output comes from five
    pointwise ops over one kept matmul output. Without a chain those tensors could
    only be recomputed by replaying their expensive neighbours (the convolution
    before them) instead. ``release[k]``: the chain tensors freed right after the
    ``k``-th replayed op (the chain's, then the producer's at ``len(chain)``).
    ``seconds`` and ``extra_bytes`` cover the whole replay; ``inputs`` are what it
    reads from outside the chain."""

    step: int
    inputs: tuple[int, ...]
    seconds: float
    extra_bytes: int = 0
    chain: tuple[tuple[int, int], ...] = ()
    release: tuple[tuple[int, ...], ...] = ()

    @property
    def replayed(self) -> tuple[tuple[int, int], ...]:
        """Every ``(step, tensor)`` the replay runs, the chain's first; the
        producer's tensor is -1 (the recomputed tensor itself)."""
        return (*self.chain, (self.step, -1))


@dataclass(frozen=True)
class Tensor:
    """One storage.

    It appears at step ``appears_at``: as an output of that step's op when
    ``by_op``, else handed in by the caller before that step runs (weights, buffers
    and inputs at step 0, tangents at the first backward step). ``uses`` are the
    sorted steps whose op reads it. ``until_end``: returned to the caller, so
    present after the last step. ``persistent``: weights and buffers, which outlive
    a call and so have a home tier. ``pinned``: must stay on the device from when it
    appears to its last use (user inputs, tangents, tiny tensors).
    """

    index: int
    name: str
    nbytes: int
    kind: str
    dtype: str
    appears_at: int
    by_op: bool
    uses: tuple[int, ...]
    until_end: bool = False
    persistent: bool = False
    pinned: bool = False
    recompute: Recompute | None = None
    quantizable: bool = False
    #: elements along the last dim (rows for per-row int8 scales); None if unknown
    last_dim: int | None = None
    #: (step, scratch bytes): uses whose op can read the tensor stored quantized
    #: (a fused dequant-matmul or lookup), so a weight stored quantized is never
    #: materialized in full there; the bytes are the fused op's extra scratch.
    fused_uses: tuple[tuple[int, int], ...] = ()
    #: (step, bytes of the rows): the fused uses that are lookups (``embedding``);
    #: they read only those rows, where the others dequantize the whole weight
    fused_lookups: tuple[tuple[int, int], ...] = ()
    #: a parameter's gradient that may leave the device as soon as it is made,
    #: into the parameter's ``.grad`` instead of being returned at the end of the
    #: step: on a CPU device written into a file-backed buffer (the disk tier, where
    #: the optimizer reads it); on CUDA copied in the background to host memory
    deliverable: bool = False
    #: CUDA: the parameter (tensor index) whose home must be a tier for this
    #: gradient to be delivered, since a ``.grad`` lives on its parameter's device
    #: (the host when the parameter's home is off the device); None on a CPU device
    delivery_needs_home_of: int | None = None
    #: inference: the buffer (tensor index) whose home this tensor replaces, the
    #: update of a buffer written into it in place (a key/value cache). Like a
    #: delivered gradient it leaves the device after its last use, written back to
    #: the buffer's home tier, exactly when that home is a tier; with the buffer
    #: at home on the device it stays there, the buffer's memory, to the end.
    writes_home_of: int | None = None
    #: bytes a write-back copies: the rows the update wrote (an ``index_copy``'s
    #: source, e.g. a cache's new token), written over the tier's copy at the op
    #: (on CUDA gathered on the device first, as workspace of that op); else the
    #: whole tensor, after its last read
    write_back_bytes: int = 0

    def delivered_bytes(self) -> int:
        """Bytes a delivery (``deliverable``) copies."""
        return self.write_back_bytes or self.nbytes

    def fused_work_bytes(self, step: int, quantized_nbytes: int) -> int:
        """Bytes a fused use at ``step`` dequantizes (codes read plus values made):
        a lookup's rows, else the whole weight, block by block."""
        for s, rows in self.fused_lookups:
            if s == step:
                return rows
        return self.nbytes + quantized_nbytes

    def last_step(self, num_steps: int) -> int:
        """The last step at which it must exist: its last use, or the end."""
        if self.until_end:
            return num_steps - 1
        return max(self.uses[-1] if self.uses else self.appears_at, self.appears_at)

    def events(self, num_steps: int) -> list[int]:
        """Steps at which it must be present on the device: where it appears (if
        an op makes it), every use, and the last step when it is returned."""
        steps = set(self.uses)
        if self.by_op:
            steps.add(self.appears_at)
        if self.until_end:
            steps.add(num_steps - 1)
        return sorted(steps)


@dataclass(frozen=True)
class Bandwidths:
    """Bytes/s of each copy channel; ``host`` channels are None without a host tier."""

    disk_read: float
    disk_write: float
    host_to_device: float | None = None
    device_to_host: float | None = None
    memory: float = 1e11  # device memory bandwidth (copies on the device)
    #: bytes/s of a (de)quantize pass (full-precision bytes + codes); None: ``memory``
    quantize: float | None = None
    dequantize: float | None = None
    disk_read_latency: float = 0.0  # fixed seconds per copy from / to disk
    disk_write_latency: float = 0.0
    #: bytes/s of the CPU's part of a disk read, the copy out of the page cache
    #: into the destination; None: ``memory``
    disk_read_work: float | None = None
    #: share of a copy's CPU work that compute loses to it: 0 where copy engines do
    #: the work (CUDA), 1 on a CPU device, whose copy threads run the memcpy and
    #: syscalls on the cores the ops use (see ``copy_compute_seconds``)
    copy_compute_share: float = 0.0
    #: compute seconds each copy costs the thread that issues it and launches the
    #: ops (``DeviceProfile.copy_issue_seconds``), whatever its bytes
    copy_issue: float = 0.0

    def read(self, tier: str) -> float:
        _check_tier(tier)
        bw = self.disk_read if tier == DISK else self.host_to_device
        if bw is None:
            raise ValueError(f"no {tier} tier on this device")
        return bw

    def write(self, tier: str) -> float:
        _check_tier(tier)
        bw = self.disk_write if tier == DISK else self.device_to_host
        if bw is None:
            raise ValueError(f"no {tier} tier on this device")
        return bw

    def of(self, channel: tuple[str, str]) -> float:
        """Bytes/s of a copy channel ``(tier, "read" | "write")``."""
        tier, direction = channel
        return self.read(tier) if direction == "read" else self.write(tier)

    def copy_seconds(self, channel: tuple[str, str], nbytes: int) -> float:
        """Channel time of one copy: its bytes at the channel's rate, plus the fixed
        cost of a disk copy."""
        return nbytes / self.of(channel) + self.fixed_seconds(channel)

    def fixed_seconds(self, channel: tuple[str, str]) -> float:
        """The fixed cost of one copy on ``channel``: the store's, for the disk."""
        tier, direction = channel
        if tier != DISK:
            return 0.0
        return self.disk_read_latency if direction == "read" else self.disk_write_latency

    def copy_compute_seconds(self, channel: tuple[str, str], nbytes: int) -> float:
        """Compute time one copy takes from the ops (see ``copy_compute_share``): its
        CPU work. A write's is its channel time (the copy into the page cache, or
        the wait for the disk past it: see ``DeviceProfile.disk_rates``). A read's is
        its fixed cost plus a copy of its bytes out of the page cache
        (``disk_read_work``), not the disk's time: the device fills the page cache
        on its own (a wait the channel model charges as a stall). Plus, on any
        device, the copy's issue cost (``copy_issue``)."""
        if not self.copy_compute_share:
            return self.copy_issue
        if channel[1] == "read":
            rate = (self.disk_read_work if channel[0] == DISK else None) or self.memory
            work = self.fixed_seconds(channel) + nbytes / rate
        else:
            work = self.copy_seconds(channel, nbytes)
        return self.copy_issue + self.copy_compute_share * work

    def quantize_seconds(self, nbytes: int) -> float:
        """One quantize pass over ``nbytes`` (the tensor's and its codes')."""
        return nbytes / (self.quantize or self.memory)

    def dequantize_seconds(self, nbytes: int) -> float:
        """One dequantize pass over ``nbytes`` (``dequantize``, else as quantizing)."""
        return nbytes / (self.dequantize or self.quantize or self.memory)

    def deliver_seconds(self, nbytes: int) -> float:
        """Compute time of delivering a gradient: one synchronous pass that reads
        it and writes it into the file-backed ``.grad`` (the page cache writes it
        back to disk in the background)."""
        return 2 * nbytes / self.memory

    def returned_to_host_seconds(self, nbytes: int) -> float:
        """A gradient returned at the end of the step to a parameter that lives on
        the host (CUDA): one synchronous copy down, after the backward's last op."""
        return self.copy_seconds((HOST, "write"), nbytes) + self.copy_issue


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers are {TIERS}")


@dataclass
class Problem:
    """Everything the solver needs; ``fingerprint()`` identifies the graph."""

    mode: str
    steps: list[Step]
    tensors: list[Tensor]
    budget_bytes: int
    bandwidths: Bandwidths
    tiers: tuple[str, ...] = (DISK,)
    quantize: str | None = None
    quantize_kinds: tuple[str, ...] = ()
    #: which lossy options are on: "weights" (stored quantized), "activations"
    #: (kept quantized between uses), "transfers" (offloaded quantized);
    #: "gradients" (the backward's values may be quantized too) is applied by
    #: ``from_program`` through each tensor's ``quantizable``
    quantize_uses: tuple[str, ...] = ("weights", "activations", "transfers")
    meta: dict = field(default_factory=dict)
    #: persistent tensors whose home is decided already, by name, as a plan's
    #: decisions name homes: "device", a tier, or either with a format
    #: ("device:int8", "disk:int4"). The plans of one module's input shapes share
    #: their weights' homes (``planner.shapes``); not part of the fingerprint (the
    #: graph is the same)
    fixed_homes: dict[str, str] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def fingerprint(self) -> str:
        """A hash of the graph's structure and sizes (not the budget): a saved plan
        applies to a problem exactly when the fingerprints match."""
        cached = self.meta.get("_fingerprint")
        if cached is not None:
            return cached
        body = {
            "mode": self.mode,
            "steps": [s.name for s in self.steps],
            "reuse": [list(s.reuse) for s in self.steps if s.reuse],
            "tiers": list(self.tiers),
            "quantize": self.quantize,
            "quantize_uses": list(self.quantize_uses),
            "tensors": [
                (
                    t.name,
                    t.nbytes,
                    t.kind,
                    t.dtype,
                    t.appears_at,
                    t.by_op,
                    list(t.uses),
                    t.until_end,
                    t.persistent,
                    t.pinned,
                    t.quantizable,
                    t.last_dim,
                    [list(f) for f in t.fused_uses],
                    None
                    if t.recompute is None
                    else [t.recompute.step, list(t.recompute.inputs)]
                    + ([[list(c) for c in t.recompute.chain]] if t.recompute.chain else []),
                )
                for t in self.tensors
            ],
        }
        written_back = [
            [t.index, t.writes_home_of] for t in self.tensors if t.writes_home_of is not None
        ]
        if written_back:  # only then: the fingerprints of plans saved before stay valid
            body["writes_home_of"] = written_back
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        self.meta["_fingerprint"] = digest
        return digest

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_bytes(nbytes: int, itemsize: int, fmt: str, last_dim: int | None = None) -> int:
    """Bytes of a tensor stored as ``fmt``, as the kernels lay it out.

    int8: one code per element and one fp32 scale per row (rows run along the last
    dim, ``last_dim`` elements each; when unknown, one per 64 elements is assumed).
    int4: groups of 64 elements (the last one padded), 32 bytes of codes and an fp32
    scale and minimum per group (FlexGen's scheme, with fp32 scales:
    ``planner.runtime.quant``)."""
    if fmt not in QUANT_BITS:
        raise KeyError(f"unknown quantized format {fmt!r}")
    numel = nbytes // max(itemsize, 1)
    groups = (numel + 63) // 64
    if fmt == "int4":
        return groups * 32 + groups * 8
    row = max(last_dim or 64, 1)
    return numel + 4 * ((numel + row - 1) // row)
