"""An independent memory meter: what the allocator saw, not what a plan predicts.

On the CPU we record the allocator's own events with the PyTorch profiler
(``profile_memory=True``): every allocation and free with its size, in time
order. Their running sum is the bytes allocated during the call; its maximum plus
the bytes already resident before the call (module state, and the bytes the
inputs span, deduplicated by storage, file-backed storages excluded) is the
peak. On CUDA the caching allocator's ``max_memory_allocated`` plays the same
role.

Nothing here reads a plan or the IR: it is the referee for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.alloc_trace import allocations, peak_and_final, profile_allocations


@dataclass(frozen=True)
class Measurement:
    """Peak device bytes over one call: ``resident_bytes`` held before it plus the
    highest ``peak_allocated_bytes`` reached by allocations made during it."""

    peak_bytes: int
    resident_bytes: int
    peak_allocated_bytes: int
    seconds: float
    #: bytes allocated during the call and still held at its end (its outputs)
    final_allocated_bytes: int = 0


def resident_bytes(*objects: Any, device: str | torch.device = "cpu") -> int:
    """Bytes on ``device`` held by modules (parameters and buffers: their whole
    storages) and pytrees of tensors (a call's inputs: the bytes each spans), each
    storage counted once. An input that is a view of a larger tensor counts what
    it spans, not the rest of its storage, which its caller holds whatever the
    call does (``data[64:128]`` of a 2 MiB batch measured 2 MiB over a plan's
    budget). Storages backed by a file (memory-mapped weights) are not resident
    device memory and are skipped."""
    device = torch.device(device)
    whole: dict[int, int] = {}  # storage -> its bytes
    spans: dict[int, list[tuple[int, int]]] = {}  # storage -> byte ranges in use
    for tensor, held_whole in _tensors(objects):
        if not _on(tensor.device, device) or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or getattr(storage, "filename", None):
            continue
        if held_whole:
            whole[key] = storage.nbytes()
        else:
            spans.setdefault(key, []).append(_span(tensor))
    total = sum(whole.values())
    for key, ranges in spans.items():
        if key not in whole:
            total += _union_bytes(ranges)
    return total


def _on(where: torch.device, device: torch.device) -> bool:
    """Whether a tensor on ``where`` is on ``device``: of its type and, where both
    name one, its index (a plan measured on ``cuda:1`` does not count what lies on
    ``cuda:0``; ``cuda`` without an index counts every GPU's)."""
    if where.type != device.type:
        return False
    return where.index is None or device.index is None or where.index == device.index


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range of its storage that ``tensor``'s elements lie in."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return start, start
    extents = [(int(n) - 1) * int(st) for n, st in zip(tensor.shape, tensor.stride())]
    low = sum(e for e in extents if e < 0)
    high = sum(e for e in extents if e > 0)
    return start + low * size, start + (high + 1) * size


def _union_bytes(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(ranges):
        if end is None or lo >= end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def _tensors(objects: Iterable[Any]) -> Iterable[tuple[torch.Tensor, bool]]:
    """Each tensor, and whether its whole storage is held (a module's)."""
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for tensor in (*obj.parameters(), *obj.buffers()):
                yield tensor, True
        else:
            for leaf in pytree.tree_leaves(obj):
                if isinstance(leaf, torch.Tensor):
                    yield leaf, False


def measure(
    fn: Callable[[], Any], *resident: Any, device: str | torch.device = "cpu"
) -> tuple[Any, Measurement]:
    """Run ``fn()`` once and measure its peak. ``resident`` are the modules and
    tensors held across the call (counted once, before it starts). On CUDA, the
    peak and time are those of ``device`` (its index kept: "cuda" alone is the
    current device)."""
    base = resident_bytes(*resident, device=device)
    if torch.device(device).type == "cuda":
        return _measure_cuda(fn, base, torch.device(device))
    return _measure_cpu(fn, base)


def _measure_cpu(fn: Callable[[], Any], base: int) -> tuple[Any, Measurement]:
    timing: list[float] = []

    def timed() -> Any:
        start = time.perf_counter()
        out = fn()
        timing.append(time.perf_counter() - start)
        return out

    result, events = profile_allocations(timed)
    peak, final = peak_and_final(allocations(events, "cpu"))
    return result, Measurement(base + peak, base, peak, timing[0], final)


def _measure_cuda(
    fn: Callable[[], Any], base: int, device: torch.device
) -> tuple[Any, Measurement]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before
    final = torch.cuda.memory_allocated(device) - before
    return result, Measurement(base + peak, base, peak, seconds, final)


def measure_inference(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, device: str = "cpu"
) -> tuple[Any, Measurement]:
    """Peak of one eager forward under ``torch.no_grad()``."""
    kwargs = kwargs or {}

    def run() -> Any:
        with torch.no_grad():
            return model(*args, **kwargs)

    return measure(run, model, (args, kwargs), device=device)


def measure_training_step(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, device: str = "cpu"
) -> tuple[Any, Measurement]:
    """Peak of one eager forward + backward, the backward driven by all-ones
    gradients of every floating-point output (created after the forward, as a
    loss would be). Existing ``.grad`` fields are restored afterwards."""
    kwargs = kwargs or {}
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None

    def run() -> Any:
        out = model(*args, **kwargs)
        leaves = [
            t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
        return out

    try:
        return measure(run, model, (args, kwargs), device=device)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
