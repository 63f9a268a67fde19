"""What a training set's last, smaller batch costs when both shapes share one plan's
homes, side by side.

Model: the GPT-2 training example (``examples/gpt2.py``, LM loss inside, batch
``--batch``) and a last batch of its first ``--last`` sequences. Rows, each on its
own copy of the model from one seed:

- eager: a step of each shape;
- planner X, together: ``planner.plan(model, X, full, mode="train",
  extra_example_inputs=[last])``, one module, a step of each shape through it
  (the last batch's plan bound to the homes the full batch's plan chose);
- planner X, last alone: the last batch planned by itself at the same budget in
  bytes (what a module serving only that shape would do; a training loop cannot
  keep two such modules of one model, see README "Training on batches of more
  than one shape").

A step is forward + backward (gradients cleared before, no optimizer: every row
computes the same step each round). Timing: one warm-up step per row and shape,
then ``--repeats`` rounds in each of which every row steps once per shape, the
order rotated per round; medians. Peak: the independent meter over one step
(``run_measured_step``; eager: ``measure``).

    python benchmarks/last_batch_bench.py --out BENCHMARKS_last_batch.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import gpt2  # noqa: E402
from bench_common import uptime, write_report  # noqa: E402

import planner  # noqa: E402
from planner.runtime.meter import measure  # noqa: E402

MiB = 1 << 20


def _model(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    lm, inputs = gpt2._build(batch=batch)
    return gpt2.GPT2LMLoss(lm), inputs


def _stepper(module: nn.Module, params: list[torch.Tensor]) -> Callable[[tuple], None]:
    def step(inputs: tuple) -> None:
        for p in params:
            p.grad = None
        module(*inputs).backward()

    return step


def _peak(module: nn.Module, inputs: tuple, planned: bool) -> int:
    if planned:
        module.run_measured_step(*inputs)
        return module.measured.peak_bytes
    _, measured = measure(lambda: module(*inputs).backward(), module, inputs)
    return measured.peak_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--last", type=int, default=3)
    ap.add_argument("--budgets", nargs="+", default=["50%", "30%"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load_before, started = uptime(), time.perf_counter()

    model, full = _model(args.batch)
    last = tuple(x[: args.last].clone() for x in full)
    shapes = {"full": full, "last": last}
    options = {"mode": "train", "profile": "cpu", "time_limit": args.time_limit}
    # row -> (module, planned, {shape: step}), and notes
    rows: dict[str, tuple[nn.Module, bool, list[str]]] = {"eager": (model, False, ["full", "last"])}
    notes: dict[str, str] = {"eager": ""}
    for budget in args.budgets:
        m, _ = _model(args.batch)
        start = time.perf_counter()
        pm = planner.plan(m, budget, full, extra_example_inputs=[last], **options)
        took = time.perf_counter() - start
        on_disk = sum(d.home != "device" for d in pm.plan.tensors if d.kind == "param")
        rows[f"planner {budget}, together"] = (pm, True, ["full", "last"])
        notes[f"planner {budget}, together"] = (
            f"budget {pm.plan.budget_bytes / MiB:.1f} MiB; {on_disk} parameters homed off "
            f"the device; both planned in {took:.0f} s"
        )
        alone_model, _ = _model(args.batch)
        alone = planner.plan(alone_model, pm.plan.budget_bytes, last, **options)
        alone_off = sum(d.home != "device" for d in alone.plan.tensors if d.kind == "param")
        rows[f"planner {budget}, last alone"] = (alone, True, ["last"])
        notes[f"planner {budget}, last alone"] = (
            f"same budget in bytes; {alone_off} parameters homed off the device"
        )

    steps = {
        (row, shape): _stepper(module, list(module.parameters()))
        for row, (module, _, row_shapes) in rows.items()
        for shape in row_shapes
    }
    peaks = {(row, shape): _peak(rows[row][0], shapes[shape], rows[row][1]) for row, shape in steps}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for key, step in steps.items():  # warm-up
        step(shapes[key[1]])
    order = list(steps)
    for r in range(args.repeats):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            steps[key](shapes[key[1]])
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(t) for key, t in times.items()}

    lines = [
        "# A last, smaller batch: one module for both shapes vs the last batch planned alone",
        "",
        f"Command: `python benchmarks/last_batch_bench.py {' '.join(argv or sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}.  ",
        f"Load before: `{load_before}`  ",
        f"Load after: `{uptime()}`  ",
        f"Wall time of the run: {time.perf_counter() - started:.0f} s.",
        "",
        f"GPT-2 training example (LM loss inside), batch {args.batch}; last batch: its first "
        f"{args.last} sequences. Budgets are shares of the full batch's unplanned peak. "
        f"Step = forward + backward; {args.repeats} rounds, rotated order, medians.",
        "",
        "| system | shape | measured peak MiB | median s/step | x eager (same shape) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row, shape in steps:
        ratio = median[(row, shape)] / median[("eager", shape)]
        lines.append(
            f"| {row} | {shape} ({shapes[shape][0].shape[0]}) | "
            f"{peaks[(row, shape)] / MiB:.1f} | {median[(row, shape)]:.3f} | {ratio:.2f} | "
            f"{notes[row]} |"
        )
    lines += ["", "All timings (s/step, in round order):", ""]
    lines += [
        f"- {row}, {shape}: {[round(t, 4) for t in times[(row, shape)]]}" for row, shape in steps
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    for module, planned, _ in rows.values():
        if planned:
            module.close()
    if args.out is not None:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
