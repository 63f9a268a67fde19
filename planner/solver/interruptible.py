"""CP-SAT solves that a Ctrl-C stops at once.

CP-SAT installs its own SIGINT handler unless told not to, and that handler
replaced Python's for good: after a solve a Ctrl-C killed the process outright
(no KeyboardInterrupt, no clean-up, the offload directory left behind), and one
during a solve was swallowed. Without it, Python's handler still runs only when
the solve returns, up to the solve's wall limit later (tens of seconds). So the
search runs in a worker thread while the main thread waits; a KeyboardInterrupt
there stops the search (``stop_search``) and is raised as soon as it has stopped.
"""

from __future__ import annotations

import threading
from typing import Any

from ortools.sat.python import cp_model

#: seconds between the main thread's checks for a Ctrl-C while it waits
_POLL = 0.05


def solve_interruptibly(
    solver: cp_model.CpSolver, model: cp_model.CpModel, callback: Any = None
) -> Any:
    """``solver.solve(model, callback)``; a KeyboardInterrupt stops the search and
    is raised once it has stopped. Off the main thread (which alone receives
    signals) the solve runs where it is called."""
    solver.parameters.catch_sigint_signal = False
    if threading.current_thread() is not threading.main_thread():
        return solver.solve(model, callback)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["status"] = solver.solve(model, callback)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="planner-cp-sat", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(_POLL)
    except KeyboardInterrupt:
        solver.stop_search()
        worker.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]
