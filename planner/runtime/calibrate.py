"""Measure this machine and write a DeviceProfile, so plans are priced on real numbers.

Datasheet peaks overstate what an eager executor sees, and a CPU-only machine's
disk is unknown until timed. ``calibrate`` runs short microbenchmarks (matmul
throughput per dtype, memory copy bandwidth, disk write/read bandwidth, per-op
overhead and, on CUDA, pinned host<->device bandwidth) and returns a profile;
``save_default`` stores it where ``get_profile(None)`` finds it.

Each throughput is the best of several runs: interference only ever slows a run,
so the best run is the closest to what the hardware can sustain. The per-op
overhead is a median instead, since it is a typical cost and not a peak.

Run as ``python -m planner.runtime.calibrate [--quick] [--save]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.passes.device_profile import DeviceProfile, builtin_for_gpu, default_profile_path

logger = logging.getLogger(__name__)

_MiB = 2**20


@dataclass(frozen=True)
class CalibrationSizes:
    """How much work each benchmark does: quick mode trades precision for time."""

    repeats: int
    matmul_target_seconds: float  # one matmul should take about this long
    matmul_max_n: int
    copy_bytes: int
    disk_bytes: int
    host_copy_bytes: int
    overhead_ops: int


QUICK = CalibrationSizes(
    repeats=5,
    matmul_target_seconds=0.05,
    matmul_max_n=2048,
    copy_bytes=64 * _MiB,
    disk_bytes=64 * _MiB,
    host_copy_bytes=64 * _MiB,
    overhead_ops=500,
)
FULL = CalibrationSizes(
    repeats=7,
    matmul_target_seconds=0.1,
    matmul_max_n=8192,
    copy_bytes=512 * _MiB,
    disk_bytes=256 * _MiB,
    host_copy_bytes=256 * _MiB,
    overhead_ops=2000,
)

_DISK_CHUNK_BYTES = 8 * _MiB
_MATMUL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """A barrier that makes wall-clock timing valid for asynchronous devices."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _best_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Fastest of ``repeats`` timed runs, after one untimed warm-up run."""
    fn()
    return min(_time_once(fn, sync) for _ in range(repeats))


def _matmul_size(
    dtype: torch.dtype, device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> int:
    """The smallest power-of-two n (from 256) whose n x n matmul takes the target time.

    Sizing by time rather than fixing n keeps slow dtypes (bf16 on a CPU without
    AMX) from blowing the time budget while fast ones run large enough to reach
    peak throughput.
    """
    warm = torch.ones(64, 64, device=device, dtype=dtype)
    _time_once(lambda: warm @ warm, sync)  # library initialisation must not be timed
    n = 256
    while n < sizes.matmul_max_n:
        a = torch.randn(n, n, device=device).to(dtype)
        if _time_once(lambda a=a: a @ a, sync) >= sizes.matmul_target_seconds:
            break
        n *= 2
    return n


def measure_matmul_flops(
    device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> dict[str, float]:
    """Best matmul FLOP/s per dtype; dtypes the device cannot multiply are left out."""
    flops: dict[str, float] = {}
    for dtype in _MATMUL_DTYPES:
        name = str(dtype).removeprefix("torch.")
        try:
            n = _matmul_size(dtype, device, sizes, sync)
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            seconds = _best_seconds(lambda a=a, b=b: a @ b, sync, sizes.repeats)
        except RuntimeError as exc:  # e.g. a dtype without a matmul kernel here
            logger.info("skipping %s matmul: %s", name, exc)
            continue
        flops[name] = 2 * n**3 / seconds
        logger.info("matmul %s n=%d: %.3g FLOP/s", name, n, flops[name])
    return flops


def measure_memory_bandwidth(
    device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> float:
    """Bytes read plus written per second by a large on-device copy."""
    src = torch.ones(sizes.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), sync, sizes.repeats)
    bandwidth = 2 * sizes.copy_bytes / seconds
    logger.info("memory copy: %.3g B/s", bandwidth)
    return bandwidth


def measure_quantize_bandwidth(
    device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> tuple[float, float]:
    """Bytes/s of the runtime's own int8 quantize, and of its dequantize (Triton on
    CUDA, the blocked torch reference elsewhere), counted as the solver charges a
    pass: the full-precision bytes plus the codes."""
    from planner.runtime.copy_engine import CopyEngine
    from planner.runtime.runtime import Runtime

    rt = Runtime(CopyEngine())  # only its kernels: no copies are made
    nbytes = min(sizes.copy_bytes, 4 * 2**20)
    x = torch.randn(nbytes // 4096, 1024, device=device)
    q = rt.quantize(x, "int8")
    codes = sum(t.numel() * t.element_size() for t in q.parts().values())
    quantize_s = _best_seconds(lambda: rt.quantize(x, "int8"), sync, sizes.repeats)
    dequantize_s = _best_seconds(lambda: rt.dequantize(q), sync, sizes.repeats)
    quantize_bw, dequantize_bw = (nbytes + codes) / quantize_s, (nbytes + codes) / dequantize_s
    logger.info("int8 quantize: %.3g B/s, dequantize: %.3g B/s", quantize_bw, dequantize_bw)
    return quantize_bw, dequantize_bw


def measure_host_bandwidth(
    device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> float:
    """Pinned host<->device copy bandwidth: the slower of the two directions.

    The slower one is used because offloading needs both directions and the cost
    model has a single device<->host channel.
    """
    numel = sizes.host_copy_bytes // 4
    host = torch.ones(numel, dtype=torch.float32).pin_memory()
    on_device = torch.empty(numel, dtype=torch.float32, device=device)
    to_device = _best_seconds(lambda: on_device.copy_(host, non_blocking=True), sync, sizes.repeats)
    to_host = _best_seconds(lambda: host.copy_(on_device, non_blocking=True), sync, sizes.repeats)
    h2d, d2h = sizes.host_copy_bytes / to_device, sizes.host_copy_bytes / to_host
    logger.info("host->device: %.3g B/s, device->host: %.3g B/s", h2d, d2h)
    return min(h2d, d2h)


def measure_op_overhead(
    device: torch.device, sizes: CalibrationSizes, sync: Callable[[], None]
) -> float:
    """Median seconds per eager op on one-element tensors: dispatch + launch, no work."""
    a = torch.ones(1, device=device)
    b = torch.ones(1, device=device)

    def run_batch() -> None:
        for _ in range(sizes.overhead_ops):
            torch.add(a, b)

    run_batch()  # warm-up
    batches = sorted(_time_once(run_batch, sync) for _ in range(max(5, sizes.repeats)))
    per_op = batches[len(batches) // 2] / sizes.overhead_ops
    logger.info("op overhead: %.3g s", per_op)
    return per_op


def _drop_page_cache(fd: int) -> None:
    """Ask the kernel to evict a file's cached pages, so the next read hits the disk."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_file(path: Path, total_bytes: int, chunk: bytes) -> float:
    """Write ``total_bytes`` and fsync; seconds including the fsync (data on disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        written = 0
        while written < total_bytes:
            written += os.write(fd, chunk[: total_bytes - written])
        os.fsync(fd)
        seconds = time.perf_counter() - start
        _drop_page_cache(fd)  # the pages are clean after fsync, so they can be evicted
    finally:
        os.close(fd)
    return seconds


def _read_file(path: Path, buffer: bytearray) -> tuple[int, float]:
    """Read the whole file into ``buffer`` chunk by chunk; (bytes read, seconds)."""
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        _drop_page_cache(fd)
        start = time.perf_counter()
        total = 0
        while (count := os.readv(fd, [view])) > 0:
            total += count
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return total, seconds


def measure_disk_bandwidth(disk_dir: str | None, sizes: CalibrationSizes) -> tuple[float, float]:
    """(read, write) bytes/s for sequential I/O on the file system holding ``disk_dir``.

    Writes are fsync'ed, so they measure the disk rather than the page cache. Before
    each read the file's pages are evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)``.
    That is only advice: without root (no ``/proc/sys/vm/drop_caches``) the kernel
    may keep some pages, and a read served partly from memory overstates the disk's
    read bandwidth. The temporary directory is removed whatever happens.
    """
    chunk = os.urandom(_DISK_CHUNK_BYTES)  # incompressible, in case the fs compresses
    buffer = bytearray(_DISK_CHUNK_BYTES)
    write_seconds, read_seconds = math.inf, math.inf
    with tempfile.TemporaryDirectory(prefix="planner-calibrate-", dir=disk_dir) as tmp:
        path = Path(tmp) / "bandwidth.bin"
        for _ in range(max(2, sizes.repeats // 2)):
            write_seconds = min(write_seconds, _write_file(path, sizes.disk_bytes, chunk))
            total, seconds = _read_file(path, buffer)
            if total != sizes.disk_bytes:
                raise OSError(f"read {total} bytes back from {path}, wrote {sizes.disk_bytes}")
            read_seconds = min(read_seconds, seconds)
            path.unlink()
    read_bw, write_bw = sizes.disk_bytes / read_seconds, sizes.disk_bytes / write_seconds
    logger.info("disk read: %.3g B/s, write: %.3g B/s", read_bw, write_bw)
    return read_bw, write_bw


#: A tensor the size of a large activation or a layer's weight: small enough that the
#: allocator recycles it (glibc maps blocks over 32 MiB afresh, page faults and all).
_PAGE_CACHE_COPY_BYTES = 16 * _MiB


def measure_page_cache_rates(disk_dir: str | None, repeats: int) -> tuple[float, float]:
    """(read, write) bytes/s of the offload store's transient copies while the page
    cache holds its files, the way the executor makes them: write a tensor (no
    fsync, no checksum) over the file of the call before, then read it into a
    freshly allocated tensor. The median of ``repeats`` after two warm-up rounds:
    the first write also creates the file and its pages, which later writes
    overwrite. The store's directory is removed whatever happens."""
    from planner.runtime.store import DiskStore, empty_like_entry

    tensor = torch.randn(_PAGE_CACHE_COPY_BYTES // 4)
    store = DiskStore(disk_dir)
    reads, writes = [], []
    try:
        for i in range(max(3, repeats) + 2):
            start = time.perf_counter()
            entry = store.write("cached", tensor, checksum=False)
            middle = time.perf_counter()
            store.read_into("cached", empty_like_entry(entry))
            if i >= 2:
                reads.append(time.perf_counter() - middle)
                writes.append(middle - start)
    finally:
        store.close()
    read = _PAGE_CACHE_COPY_BYTES / statistics.median(reads)
    write = _PAGE_CACHE_COPY_BYTES / statistics.median(writes)
    logger.info("page-cache copies: read %.3g B/s, write %.3g B/s", read, write)
    return read, write


#: A copy this small is nearly all fixed cost; the store's latency is measured on it.
_SMALL_COPY_BYTES = 16 * 1024


def measure_store_latency(
    disk_dir: str | None, read_bw: float, write_bw: float, repeats: int = 30
) -> tuple[float, float]:
    """(read, write) fixed seconds per copy through the offload store and its copy
    thread, the way the executor pays them: the median round trip of a 16 KiB
    tensor minus its bytes at ``read_bw`` and ``write_bw`` (never below 0). Pass
    the page-cache rates: the round trip's file stays in the page cache. At the
    disk's rates (1.4 GB/s here) the bytes alone are 12 us, more than a whole 16 KiB
    write through a file kept open takes, and the latency came out 0."""
    from planner.runtime.copy_engine import make_engine
    from planner.runtime.store import DiskStore

    tensor = torch.zeros(_SMALL_COPY_BYTES // 4)
    store = DiskStore(disk_dir)
    engine = make_engine(torch.device("cpu"), store)
    writes, reads = [], []
    try:
        for i in range(repeats + 2):  # the first two warm the thread and the files
            key = f"latency{i % 2}"
            start = time.perf_counter()
            engine.wait(engine.offload(key, "disk", tensor))
            middle = time.perf_counter()
            engine.wait(engine.prefetch(key, "disk"))
            end = time.perf_counter()
            if i >= 2:
                writes.append(middle - start)
                reads.append(end - middle)
    finally:
        engine.close()
        store.close()
    read = max(0.0, statistics.median(reads) - _SMALL_COPY_BYTES / read_bw)
    write = max(0.0, statistics.median(writes) - _SMALL_COPY_BYTES / write_bw)
    logger.info("store latency per copy: read %.3g s, write %.3g s", read, write)
    return read, write


def _memory_capacity(device: torch.device) -> int | None:
    """Device memory in bytes: the GPU's, or physical RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def calibrate(
    device: str = "cpu", disk_dir: str | None = None, quick: bool = False
) -> DeviceProfile:
    """Measure ``device`` (``"cpu"`` or ``"cuda[:i]"``) and the disk under ``disk_dir``.

    Pass the directory offloaded tensors will live in as ``disk_dir``: the default
    temporary directory may sit on a different (or RAM-backed) file system. Quick
    mode uses smaller sizes and fewer repeats (seconds instead of tens of seconds).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cannot calibrate {device!r}: CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"calibrate supports 'cpu' and 'cuda' devices, got {device!r}")
    sizes = QUICK if quick else FULL
    sync = _synchronizer(dev)
    start = time.perf_counter()
    matmul_flops = measure_matmul_flops(dev, sizes, sync)
    memory_bandwidth = measure_memory_bandwidth(dev, sizes, sync)
    host_bandwidth = measure_host_bandwidth(dev, sizes, sync) if dev.type == "cuda" else None
    op_overhead = measure_op_overhead(dev, sizes, sync)
    quantize_bandwidth, dequantize_bandwidth = measure_quantize_bandwidth(dev, sizes, sync)
    disk_read, disk_write = measure_disk_bandwidth(disk_dir, sizes)
    cached_read, cached_write = measure_page_cache_rates(disk_dir, sizes.repeats)
    read_latency, write_latency = measure_store_latency(disk_dir, cached_read, cached_write)
    name = (
        f"calibrated-{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "calibrated-cpu"
    )
    logger.info("calibration took %.1f s", time.perf_counter() - start)
    return DeviceProfile(
        name=name,
        device_type=dev.type,
        matmul_flops=matmul_flops,
        memory_bandwidth=memory_bandwidth,
        host_bandwidth=host_bandwidth,
        disk_read_bandwidth=disk_read,
        disk_write_bandwidth=disk_write,
        op_overhead_seconds=op_overhead,
        memory_bytes=_memory_capacity(dev),
        disk_write_latency_seconds=write_latency,
        disk_read_latency_seconds=read_latency,
        quantize_bandwidth=quantize_bandwidth,
        dequantize_bandwidth=dequantize_bandwidth,
        disk_cached_read_bandwidth=cached_read,
        disk_cached_write_bandwidth=cached_write,
        # not measured yet: the built-in's figure for this GPU (0 on the CPU)
        copy_issue_seconds=(
            builtin_for_gpu(torch.cuda.get_device_name(dev)).copy_issue_seconds
            if dev.type == "cuda"
            else 0.0
        ),
    )


def save_default(profile: DeviceProfile) -> Path:
    """Save ``profile`` where ``get_profile(None)`` looks first; return the path."""
    path = profile.save(default_profile_path())
    logger.info("saved device profile to %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: calibrate, print the profile as JSON, optionally save it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--disk-dir", default=None, help="directory on the offload disk")
    parser.add_argument("--quick", action="store_true", help="smaller, faster benchmarks")
    parser.add_argument("--save", action="store_true", help=f"write to {default_profile_path()}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    profile = calibrate(args.device, disk_dir=args.disk_dir, quick=args.quick)
    print(json.dumps(profile.to_dict(), indent=2))
    if args.save:
        print(f"saved to {save_default(profile)}")


if __name__ == "__main__":
    main()
