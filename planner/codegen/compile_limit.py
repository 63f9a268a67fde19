"""A time limit on compiling one run with Inductor.

Inductor's C++ code generation can spend unbounded time in sympy: on Funnel
Transformer's relative-attention shift, ``TilingSelect.select_tiling`` ->
``stride_at`` -> ``sympy.simplify`` ran for more than 8 minutes on one run, and
plain ``torch.compile`` of the model stops in the same place. A run whose compile
passes the limit stays eager, as a run Inductor cannot compile does, and so does
every later run with the same graph in this process (measured room compiles the
same runs for each schedule it tries).

The limit is a ``SIGALRM`` timer: POSIX, the main thread only, and only when no
other timer is armed (a caller's own alarm is left alone). Elsewhere compiles are
not limited. ``PLANNER_COMPILE_TIME_LIMIT`` (seconds; 0: none) sets it; the default,
120 s, is about five times the longest compile of one run seen here (25 s): Funnel
has four such runs in a schedule.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CompileTimeout(Exception):
    """Compiling one run took longer than the limit."""


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, a ``CompileTimeout`` (Inductor re-raises an
    error from inside its lowering as its own ``InductorError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CompileTimeout):
            return True
        seen.add(id(current))
        inner = getattr(current, "inner_exception", None)
        current = (
            inner
            if isinstance(inner, BaseException)
            else (current.__cause__ or current.__context__)
        )
    return False


#: seconds, where ``PLANNER_COMPILE_TIME_LIMIT`` does not say (module docstring)
DEFAULT_LIMIT_SECONDS = 120.0


def limit_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("PLANNER_COMPILE_TIME_LIMIT", DEFAULT_LIMIT_SECONDS)))
    except ValueError:
        return DEFAULT_LIMIT_SECONDS


@contextmanager
def compile_time_limit(seconds: float | None = None) -> Iterator[None]:
    """Raise ``CompileTimeout`` in the block once ``seconds`` (default: the
    configured limit) have passed, where that can be done safely."""
    seconds = limit_seconds() if seconds is None else seconds
    if (
        seconds <= 0
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CompileTimeout(
            f"compiling it took longer than {seconds:g} s (PLANNER_COMPILE_TIME_LIMIT)"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
