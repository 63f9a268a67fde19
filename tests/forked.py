"""Run a function in a forked child, as a child's exit would run it."""

from __future__ import annotations

import os
from collections.abc import Callable


def ran_in_a_forked_child(fn: Callable[[], object]) -> bool:
    """Fork, call ``fn()`` in the child and leave it with ``os._exit`` (not
    through pytest); whether the child exited cleanly."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
