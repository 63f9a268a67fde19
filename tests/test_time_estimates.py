"""A plan's estimated time predicts its measured time within +-25% on this
machine's calibrated profile: every inference example at 100/75/50/30% of its
unplanned peak (or the smallest feasible budget).

Measured against the machine's speed at the time: the planned module and the eager
model run alternately (nine calls each), and the planned module's time over eager's
is compared with its estimate over the unplanned estimate. On a shared machine an
absolute comparison measures the neighbours: on the 2-core VM this was written on,
the eager ResNet example took 5.1-8.0 ms per call within one minute of one process
(3.2 ms earlier the same day), more than the band. The absolute ratios are in
BENCHMARKS.md (estimates). A case tries up to ``ATTEMPTS`` fresh plans and fails
only if none lands within the band, each attempt after the first on a fresh
calibration; a wrong cost model fails every attempt (before
disk reads were priced at page-cache rates, the MLP at 50% ran in 0.38x its
estimate, with eager as fast as its estimate said).

Each attempt runs in a fresh Python process, as a benchmark would. Inside the full
suite's process, after some 600 other tests, the MLP's plans that read weights
from disk ran 1.33-1.52x their estimate relative to eager in 3 of about 8 full
runs, in every attempt (fresh calibrations in that process included), and passed
alone and in a fresh process each time; what in the long process's state slows
them is not established. The processes are forked from a fork server that has
only imported the modules a case needs (``PRELOAD``), so each starts as fresh as
a new interpreter without paying those imports again (2-5 s a case).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
from conftest import load_example

import planner
from planner.runtime.calibrate import calibrate

FRACTIONS = [1.0, 0.75, 0.5, 0.3]
TOLERANCE = 0.25
ATTEMPTS = 3
CALLS = 9

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """The machine calibrated once for the module, saved for the child processes."""
    return calibrate("cpu", quick=True).save(tmp_path_factory.mktemp("profile") / "cpu.json")


#: What a case's process imports before it plans, imported once by the fork
#: server its processes are forked from: this module (and the planner), and the
#: transformers model the GPT-2 example builds. Nothing is run there: no torch op,
#: so no thread pool a forked process could inherit.
PRELOAD = ["planner", "test_time_estimates", "transformers.models.gpt2.modeling_gpt2"]


def _in_a_fresh_process(name: str, fraction: float, profile: Path | None) -> float:
    """``_measured_over_estimated`` run by a new Python process (``profile``: a
    saved one, or None to calibrate there), forked from the fork server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # for the server's first start
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_case, args=(send, name, fraction, profile))
    process.start()
    send.close()
    try:
        assert receive.poll(900), f"no result in 900 s from {name} at {fraction:.0%}"
        outcome, value = receive.recv()
    except EOFError:
        process.join()
        raise AssertionError(f"the process exited with {process.exitcode} and no result") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
    assert outcome == "ok", value[-3000:]
    return value


def _case(send: Connection, name: str, fraction: float, profile: Path | None) -> None:
    """In the process ``_in_a_fresh_process`` started: the ratio, or the error."""
    try:
        loaded = planner.get_profile(str(profile)) if profile else calibrate("cpu", quick=True)
        send.send(("ok", _measured_over_estimated(name, fraction, loaded)))
    except BaseException:
        send.send(("error", traceback.format_exc()))


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _measured_over_estimated(name: str, fraction: float, profile) -> float:
    """(planned / eager measured side by side) / (planned / unplanned estimated),
    for one fresh plan."""
    reference, inputs = load_example(name)
    model, _ = load_example(name)
    budget = int(planner.analyze(model, inputs, profile=profile).unplanned_peak_bytes * fraction)
    try:
        pm = planner.plan(model, budget, inputs, profile=profile, time_limit=5)
    except planner.BudgetTooSmall as exc:
        assert exc.min_budget is not None and exc.min_budget > budget
        model, inputs = load_example(name)
        pm = planner.plan(model, exc.min_budget, inputs, profile=profile, time_limit=5)
    try:
        planned, eager = [], []
        with torch.no_grad():
            pm(*inputs), reference(*inputs)  # warm-up
            for _ in range(CALLS):
                planned.append(_seconds(pm, *inputs))
                eager.append(_seconds(reference, *inputs))
        measured = statistics.median(planned) / statistics.median(eager)
        estimated = pm.plan.estimated_seconds / pm.plan.unplanned_estimated_seconds
        return measured / estimated
    finally:
        pm.close()


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", ["mlp", "resnet", "unet", "gpt2"])
def test_measured_time_is_within_25_percent_of_the_estimate(
    name: str, fraction: float, profile: Path
) -> None:
    ratios = []
    for attempt in range(ATTEMPTS):
        # the module's profile was measured once, perhaps in a burst of other load:
        # later attempts measure the machine again
        ratio = _in_a_fresh_process(name, fraction, profile if attempt == 0 else None)
        if abs(ratio - 1) <= TOLERANCE:
            return
        ratios.append(ratio)
    pytest.fail(
        f"{name} at {fraction:.0%}: measured/estimated time (each relative to eager) "
        f"{', '.join(f'{r:.2f}' for r in ratios)} in {ATTEMPTS} plans, none within "
        f"1 +- {TOLERANCE}"
    )
