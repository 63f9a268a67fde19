"""Timing: each op's seconds measured on this machine, replacing the roofline
estimate when the profile describes this machine (a calibrated profile).

Requires: a built Program and its FX graph. Ensures: ``Op.cost.measured_seconds``
for every non-view op: the fastest of a few runs per distinct call signature, on
random inputs of the traced shapes. The calls are timed round-robin, each once per
round, not back to back: a burst of other load on a shared machine (seconds long on
the VM this was written on, where back-to-back timings of one plan's ops summed to
1.7 ms on one plan and 3.0 ms on the next) then slows one sample of many calls, not
all samples of a few, and each call starts with the caches the calls before it
left, as in a real run. Inputs are held for a group of calls at a time
(``GROUP_BYTES``), so timing a large model does not hold all of its inputs.
Measured times still vary a little between runs, so plans made from them are
reproducible only up to that noise; built-in profiles keep the deterministic
roofline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from planner.ir.grad_mode_ops import as_run
from planner.ir.program import Program
from planner.passes.made_up_inputs import MadeUpInputs
from planner.passes.workspace import distinct_calls

log = logging.getLogger(__name__)

#: Bytes of random inputs held at once while timing.
GROUP_BYTES = 256 * 2**20


def annotate_measured_seconds(
    program: Program, graph_module: torch.fx.GraphModule, device: str = "cpu", repeats: int = 5
) -> None:
    signature_of, calls = distinct_calls(program, graph_module)
    measured = time_calls(calls, device, repeats)
    for index, sig in signature_of.items():
        seconds = measured.get(sig)
        if seconds is not None:
            program.ops[index].cost.measured_seconds = seconds


def time_calls(calls: dict[str, torch.fx.Node], device: str, repeats: int) -> dict[str, float]:
    """Fastest seconds of each call over ``repeats`` round-robin rounds; calls that
    fail on random inputs are left out (they keep the roofline estimate)."""
    measured: dict[str, float] = {}
    group: list[tuple[str, Callable[..., Any], tuple, dict]] = []
    held = 0
    made_up = MadeUpInputs()
    for sig, node in calls.items():
        run = as_run(node)
        prepared = _prepare(node, run, device, made_up)
        if prepared is None:
            continue
        args, kwargs = prepared
        group.append((sig, run, args, kwargs))
        held += _input_bytes(args, kwargs)
        if held >= GROUP_BYTES:
            measured.update(_time_round_robin(group, device, repeats))
            group, held = [], 0
    measured.update(_time_round_robin(group, device, repeats))
    return measured


def _prepare(
    node: torch.fx.Node, run: Callable[..., Any], device: str, made_up: MadeUpInputs
) -> tuple[tuple, dict] | None:
    """Random inputs for ``node``, after one warm-up call of ``run`` (its op, as
    the executor runs it); None if it fails."""
    try:
        args, kwargs = made_up.inputs(node, device)
        with torch.no_grad():
            made_up.ran(node, run(*args, **kwargs))
    except Exception as exc:  # unusual inputs: keep the roofline estimate
        log.debug("timing: %s failed on random inputs: %s", node.format_node(), exc)
        return None
    return args, kwargs


def _input_bytes(args: Any, kwargs: Any) -> int:
    leaves = pytree.tree_leaves((args, kwargs))
    return sum(t.untyped_storage().nbytes() for t in leaves if isinstance(t, torch.Tensor))


def _time_round_robin(
    group: list[tuple[str, Callable[..., Any], tuple, dict]], device: str, repeats: int
) -> dict[str, float]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else None
    best = {sig: float("inf") for sig, *_ in group}
    if sync is not None:  # the inputs' and warm-up's kernels end before the first sample
        sync()
    with torch.no_grad():
        for _ in range(repeats):
            for sig, run, args, kwargs in group:
                if sig not in best:
                    continue
                start = time.perf_counter()
                try:
                    run(*args, **kwargs)
                except Exception as exc:  # failed on a second run: no measurement
                    log.debug("timing: %s failed: %s", sig, exc)
                    del best[sig]
                    continue
                if sync is not None:
                    sync()
                # the fastest: on a shared machine the slower samples are other
                # processes' time
                best[sig] = min(best[sig], time.perf_counter() - start)
    return best
