"""Estimated vs measured time of inference plans on this machine's calibrated profile.

Every inference example (mlp, resnet, unet, gpt2) at 100/75/50/30% of its unplanned
peak (or the smallest feasible budget), planned with a profile calibrated once
(``calibrate(quick=True)``), one plan per cell, no retries. Each plan's module and
the eager model run alternately, ``--calls`` calls each, per round; a cell gives the
medians over ``--rounds`` rounds taken minutes apart (all examples in turn), so a
slow spell of the shared machine shows as a spread, not as one number:

- ``estimate``: the plan's estimated ms; ``measured``: the planned module's median ms;
  ``eager``: the eager model's median ms in the same rounds;
- ``meas/est``: measured over estimate (the absolute check);
- ``rel``: (measured / eager) / (estimate / unplanned estimate): the check
  tests/test_time_estimates.py makes, against the machine's speed at the time.

    python benchmarks/estimate_bench.py --out BENCHMARKS_estimates.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import uptime, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_example  # noqa: E402

import planner  # noqa: E402
from planner.runtime.calibrate import calibrate  # noqa: E402

EXAMPLES = ["mlp", "resnet", "unet", "gpt2"]
FRACTIONS = [1.0, 0.75, 0.5, 0.3]


def _plan(name: str, fraction: float, profile):
    model, inputs = load_example(name)
    budget = int(planner.analyze(model, inputs, profile=profile).unplanned_peak_bytes * fraction)
    try:
        return planner.plan(model, budget, inputs, profile=profile, time_limit=5), inputs, ""
    except planner.BudgetTooSmall as exc:
        assert exc.min_budget is not None
        model, inputs = load_example(name)
        pm = planner.plan(model, exc.min_budget, inputs, profile=profile, time_limit=5)
        return pm, inputs, f" (min {exc.min_budget / budget:.0%} of asked)"


def _median_seconds(fn, inputs, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=9)
    args = parser.parse_args()
    load_before = uptime()
    profile = calibrate("cpu", quick=True)
    cells = {}
    for name in EXAMPLES:
        reference, _ = load_example(name)
        for fraction in FRACTIONS:
            pm, inputs, note = _plan(name, fraction, profile)
            cells[name, fraction] = {"pm": pm, "ref": reference, "inputs": inputs, "note": note}
            cells[name, fraction].update(planned=[], eager=[])
            print(f"planned {name} at {fraction:.0%}{note}", flush=True)
    with torch.no_grad():
        for _ in range(args.rounds):
            for cell in cells.values():
                pm, ref, inputs = cell["pm"], cell["ref"], cell["inputs"]
                pm(*inputs), ref(*inputs)  # warm-up
                for _ in range(args.calls):
                    cell["planned"].append(_median_seconds(pm, inputs, 1))
                    cell["eager"].append(_median_seconds(ref, inputs, 1))
    rows = [
        "| example | budget | estimate ms | measured ms | eager ms | meas/est | rel |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    absolute, relative = [], []
    for (name, fraction), cell in cells.items():
        pm = cell["pm"]
        calls = args.calls
        per_round = [
            (
                statistics.median(cell["planned"][i : i + calls]),
                statistics.median(cell["eager"][i : i + calls]),
            )
            for i in range(0, len(cell["planned"]), calls)
        ]
        est = pm.plan.estimated_seconds
        est_rel = est / pm.plan.unplanned_estimated_seconds
        meas = [p for p, _ in per_round]
        eager = [e for _, e in per_round]
        abs_ratios = [p / est for p in meas]
        rel_ratios = [(p / e) / est_rel for p, e in per_round]
        absolute += abs_ratios
        relative += rel_ratios
        rows.append(
            f"| {name} | {fraction:.0%}{cell['note']} | {est * 1e3:.2f} | "
            f"{' / '.join(f'{p * 1e3:.2f}' for p in meas)} | "
            f"{' / '.join(f'{e * 1e3:.2f}' for e in eager)} | "
            f"{' / '.join(f'{r:.2f}' for r in abs_ratios)} | "
            f"{' / '.join(f'{r:.2f}' for r in rel_ratios)} |"
        )
        pm.close()

    def within(ratios):
        return sum(abs(r - 1) <= 0.25 for r in ratios)

    text = "\n".join(
        [
            "# Estimated vs measured time (inference, calibrated profile)",
            "",
            "Generated by `python benchmarks/estimate_bench.py`; see its docstring for the "
            "method. Cells with three numbers are the three rounds.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}. Load before: `{load_before}`; after: `{uptime()}`.",
            f"Profile: disk read {profile.disk_read_bandwidth / 1e9:.2f} GB/s, page-cache read "
            f"{(profile.disk_cached_read_bandwidth or 0) / 1e9:.2f} GB/s, page-cache write "
            f"{(profile.disk_cached_write_bandwidth or 0) / 1e9:.2f} GB/s.",
            "",
            *rows,
            "",
            f"Within +-25%: meas/est {within(absolute)} of {len(absolute)} round medians, "
            f"rel {within(relative)} of {len(relative)}.",
            "",
        ]
    )
    print(text)
    if args.out:
        write_report(ROOT / args.out if not args.out.is_absolute() else args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
