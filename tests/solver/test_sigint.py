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
