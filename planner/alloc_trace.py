"""Allocator events from the PyTorch profiler, shared by the memory meter and the
workspace pass.

``profile_memory=True`` records every CPU allocation and free with its size;
the event tree nests them under the op (or ``record_function`` block) that made
them. Kineto prints a line to the process's stderr when a session starts and
stops; we silence the file descriptor for that span so reports stay clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


#: one profiler session at a time in this process: two threads' sessions at once
#: crashed it (a segfault in torch's profiler, with or without planner: two
#: ``run_measured`` calls on two planned modules), and a session records every
#: thread's allocations, so each thread's measurement would count the other's
_ONE_SESSION = threading.RLock()


def profile_allocations(fn: Callable[[], Any]) -> tuple[Any, list[Any]]:
    """Run ``fn()`` under the memory profiler; return its result and the
    top-level events of the profiler's event tree. Sessions in several threads
    run one after the other."""
    from torch.profiler import ProfilerActivity, profile

    with _ONE_SESSION:
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_native_stderr():
            prof.__enter__()
        try:
            result = fn()
        finally:
            with _quiet_native_stderr():
                prof.__exit__(None, None, None)
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError("the PyTorch profiler recorded no results")
    return result, list(results.experimental_event_tree())


def allocations(events: list[Any], device_type: str = "cpu") -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of every allocation (+) and free (-) under ``events``,
    in time order."""
    from torch._C._profiler import _EventType

    found, stack = [], list(events)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == device_type:
            found.append((event.start_time_ns, event.extra_fields.alloc_size))
    found.sort()
    return found


def peak_and_final(allocs: list[tuple[int, int]]) -> tuple[int, int]:
    """Highest running sum of the allocations, and the sum at the end."""
    running = peak = 0
    for _, size in allocs:
        running += size
        peak = max(peak, running)
    return peak, running


def find_events(events: list[Any], prefix: str) -> Iterator[Any]:
    """Events whose name starts with ``prefix`` (not descending into them)."""
    stack = list(events)
    while stack:
        event = stack.pop()
        if event.name.startswith(prefix):
            yield event
        else:
            stack.extend(event.children)
