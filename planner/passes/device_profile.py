"""What the hardware can do: the numbers the cost model and the solver price plans with.

A ``DeviceProfile`` holds peak matmul throughput per dtype, the compute device's
memory bandwidth, the copy channels' bandwidths (device<->host, disk read/write) and
a fixed per-op launch cost. The cost pass turns an op's FLOPs and bytes into seconds
with it; the solver turns bytes moved into channel time with it.

Profiles come from three places, resolved once by ``get_profile`` before planning:
a built-in (published datasheet numbers for common GPUs and a conservative CPU
default), a JSON file written by ``planner.runtime.calibrate`` for this machine, or
an object the caller built. Datasheet peaks are upper bounds; a calibrated profile
is closer to what the executor will see.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlannerTypeError, PlannerValueError

logger = logging.getLogger(__name__)

PROFILE_ENV_VAR = "PLANNER_PROFILE"
"""Environment variable naming the calibrated profile's path (overrides the default)."""

DEFAULT_PROFILE_PATH = Path("~/.cache/planner/profile.json")
"""Where ``calibrate`` saves, and ``get_profile(None)`` looks, unless overridden."""

DEVICE_TYPES = ("cuda", "cpu")

# Spellings callers use for the dtypes the profile knows, mapped to torch's names.
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "tf32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def _normalize_dtype(dtype: object) -> str:
    """``torch.float16``, ``"torch.float16"``, ``"fp16"`` and ``"half"`` all mean float16."""
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(name, name)


def _check_positive(name: str, value: object) -> None:
    try:
        ok = math.isfinite(float(value)) and float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"DeviceProfile.{name} must be a positive finite number, got {value!r}")


#: Share of free memory the offload directory's files may take and still be priced
#: at page-cache rates: the kernel's default ``vm.dirty_ratio`` (20%).
PAGE_CACHE_SHARE = 0.2


@dataclass(frozen=True)
class DiskRates:
    """Bytes/s of the disk channel's reads and writes for one plan, the CPU's part
    of a read (the copy out of the page cache), and why these rates."""

    read: float
    write: float
    read_work: float
    reason: str


def free_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo: what the kernel can hand out, page cache
    included, without swapping. None where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs of one machine, in base units (FLOP/s, bytes/s, seconds, bytes).

    ``host_bandwidth`` is None where there is no host tier: on a CPU device the host
    would be the same memory. ``memory_bytes`` is informational; the budget, not the
    capacity, bounds a plan.
    """

    name: str
    device_type: str
    matmul_flops: dict[str, float]
    memory_bandwidth: float
    host_bandwidth: float | None
    disk_read_bandwidth: float
    disk_write_bandwidth: float
    op_overhead_seconds: float
    memory_bytes: int | None = None
    #: fixed seconds per copy through the offload store, on top of bytes /
    #: bandwidth: opening or creating a file, the rename, the checksum bookkeeping,
    #: the hand-off to the copy thread. What makes many small offloads slow.
    disk_write_latency_seconds: float = 0.0
    disk_read_latency_seconds: float = 0.0
    #: share (0..1) of a copy's time that the ops lose to it; None: by device type,
    #: 1 on a CPU (its copy threads run the memcpy and syscalls on the cores the ops
    #: use), 0 on CUDA (copy engines). See ``compute_lost_to_copies``.
    copy_compute_share: float | None = None
    #: seconds of the issuing thread each copy between the device and a tier takes
    #: (issuing it, its event, the wait for it), charged as compute time: the same
    #: thread launches the ops, so on a step bound by kernel launches a copy delays
    #: every op after it even when the copy engine hides its bytes. 0 on the CPU,
    #: where ``copy_compute_share`` prices the copy's work instead.
    copy_issue_seconds: float = 0.0
    #: bytes/s at which the runtime's (de)quantize kernels process a tensor (its
    #: full-precision bytes plus its codes); None: ``memory_bandwidth`` (Triton
    #: kernels on a GPU stream at about memory speed). See ``quantize_throughput``.
    quantize_bandwidth: float | None = None
    #: bytes/s of the dequantize kernels alone (a fused read of a weight's codes, a
    #: full copy made before a use), counted the same way; None: as quantizing.
    #: Apart because on a CPU the torch dequantizer runs several times faster than
    #: the quantizer, and weights are quantized once at plan time, not per call.
    dequantize_bandwidth: float | None = None
    #: bytes/s of the offload store's transient copies while the kernel's page cache
    #: holds the files: a read of a file written a moment ago, a write that lands in
    #: the page cache (no fsync). Measured by ``calibrate``; None: unknown, and disk
    #: copies are priced at the disk's rates. See ``disk_rates``.
    disk_cached_read_bandwidth: float | None = None
    disk_cached_write_bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(
                f"DeviceProfile.device_type must be one of {DEVICE_TYPES}, got {self.device_type!r}"
            )
        if not self.matmul_flops:
            raise ValueError("DeviceProfile.matmul_flops needs at least one dtype")
        for dtype, value in self.matmul_flops.items():
            _check_positive(f"matmul_flops[{dtype!r}]", value)
        # Copy so that mutating the caller's dict cannot change a frozen profile.
        flops = {_normalize_dtype(k): float(v) for k, v in self.matmul_flops.items()}
        object.__setattr__(self, "matmul_flops", flops)
        for name in ("memory_bandwidth", "disk_read_bandwidth", "disk_write_bandwidth"):
            _check_positive(name, getattr(self, name))
        if self.host_bandwidth is not None:
            _check_positive("host_bandwidth", self.host_bandwidth)
        for name in (
            "op_overhead_seconds",
            "disk_write_latency_seconds",
            "disk_read_latency_seconds",
            "copy_issue_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceProfile.{name} must be >= 0, got {value!r}")
        for name in (
            "quantize_bandwidth",
            "dequantize_bandwidth",
            "disk_cached_read_bandwidth",
            "disk_cached_write_bandwidth",
        ):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        share = self.copy_compute_share
        if share is not None and not (math.isfinite(share) and 0 <= share <= 1):
            raise ValueError(f"DeviceProfile.copy_compute_share must be in [0, 1], got {share!r}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(
                f"DeviceProfile.memory_bytes must be positive, got {self.memory_bytes}"
            )

    def __hash__(self) -> int:
        # The generated hash would fail on the dict field; hash its frozen copy instead.
        return hash(
            (
                self.name,
                self.device_type,
                tuple(sorted(self.matmul_flops.items())),
                self.memory_bandwidth,
                self.host_bandwidth,
                self.disk_read_bandwidth,
                self.disk_write_bandwidth,
                self.op_overhead_seconds,
                self.memory_bytes,
                self.disk_write_latency_seconds,
                self.disk_read_latency_seconds,
                self.copy_compute_share,
                self.copy_issue_seconds,
                self.quantize_bandwidth,
                self.dequantize_bandwidth,
                self.disk_cached_read_bandwidth,
                self.disk_cached_write_bandwidth,
            )
        )

    @property
    def quantize_throughput(self) -> float:
        """Bytes/s of one (de)quantize pass: ``quantize_bandwidth`` or, unset, the
        memory bandwidth."""
        return self.quantize_bandwidth or self.memory_bandwidth

    @property
    def dequantize_throughput(self) -> float:
        """Bytes/s of one dequantize pass: ``dequantize_bandwidth``, else as quantizing."""
        return self.dequantize_bandwidth or self.quantize_throughput

    @property
    def compute_lost_to_copies(self) -> float:
        """``copy_compute_share``, or its default for the device type. On a CPU the
        default is measured: in BENCHMARKS_accelerate.md the reader thread's CPU
        time (0.96 s per forward) and more came off the forward with no wait on the
        disk, and with copies modelled as free, training plans moved tensors they
        had room to keep."""
        if self.copy_compute_share is not None:
            return self.copy_compute_share
        return 1.0 if self.device_type == "cpu" else 0.0

    def disk_rates(self, may_write_bytes: int, free_bytes: int | None) -> DiskRates:
        """The rates disk copies will see when a plan may write ``may_write_bytes``
        to the offload directory and the machine has ``free_bytes`` of memory free.

        The store never fsyncs, and a transient copy overwrites its key's file in
        place, so while the files fit in the page cache no copy waits on the disk:
        reads and writes are memcpys (here ~17 and ~10 GB/s, where the disk's
        2 GB/s made the MLP's estimates 2x high).
        They fit when the bytes are at most ``PAGE_CACHE_SHARE`` of free memory, the
        kernel's default ``vm.dirty_ratio``, past which it makes writers wait for
        the disk. A model larger than that, the case disk offload is for, gets the
        disk's rates.
        """
        read_work = self.disk_cached_read_bandwidth or self.memory_bandwidth
        cached_read = self.disk_cached_read_bandwidth
        cached_write = self.disk_cached_write_bandwidth
        if cached_read is None or cached_write is None:
            reason = "disk (the profile has no page-cache rates: calibrate to measure them)"
        elif free_bytes is None:
            reason = "disk (free memory unknown)"
        else:
            share = (
                f"{may_write_bytes / 2**20:.1f} MiB a plan may write {{}} "
                f"{PAGE_CACHE_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB free"
            )
            if may_write_bytes <= PAGE_CACHE_SHARE * free_bytes:
                reason = "page cache: the " + share.format("fit in")
                return DiskRates(cached_read, cached_write, read_work, reason)
            reason = "disk: the " + share.format("exceed")
        return DiskRates(self.disk_read_bandwidth, self.disk_write_bandwidth, read_work, reason)

    def flops_per_second(self, dtype: object) -> float:
        """Peak matmul FLOP/s for ``dtype``.

        Unknown dtypes (int8, float64, ...) fall back to float32's figure, or to the
        best figure when float32 is missing: a cost estimate must always exist.
        """
        flops = self.matmul_flops.get(_normalize_dtype(dtype))
        if flops is not None:
            return flops
        return self.matmul_flops.get("float32", max(self.matmul_flops.values()))

    @property
    def has_host_tier(self) -> bool:
        """Whether a separate host memory tier (pinned CPU memory) exists."""
        return self.host_bandwidth is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; ``from_dict`` inverts it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["matmul_flops"] = dict(self.matmul_flops)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Build a profile from ``to_dict`` output, naming missing or unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown = set(data) - known
        missing = required - set(data)
        if unknown or missing:
            raise ValueError(
                f"bad DeviceProfile data: missing keys {sorted(missing)}, "
                f"unknown keys {sorted(unknown)}"
            )
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, creating parent directories; return the path."""
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceProfile:
        """Read a profile written by ``save``."""
        source = Path(path).expanduser()
        try:
            return cls.from_dict(json.loads(source.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise PlannerValueError(
                f"cannot read device profile {source}: {exc}. Pass a profile saved by "
                f"`planner calibrate` (or DeviceProfile.save), or a built-in name "
                f"({', '.join(sorted(BUILTIN_PROFILES))})"
            ) from exc


# Built-in profiles. Dense (no 2:4 sparsity) peaks from NVIDIA's datasheets; PCIe
# figures are achievable pinned-memory rates (~85% of the link's per-direction peak:
# Gen5 x16 64 GB/s, Gen4 x16 32 GB/s, Gen3 x16 16 GB/s), not the link's nominal rate.
# GPU built-ins assume a typical PCIe Gen4 NVMe SSD (~7 GB/s sequential read, ~5 GB/s
# write, e.g. Samsung 980 Pro / 990 Pro class). op_overhead_seconds is an eager
# PyTorch op's Python + dispatcher + kernel-launch cost, ~10 us on GPUs.
_GB = 1e9
_TFLOPS = 1e12
_NVME_READ = 7.0 * _GB
_NVME_WRITE = 5.0 * _GB
_GPU_OP_OVERHEAD = 10e-6
# A copy to or from the host costs its issuing thread the Python and CUDA calls of
# the copy, its event and its wait. Measured on an H200 VM (torch 2.11, BENCHMARKS.md,
# "CUDA"): a GPT-2 training step ran 10.5 ms unplanned and 41-44 ms with 151-156
# host/disk copies whose bytes the copy engines hid (est. 0.2 ms of transfers), a
# ResNet step 7.8 ms and 23-24 ms with 97: 150-220 us per copy. The low end.
_GPU_COPY_ISSUE = 150e-6


def _gpu(
    name: str,
    fp32: float,
    fp16: float,
    bf16: float,
    memory_bandwidth: float,
    host_bandwidth: float,
    memory_bytes: int,
) -> DeviceProfile:
    """A CUDA built-in from its datasheet figures (TFLOP/s for the matmuls); the
    rest is what every GPU built-in assumes (above)."""
    return DeviceProfile(
        name=name,
        device_type="cuda",
        matmul_flops={
            "float32": fp32 * _TFLOPS,
            "float16": fp16 * _TFLOPS,
            "bfloat16": bf16 * _TFLOPS,
        },
        memory_bandwidth=memory_bandwidth,
        host_bandwidth=host_bandwidth,
        disk_read_bandwidth=_NVME_READ,
        disk_write_bandwidth=_NVME_WRITE,
        op_overhead_seconds=_GPU_OP_OVERHEAD,
        copy_issue_seconds=_GPU_COPY_ISSUE,
        memory_bytes=memory_bytes,
    )


# H100 SXM5 80GB datasheet: FP16/BF16 tensor 989 TFLOP/s dense, FP32 67 TFLOP/s
# (CUDA cores, no TF32), HBM3 3.35 TB/s; PCIe Gen5 x16.
_H100 = _gpu("h100", 67, 989, 989, 3.35e12, 55 * _GB, 80 * 2**30)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    "h100": _H100,
    # H200 SXM 141GB datasheet: the H100's compute with HBM3e at 4.8 TB/s, 141 GB
    "h200": dataclasses.replace(
        _H100, name="h200", memory_bandwidth=4.8e12, memory_bytes=141 * 10**9
    ),
    # A100 SXM4 80GB datasheet: FP16/BF16 tensor 312 TFLOP/s dense, FP32 19.5 TFLOP/s,
    # HBM2e 2,039 GB/s; PCIe Gen4 x16.
    "a100": _gpu("a100", 19.5, 312, 312, 2.039e12, 25 * _GB, 80 * 2**30),
    # RTX 4090 (Ada whitepaper): FP16/BF16 tensor with FP32 accumulate 165.2 TFLOP/s
    # dense (330 only with FP16 accumulate, which PyTorch does not use), FP32 82.6
    # TFLOP/s, GDDR6X 1,008 GB/s, 24 GB; PCIe Gen4 x16.
    "rtx4090": _gpu("rtx4090", 82.6, 165.2, 165.2, 1.008e12, 25 * _GB, 24 * 2**30),
    # T4 datasheet: FP16 tensor 65 TFLOP/s, FP32 8.1 TFLOP/s, GDDR6 320 GB/s, 16 GB;
    # PCIe Gen3 x16. Turing has no BF16 tensor cores: bf16 runs at about FP32 speed.
    "t4": _gpu("t4", 8.1, 65, 8.1, 320 * _GB, 12 * _GB, 16 * 2**30),
    # A conservative generic CPU: a few cores of AVX2 FMA (~100 GFLOP/s fp32). bf16
    # without AVX512-BF16/AMX runs slower than fp32 (conversion overhead); fp16
    # without AVX512-FP16/AMX-FP16 takes a slow fallback path (2.5 GFLOP/s measured
    # on a 2-core EPYC VM that does 190 GFLOP/s in fp32). ~10 GB/s is what one
    # process's tensor copy reaches on commodity DDR4; ~1 GB/s read / 0.5 GB/s write
    # is a modest cloud SSD volume. Eager ops on CPU
    # cost a few microseconds of dispatch each. The blocked torch (de)quantizers
    # (planner/runtime/quant.py, 16K-element blocks: dispatch-bound) do an int8
    # quantize + dequantize round trip at ~0.02-0.2 GB/s on that VM (load-dependent), far below its
    # memory bandwidth. Calibrate for real numbers.
    "cpu": DeviceProfile(
        name="cpu",
        device_type="cpu",
        matmul_flops={"float32": 100e9, "float16": 5e9, "bfloat16": 50e9},
        memory_bandwidth=10 * _GB,
        host_bandwidth=None,
        disk_read_bandwidth=1.0 * _GB,
        disk_write_bandwidth=0.5 * _GB,
        op_overhead_seconds=5e-6,
        # measured through the store on a 2-core VM: ~0.35 ms per write, ~0.1 per read
        disk_write_latency_seconds=3e-4,
        disk_read_latency_seconds=1e-4,
        quantize_bandwidth=0.2 * _GB,
        # dequantize alone, same VM: 1.4-6.5 GB/s int8 and 0.7-2.4 GB/s int4 on
        # 16K-4M element tensors when quiet; 1 GB/s leaves room for a loaded machine
        dequantize_bandwidth=1.0 * _GB,
    ),
}

# Substrings of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "Tesla T4")
# that identify a built-in. "t4" must be a whole word: it is inside other names.
_GPU_NAME_SUBSTRINGS = (("h100", "h100"), ("h200", "h200"), ("a100", "a100"), ("4090", "rtx4090"))
_GPU_NAME_WORDS = (("t4", "t4"),)


def default_profile_path() -> Path:
    """The calibrated profile's path: ``$PLANNER_PROFILE`` or ``~/.cache/planner/profile.json``."""
    override = os.environ.get(PROFILE_ENV_VAR)
    return Path(override).expanduser() if override else DEFAULT_PROFILE_PATH.expanduser()


def builtin_for_gpu(device_name: str) -> DeviceProfile:
    """The built-in matching a CUDA device name; h100 when none matches."""
    lowered = device_name.lower()
    words = lowered.replace("-", " ").split()
    for substring, key in _GPU_NAME_SUBSTRINGS:
        if substring in lowered:
            return BUILTIN_PROFILES[key]
    for word, key in _GPU_NAME_WORDS:
        if word in words:
            return BUILTIN_PROFILES[key]
    logger.warning(
        "no built-in profile matches GPU %r; using h100 (calibrate for real numbers)", device_name
    )
    return BUILTIN_PROFILES["h100"]


def _detect_builtin() -> DeviceProfile:
    """The built-in for this machine: its GPU's if CUDA is available, else ``cpu``."""
    import torch  # local: reading or writing profiles should not need torch

    if torch.cuda.is_available():
        return builtin_for_gpu(torch.cuda.get_device_name())
    return BUILTIN_PROFILES["cpu"]


def builtin_for_device(device: Any) -> DeviceProfile:
    """The built-in for a ``torch.device``: its GPU's for CUDA, else ``cpu``."""
    import torch  # local, as above

    if device.type == "cuda":
        return builtin_for_gpu(torch.cuda.get_device_name(device))
    return BUILTIN_PROFILES["cpu"]


def get_profile(spec: str | os.PathLike[str] | DeviceProfile | None = None) -> DeviceProfile:
    """Resolve a profile: an object, a built-in name, a JSON path, or None (this machine).

    None loads the calibrated profile at ``default_profile_path()`` if one was saved,
    else picks the built-in for the detected hardware.
    """
    if isinstance(spec, DeviceProfile):
        return spec
    if spec is None:
        path = default_profile_path()
        if path.is_file():
            logger.info("using calibrated device profile %s", path)
            return DeviceProfile.load(path)
        profile = _detect_builtin()
        logger.info("no calibrated profile at %s; using built-in %r", path, profile.name)
        return profile
    if not isinstance(spec, (str, os.PathLike)):  # os.fspath's bare TypeError before
        raise PlannerTypeError(
            f"profile must be a built-in name ({', '.join(sorted(BUILTIN_PROFILES))}), a "
            f"JSON path, a DeviceProfile or None, got {type(spec).__name__}"
        )
    text = os.fspath(spec)
    if text.lower() in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[text.lower()]
    path = Path(text).expanduser()
    if path.is_file():
        return DeviceProfile.load(path)
    raise PlannerValueError(
        f"unknown device profile {text!r}: not a built-in ({', '.join(sorted(BUILTIN_PROFILES))}) "
        f"and no such file; pass one of those names, a profile saved by `planner calibrate`, "
        f"or None for this machine's"
    )
