"""Training at the smallest budget: memory counted in bytes against rounded units.

CP-SAT's memory rows once counted in units of about a two-millionth of a problem's
bytes, each term rounded up. At ``budget="min"`` a plan has no slack, the rounding
passed the floor, CP-SAT was infeasible at once and the memory-minimizing plan was
kept. The rows now count bytes, as the validator does. This script plans each
example at ``budget="min"`` both ways, on two copies of the model, then steps the
two planned modules in turn in one process (forward and backward of the output's
sum, summed inside the planned step) and compares their median step times; each
plan's peak is measured by the independent meter on a step of its own.

    python benchmarks/min_budget_bench.py [--examples gpt2 llama unet mlp] [--rounds 10]

"rounded" reproduces the old accounting by rounding every held byte count up, and
the budget down, to the old unit (the rows are then the old rows times the unit).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import planner  # noqa: E402
import planner.solver.model as placement_model  # noqa: E402
from planner.runtime.meter import measure  # noqa: E402

# the module, not the function ``planner.solver`` exports under its name
solve_module = importlib.import_module("planner.solver.solve")

EXAMPLES = {
    "gpt2": ("examples.gpt2", "make_gpt2"),
    "llama": ("examples.llama", "make_llama"),
    "unet": ("examples.unet", "make_unet"),
    "mlp": ("examples.mlp", "make_mlp"),
}
#: the old scale: a problem's bytes over this many units
OLD_MEMORY_UNITS = 2_000_000


def _old_unit(problem: Any) -> int:
    total = sum(t.nbytes for t in problem.tensors) + max(
        (s.workspace_bytes for s in problem.steps), default=0
    )
    return max(1, total // OLD_MEMORY_UNITS)


@contextmanager
def _rounded_units() -> Iterator[None]:
    """The placement model with the old rounding while planning: every held byte
    count and each step's fixed bytes rounded up to the old unit, the budget down."""
    held_by_step = placement_model._held_by_step
    model = solve_module.PlacementModel

    def rounded_holdings(cands: Any, T: int) -> Any:
        held = held_by_step(cands, T)
        u = _old_unit(cands.problem)
        return dataclasses.replace(held, nbytes=-(-held.nbytes // u) * u)

    class Rounded(model):  # type: ignore[misc, valid-type]
        def __init__(self, cands: Any, minimize_peak: bool = False) -> None:
            u = _old_unit(cands.problem)
            problem = cands.problem
            rounded = dataclasses.replace(
                cands,
                problem=dataclasses.replace(problem, budget_bytes=problem.budget_bytes // u * u),
                fixed=[-(-f // u) * u for f in cands.fixed],
            )
            super().__init__(rounded, minimize_peak)

    placement_model._held_by_step = rounded_holdings
    solve_module.PlacementModel = Rounded  # type: ignore[misc]
    try:
        yield
    finally:
        placement_model._held_by_step = held_by_step
        solve_module.PlacementModel = model  # type: ignore[misc]


class _SumLoss(torch.nn.Module):
    """The example's output summed inside the planned step, so the meter sees
    nothing made outside the plan."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        return (out if isinstance(out, torch.Tensor) else out[0]).float().sum()


def _step(pm: torch.nn.Module, inputs: tuple) -> None:
    pm(*inputs).backward()
    for p in pm.parameters():
        p.grad = None


def run(example: str, rounds: int) -> dict[str, Any]:
    module, factory = EXAMPLES[example]
    make = getattr(importlib.import_module(module), factory)
    planned: dict[str, tuple[Any, tuple]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label in ("rounded", "bytes"):
        model, inputs = make()
        model = _SumLoss(model)
        start = time.perf_counter()
        if label == "rounded":
            with _rounded_units():
                pm = planner.plan(model, "min", example_inputs=inputs, mode="train")
        else:
            pm = planner.plan(model, "min", example_inputs=inputs, mode="train")
        seconds = time.perf_counter() - start
        _step(pm, inputs)  # warm
        _, metered = measure(lambda pm=pm, inputs=inputs: _step(pm, inputs), pm, inputs)
        planned[label] = (pm, inputs)
        rows[label] = {
            "budget": pm.plan.budget_bytes,
            "solver": f"{pm.report.solver['name']} {pm.report.solver['status']}",
            "estimated": pm.plan.estimated_seconds,
            "metered": metered.peak_bytes,
            "plan_seconds": seconds,
            "steps": [],
        }
    for _ in range(rounds):
        for label, (pm, inputs) in planned.items():
            start = time.perf_counter()
            _step(pm, inputs)
            rows[label]["steps"].append(time.perf_counter() - start)
    for row in rows.values():
        row["median"] = statistics.median(row["steps"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| example | accounting | budget | solver | est. s/step | median s/step | metered peak |")
    print("|---|---|---|---|---|---|---|")
    for example in args.examples:
        rows = run(example, args.rounds)
        for label, row in rows.items():
            within = "within" if row["metered"] <= row["budget"] else "OVER"
            print(
                f"| {example} | {label} | {row['budget']:,} | {row['solver']} | "
                f"{row['estimated']:.4f} | {row['median']:.4f} | "
                f"{row['metered']:,} ({within}) |"
            )
        ratio = rows["bytes"]["median"] / rows["rounded"]["median"]
        print(f"| {example} | bytes / rounded | | | | {ratio:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
