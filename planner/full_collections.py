"""Python's full garbage collections deferred while a model is captured, analyzed
and solved.

Those phases make millions of objects that live to their end (the traced graphs,
the solver's model) on top of what torch itself keeps, and Python's collector runs
a full pass over every object each time long-lived ones grew by a quarter: 1.8 s
of full passes in a 11.8 s plan of a 32-layer GPT-2 for training, 0.5 s with
them deferred here (``gc.callbacks``, CPU, BENCHMARKS_solver.md). Young
generations are still collected; only the oldest waits, and the thresholds are
put back when the outermost such call returns, so the next full pass runs soon
after. The cost is the cyclic garbage of the oldest generation held that much
longer; that plan's peak host memory was 834-863 MiB either way. Not while
Inductor compiles runs (``kernels="inductor"``): deferred there too, GPT-2's
plan held 370 MiB more (1355 against 987 MiB) and was no faster.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: the oldest generation's threshold while planning: in effect, never
_DEFERRED = 1_000_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, int, int] | None = None


def _enter() -> None:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            young, middle, oldest = _saved
            gc.set_threshold(young, middle, max(oldest, _DEFERRED))
        _depth += 1


def _leave() -> None:
    global _depth, _saved
    with _lock:
        _depth -= 1
        if _depth == 0 and _saved is not None:
            young, middle, oldest = _saved
            # the caller changed the thresholds meanwhile: theirs stand
            if gc.get_threshold() == (young, middle, max(oldest, _DEFERRED)):
                gc.set_threshold(young, middle, oldest)
            _saved = None


def full_collections_deferred(fn: F) -> F:
    """``fn`` run with the oldest generation's collections deferred (nested and
    concurrent calls share one deferral; the last to return ends it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()

    return wrapper  # type: ignore[return-value]
