"""planner/codegen/compile_limit.py: a compile that passes the limit is stopped;
a caller's own armed timer is left alone (and the block then runs unlimited)."""

from __future__ import annotations

import signal
import time

import pytest

from planner.codegen.compile_limit import CompileTimeout, compile_time_limit


def test_a_block_past_the_limit_is_stopped_and_the_handler_restored() -> None:
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(CompileTimeout, match="longer than 0.1 s"):
        with compile_time_limit(0.1):
            time.sleep(5)
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_a_callers_armed_timer_is_left_alone() -> None:
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        with compile_time_limit(0.05):
            time.sleep(0.2)  # not stopped: the caller's timer owns SIGALRM
        time.sleep(0.4)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_timeout_inductor_wrapped_is_still_a_timeout() -> None:
    """Inductor re-raises errors from inside its lowering as ``InductorError``;
    the run's graph must still be remembered as one that timed out."""
    from torch._inductor.exc import InductorError

    from planner.codegen.compile_limit import timed_out

    try:
        try:
            raise CompileTimeout("compiling it took longer than 1 s")
        except CompileTimeout as inner:
            raise InductorError(inner, "traceback") from inner
    except InductorError as wrapped:
        assert timed_out(wrapped)
    assert not timed_out(RuntimeError("no lowering"))
