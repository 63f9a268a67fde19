"""CUDA blocks sized as the plan counts them, for the length of a planned call.

The plan counts a device tensor as its bytes rounded up to 512, the granularity
of PyTorch's CUDA caching allocator. The allocator can hand out more: in its large
pool (requests over 1 MiB) a cached free block is split only when more than 1 MiB
would remain, so a tensor may get up to 1 MiB beyond its request, and the meter
(``torch.cuda.max_memory_allocated``) counts the whole block (``should_split`` and
``alloc_found_block`` in ``c10/cuda/CUDACachingAllocator.cpp``). A few such blocks
live at once put a plan that fits its budget exactly over it by megabytes.

With expandable segments on, the allocator splits a block whenever 512 bytes or
more would remain, so every block is its request rounded up to 512: what the plan
counts. The setting may change while a program runs (blocks made under either
setting stay valid; the allocator keeps the two kinds apart), so a planned call
turns it on and gives the caller's settings back when it returns or raises.
Callers that run with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
already have it: nothing is changed then.

Setting the allocator's options re-parses the whole string and resets the options
it leaves out (``max_split_size_mb``, ``roundup_power2_divisions``,
``garbage_collection_threshold``) to their defaults, so the caller's string is
passed back with only that key changed. Not covered: ``roundup_power2_divisions``
(it rounds requests up further than the plan counts) and the ``cudaMallocAsync``
backend (another allocator: left alone).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_KEY = "expandable_segments"
_lock = threading.Lock()
_depth = 0  # planned calls inside the setting (threads, or a call within a call)
_restore: str | None = None  # the caller's settings, to give back when _depth returns to 0


def _get_settings() -> str | None:
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return None if getter is None else str(getter())


def _set_settings(settings: str) -> None:
    torch._C._accelerator_setAllocatorSettings(settings)


def _items(settings: str) -> list[str]:
    """The comma-separated items of ``settings`` (a bracketed list's inner items
    come apart too; joined again with commas they give back the same string)."""
    return [item for item in settings.replace(" ", "").split(",") if item]


def _enabled(settings: str) -> bool:
    """Whether ``settings`` leaves expandable segments on (its last mention wins)."""
    values = [item.partition(":")[2] for item in _items(settings) if item.startswith(f"{_KEY}:")]
    return bool(values) and values[-1] == "True"


def with_expandable_segments(settings: str, on: bool) -> str:
    """``settings`` with expandable segments set ``on``, every other option kept."""
    kept = [item for item in _items(settings) if not item.startswith(f"{_KEY}:")]
    return ",".join([*kept, f"{_KEY}:{on}"])


def exact_blocks(device: torch.device) -> contextlib.AbstractContextManager:
    """Run the body with CUDA blocks split to their requests (see the module
    docstring); on any other device (nothing to do, on every planned call), or
    where the setting is already on or cannot be read, the body runs as it is."""
    return _expandable_segments() if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _expandable_segments() -> Iterator[None]:
    global _depth, _restore
    with _lock:
        if _depth == 0:
            settings = _get_settings()
            if settings is None or _enabled(settings) or "cudaMallocAsync" in settings:
                settings = None
            else:  # raises before anything is counted, or turns it on
                _set_settings(with_expandable_segments(settings, True))
            _restore = settings
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            restore, _restore = (_restore, None) if _depth == 0 else (None, _restore)
            if restore is not None:  # forgotten first: a failed restore is not retried
                _set_settings(with_expandable_segments(restore, False))
