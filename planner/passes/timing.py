"""Timing: each op's seconds measured on this machine, replacing the roofline
estimate when the profile describes this machine (a calibrated profile).

Requires: a built Program and its FX graph. Ensures: ``Op.cost.measured_seconds``
for every non-view op (fastest of a few runs per distinct call signature, on random
inputs of the traced shapes). Measured times vary a little between runs, so plans
made from them are reproducible only up to that noise; built-in profiles keep the
deterministic roofline.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx

from planner.ir.program import Program
from planner.passes.workspace import _materialize, distinct_calls

log = logging.getLogger(__name__)


def annotate_measured_seconds(
    program: Program, graph_module: torch.fx.GraphModule, device: str = "cpu", repeats: int = 5
) -> None:
    signature_of, calls = distinct_calls(program, graph_module)
    measured = {sig: _time_call(node, device, repeats) for sig, node in calls.items()}
    for index, sig in signature_of.items():
        seconds = measured[sig]
        if seconds is not None:
            program.ops[index].cost.measured_seconds = seconds


def _time_call(node: torch.fx.Node, device: str, repeats: int) -> float | None:
    try:
        args, kwargs = _materialize(node, device)
        target = node.target
        with torch.no_grad():
            target(*args, **kwargs)  # type: ignore[operator]  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                target(*args, **kwargs)  # type: ignore[operator]
                times.append(time.perf_counter() - start)
    except Exception as exc:  # unusual inputs: keep the roofline estimate
        log.debug("timing: %s failed on random inputs: %s", node.format_node(), exc)
        return None
    # the fastest: on a shared machine the slower samples are other processes' time
    return min(times)
