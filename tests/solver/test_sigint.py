"""Ctrl-C after (and during) planning raises KeyboardInterrupt: CP-SAT's own SIGINT
handler used to replace Python's, so a later Ctrl-C killed the process outright
(exit 130, no clean-up, the offload directory left behind)."""

import os
import subprocess
import sys
import textwrap


def test_ctrl_c_after_planning_raises_keyboard_interrupt(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, time, warnings
        warnings.filterwarnings("ignore")
        # Python's own Ctrl-C handler, as in a terminal (a shell's background job
        # starts with SIGINT ignored, and Python then installs none)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import torch, planner
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(3)])
        pm = planner.plan(m, "40%", example_inputs=(torch.randn(8, 256),), time_limit=1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
            print("not interrupted")
        except KeyboardInterrupt:
            pm.close()
            print("interrupted")
        """
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("interrupted")
    assert "not interrupted" not in done.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith("planner-offload-")]


def test_ctrl_c_during_a_solve_stops_it_at_once():
    """The search runs in a worker thread: a Ctrl-C stops it and is raised within
    a fraction of a second, where it waited for the solve's time limit (10 s here)."""
    import signal
    import threading
    import time

    import pytest

    from planner.solver.candidates import build_candidates
    from planner.solver.model import PlacementModel
    from planner.solver.remat_graphs import layered_dag
    from planner.solver.synthetic import problem_from_dag, unplanned_peak, with_budget

    base = problem_from_dag(layered_dag(200, seed=3), 1, backward=True)
    model = PlacementModel(build_candidates(with_budget(base, int(unplanned_peak(base) * 0.4))))
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    # Python's own Ctrl-C handler, as in a terminal (a shell's background job starts
    # with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.solve(10)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    assert time.perf_counter() - start < 4.0
    assert not [t for t in threading.enumerate() if t.name == "planner-cp-sat" and t.is_alive()]
