"""Training steps under memory pressure: planner vs checkpointing vs torch.compile.

Two workloads, each a module that returns its loss (so a step is ``loss =
m(*inputs); loss.backward()``, no optimizer):

- gpt2: ``examples/gpt2.py:make_gpt2_train`` (4 layers, width 256, batch 8 x 128
  tokens, vocabulary 8192, the LM loss inside);
- cnn: ``examples/resnet_cnn.py:make_resnet`` plus a cross-entropy loss on fixed
  labels (batch ``--cnn-batch``, 32x32 images).

Systems, all in one process, each on a freshly built (identically seeded) model:

- eager: the model as is;
- checkpoint: ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` around every
  block (GPT-2: each ``transformer.h[i]``; CNN: the stem and each residual block);
- compile@b: ``torch.compile`` (Inductor) with
  ``torch._functorch.config.activation_memory_budget = b`` for b in ``--compile-budgets``
  (the min-cut partitioner's memory/recompute knob; 1 = its default);
- planner@x: ``planner.plan(model, x, mode="train")`` at 75%, 60%, 50% and 30% of the
  unplanned peak, and at the smallest feasible budget (``BudgetTooSmall.min_budget``),
  with a profile calibrated once (``calibrate(quick=True)``);
- planner+inductor@x: the same with ``kernels="inductor"`` (runs of ops between the
  plan's memory steps compiled by Inductor) at ``--inductor-shares``.

Peak: planner's independent meter (``planner.runtime.meter.measure``) over one step,
gradients cleared first, the module and inputs passed as resident (parameters,
buffers, inputs) plus every allocation during forward + backward (gradients
included). Time: seconds per step after warm-up. This machine is shared (see the load
average in the output), so timing is interleaved: eager, checkpoint and the planner
rows take one step each per round, in rotating order; each compile row (which cannot
share a process-wide compile cache with the others) takes its steps in rounds with
eager and with the planner's 50% rows, so the target compares the planner's and
compile's seconds per step from the same rounds. ``x eager`` is the median of a row
over the median of the eager steps taken in the same rounds; ``min`` is the fastest
step (the least disturbed by other load).

    python benchmarks/training_bench.py --out BENCHMARKS_training.md

``--device cuda`` runs every system on the GPU (the meter then reads CUDA's
allocator counters; each timed step is synchronized). A full run takes several
minutes on a 2-core CPU (most of it Inductor compiling; a
second run reuses Inductor's on-disk cache and is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from bench_common import short_error, uptime, write_report  # noqa: E402

import planner  # noqa: E402
from planner.runtime.meter import measure  # noqa: E402

log = logging.getLogger("training_bench")
MiB = 1 << 20
#: Where every system runs (``--device``); set once in main().
DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for queued kernels, so a CUDA step's time is the step's, not its launch's."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def on_device(factory: Callable) -> Callable:
    """``factory`` with its model and inputs moved to ``DEVICE``."""

    def moved() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model, inputs = factory()
        return model.to(DEVICE), tuple(x.to(DEVICE) for x in inputs)

    return moved


# --------------------------------------------------------------------------- workloads


class CNNLoss(nn.Module):
    """The residual CNN plus cross-entropy on the given labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), labels)


def make_gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from gpt2 import make_gpt2_train

    return make_gpt2_train()


def make_cnn(batch: int) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def factory() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import resnet_cnn

        torch.manual_seed(0)
        model = resnet_cnn.ResNetCNN()
        x = torch.randn(batch, 3, resnet_cnn.IMAGE_SIZE, resnet_cnn.IMAGE_SIZE)
        labels = torch.randint(0, resnet_cnn.NUM_CLASSES, (batch,))
        return CNNLoss(model), (x, labels)

    return factory


def _checkpoint_module(block: nn.Module) -> None:
    """Route ``block``'s forward through non-reentrant activation checkpointing."""
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]


def checkpoint_blocks(workload: str, model: nn.Module) -> int:
    if workload == "gpt2":
        blocks = list(model.model.transformer.h)
    else:
        blocks = [model.model.stem, *model.model.stages]
    for block in blocks:
        _checkpoint_module(block)
    return len(blocks)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    workload: str
    system: str
    label: str
    fn: Callable[..., torch.Tensor] | None = None
    model: nn.Module | None = None
    inputs: tuple[torch.Tensor, ...] = ()
    resident: tuple[Any, ...] = ()
    times: list[float] = field(default_factory=list)
    ref_times: list[float] = field(default_factory=list)  # eager steps paired with these
    peak: int | None = None
    loss: float | None = None
    error: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    pm: Any = None

    def step(self) -> torch.Tensor:
        assert self.fn is not None and self.model is not None
        for p in self.model.parameters():
            p.grad = None
        loss = self.fn(*self.inputs)
        loss.backward()
        return loss

    def timed_step(self) -> float:
        _sync()
        start = time.perf_counter()
        self.step()
        _sync()
        seconds = time.perf_counter() - start
        self.times.append(seconds)
        return seconds

    def meter(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        loss, m = measure(self.step, *self.resident, device=DEVICE.type)
        self.peak = m.peak_bytes
        self.loss = float(loss.detach())

    def release(self) -> None:
        if self.pm is not None:
            self.pm.close()
        self.fn = self.model = self.pm = None
        self.inputs = self.resident = ()


# --------------------------------------------------------------------------- systems


def eager_row(workload: str, factory: Callable) -> Row:
    model, inputs = factory()
    return Row(workload, "eager", "eager", model, model, inputs, (model, inputs))


def checkpoint_row(workload: str, factory: Callable) -> Row:
    model, inputs = factory()
    n = checkpoint_blocks(workload, model)
    row = Row(workload, "checkpoint", "checkpoint every block", model, model, inputs,
              (model, inputs))
    row.notes = f"{n} blocks"
    if workload == "cnn":
        row.notes += "; BatchNorm stats update twice per step (forward replay)"
    return row


def planner_rows(workload: str, factory: Callable, profile: Any, time_limit: float,
                 unplanned_peak: int, shares: list[str]) -> list[Row]:
    """Rows at ``shares`` (default 75%, 60%, 50%, 30%) and, with "min" among them,
    the smallest feasible budget: when the lowest share fits, budgets are scanned
    downwards in steps of 5% until BudgetTooSmall; the smallest budget that planned
    is the "min" row (its ``min_budget`` is checked against it)."""
    rows: list[Row] = []
    min_budget: int | None = None
    lowest_ok: Row | None = None
    for spec in [s for s in shares if s != "min"]:
        row = _plan_row(workload, factory, spec, f"planner {spec}", profile, time_limit,
                        unplanned_peak)
        if isinstance(row, int):  # BudgetTooSmall: the smallest feasible budget
            min_budget = row
            rows.append(Row(workload, "planner", f"planner {spec}",
                            error=f"BudgetTooSmall: min_budget {min_budget / MiB:.2f} MiB "
                                  f"= {min_budget / unplanned_peak:.1%} of the unplanned peak"))
            break
        rows.append(row)
        lowest_ok = row
    if "min" not in shares:
        return rows
    share = 25
    while min_budget is None and share > 0:
        row = _plan_row(workload, factory, f"{share}%", f"planner {share}%", profile,
                        time_limit, unplanned_peak)
        if isinstance(row, int):
            min_budget = row
        else:
            if lowest_ok is not None and lowest_ok.label not in [r.label for r in rows]:
                lowest_ok.release()
            lowest_ok = row
        share -= 5
    if (lowest_ok is not None and min_budget is not None
            and min_budget > lowest_ok.extra["budget_bytes"]):
        # BudgetTooSmall's min_budget is above a budget that planned: keep the lower one
        lowest_ok.extra["min_budget_bug"] = min_budget
        if lowest_ok.label not in [r.label for r in rows]:
            lowest_ok.label = (f"planner min found ({lowest_ok.extra['budget_share']:.1%})")
            lowest_ok.extra["is_min"] = True
            rows.append(lowest_ok)
        else:
            lowest_ok.extra["is_min"] = True
        lowest_ok.notes = (f"BudgetTooSmall below this reported min_budget "
                           f"{min_budget / MiB:.2f} MiB ({min_budget / unplanned_peak:.1%}), "
                           f"above this feasible budget (planner bug)")
        return rows
    if min_budget is not None:
        row = _plan_row(workload, factory, min_budget,
                        f"planner min ({min_budget / unplanned_peak:.1%})", profile,
                        time_limit, unplanned_peak)
        if isinstance(row, int):
            rows.append(Row(workload, "planner", "planner min",
                            error=f"BudgetTooSmall at its own min_budget {min_budget}: "
                                  f"now says {row}"))
        else:
            row.extra["is_min"] = True
            rows.append(row)
    return rows


def inductor_rows(workload: str, factory: Callable, profile: Any, time_limit: float,
                  unplanned_peak: int, shares: list[str]) -> list[Row]:
    """Rows of ``planner.plan(..., kernels="inductor")`` at each share of the eager
    graph's unplanned peak, passed in bytes: the graph a compiled plan runs has
    channels-last copies (planner/ir/conv_layout.py), so its own unplanned peak, which
    a share would refer to, is a little higher."""
    rows = []
    for spec in shares:
        label = f"planner+inductor {spec}"
        budget = int(unplanned_peak * float(spec.rstrip("%")) / 100)
        row = _plan_row(workload, factory, budget, label, profile, time_limit, unplanned_peak,
                        kernels="inductor")
        if isinstance(row, int):
            row = Row(workload, "planner", label,
                      error=f"BudgetTooSmall: min_budget {row / MiB:.2f} MiB")
        rows.append(row)
    return rows


def _plan_row(workload: str, factory: Callable, budget: str | int, label: str,
              profile: Any, time_limit: float, unplanned_peak: int,
              kernels: str = "eager") -> Row | int:
    model, inputs = factory()
    start = time.perf_counter()
    try:
        pm = planner.plan(model, budget, inputs, mode="train", profile=profile,
                          time_limit=time_limit, kernels=kernels)
    except planner.BudgetTooSmall as exc:
        log.info("%s %s: BudgetTooSmall (min %s)", workload, budget, exc.min_budget)
        return int(exc.min_budget)
    except Exception as exc:  # report, don't abort the benchmark
        traceback.print_exc()
        return Row(workload, "planner", label, error=short_error(exc))
    seconds = time.perf_counter() - start
    plan = pm.plan
    decisions = Counter()
    moved = Counter()
    for t in plan.tensors:
        if t.decision != "keep":
            for part in t.decision.split("+"):
                if part != "keep":
                    decisions[part] += 1
                    moved[part] += t.nbytes
    row = Row(workload, "planner", label, pm, model, inputs, (pm, inputs), pm=pm)
    row.extra.update(
        budget_bytes=plan.budget_bytes,
        budget_share=plan.budget_bytes / unplanned_peak,
        # with compiled runs: the replay at eager steps, measured allocations in runs
        predicted_peak=plan.compiled_peak_bytes or plan.predicted_peak_bytes,
        est=plan.estimated_seconds,
        est_unplanned=plan.unplanned_estimated_seconds,
        solver=f"{plan.solver.status} {plan.solver.seconds:.1f}s",
        plan_seconds=seconds,
        decisions=dict(decisions),
        moved_bytes=dict(moved),
        actions=Counter(a.kind for a in plan.actions),
    )
    if kernels == "inductor":
        k = pm.report.kernels
        row.notes = (f"{k['compiled']} of {k['runs']} runs compiled "
                     f"({k['compiled_ops']} of {k['ops']} ops)")
        if plan.op_level_budget_bytes:
            row.notes += (f"; schedule solved op by op for "
                          f"{plan.op_level_budget_bytes / MiB:.1f} MiB (measured room)")
    log.info("%s %s: planned in %.1f s (%s)", workload, label, seconds, row.extra["solver"])
    return row


def run_compile_rows(workload: str, factory: Callable, budgets: list[float],
                     eager: Row, warmup: int, repeats: int,
                     partners: list[Row] | None = None) -> list[Row]:
    """Each compile row steps in turn with eager and with each of ``partners`` (the
    planner rows the target compares with it), rotating the order per round, so
    the target's planner-vs-compile comparison is of steps taken side by side."""
    import torch._functorch.config as functorch_config

    partners = [p for p in partners or [] if p.error is None]

    rows = []
    original = functorch_config.activation_memory_budget
    try:
        for b in budgets:
            torch._dynamo.reset()
            functorch_config.activation_memory_budget = b
            model, inputs = factory()
            compiled = torch.compile(model)
            row = Row(workload, "compile", f"compile amb={b:g}", compiled, model, inputs,
                      (model, inputs))
            try:
                start = time.perf_counter()
                row.step()  # compiles forward and backward
                row.extra["compile_seconds"] = time.perf_counter() - start
                for _ in range(warmup):
                    row.step()
                side = row.extra["partner_times"] = {p.label: [] for p in partners}
                for i in range(repeats):
                    turn = [eager, row, *partners]
                    for r in turn[i % len(turn):] + turn[: i % len(turn)]:
                        r.timed_step()
                        if r is eager:
                            row.ref_times.append(eager.times.pop())  # kept with this row
                        elif r is not row:
                            side[r.label].append(r.times.pop())  # not the partner's own
                row.meter()
                log.info("%s %s: compile %.1f s, median %.3f s", workload, row.label,
                         row.extra["compile_seconds"], statistics.median(row.times))
            except Exception as exc:  # e.g. no C++ compiler: report why
                traceback.print_exc()
                row.error = short_error(exc)
            rows.append(row)
            row.fn = compiled = None  # type: ignore[assignment]
            row.model = None
            gc.collect()
    finally:
        functorch_config.activation_memory_budget = original
        torch._dynamo.reset()
    return rows


def run_interleaved(rows: list[Row], warmup: int, repeats: int) -> None:
    live = [r for r in rows if r.error is None]
    for r in live:
        try:
            for _ in range(warmup):
                r.step()
        except Exception as exc:
            traceback.print_exc()
            r.error = short_error(exc)
    live = [r for r in live if r.error is None]
    for i in range(repeats):
        order = live[i % len(live):] + live[: i % len(live)]
        for r in order:
            r.timed_step()
    eager = next(r for r in live if r.system == "eager")
    for r in live:
        r.ref_times = list(eager.times)
        r.meter()


# --------------------------------------------------------------------------- report


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def render_table(rows: list[Row], unplanned_peak: int, eager_peak: int | None) -> str:
    lines = [
        "| system | measured peak MiB | / unplanned peak | median s/step | min s/step "
        "| x eager (median) | x eager (min) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | - | - | - | - | - | - | {r.error} |")
            continue
        med = statistics.median(r.times)
        ref = statistics.median(r.ref_times) if r.ref_times else float("nan")
        ratio_min = min(r.times) / min(r.ref_times) if r.ref_times else float("nan")
        notes = r.notes
        if r.system == "planner":
            e = r.extra
            dec = ", ".join(f"{k} {v} ({e['moved_bytes'][k] / MiB:.0f} MiB)"
                            for k, v in sorted(e["decisions"].items())) or "all kept"
            notes = (f"budget {_mib(e['budget_bytes'])} MiB ({e['budget_share']:.1%}); "
                     f"predicted peak {_mib(e['predicted_peak'])}; est. {e['est']:.3f} s = "
                     f"{e['est'] / e['est_unplanned']:.2f}x unplanned; {dec}; "
                     f"solver {e['solver']}, plan {e['plan_seconds']:.0f} s")
            if r.peak is not None and r.peak > e["budget_bytes"]:
                notes += (f"; **measured peak OVER budget by {r.peak - e['budget_bytes']:,}"
                          " B**")
            if r.notes:
                notes += "; " + r.notes
        elif r.system == "compile":
            notes = f"compile {r.extra.get('compile_seconds', float('nan')):.0f} s"
        lines.append(
            f"| {r.label} | {_mib(r.peak)} | {r.peak / unplanned_peak:.2f} | {med:.3f} | "
            f"{min(r.times):.3f} | {med / ref:.2f} | {ratio_min:.2f} | {notes} |")
    return "\n".join(lines)


def target_check(rows: list[Row], ratio_limit: float = 1.2,
                 label: str = "planner 50%") -> list[str]:
    """The 50% target: the planner row ``label`` (or, if infeasible and it is the
    eager-kernel row, the smallest feasible budget) within ``ratio_limit`` x eager,
    and faster than checkpointing and compile at an equal or higher measured peak:
    faster than every row of each system whose peak is at least the planner's (a
    compile budget above the lowest such one may run faster)."""
    ok_rows = [r for r in rows if r.error is None and r.peak is not None]
    fifty = next((r for r in ok_rows if r.label == label), None)
    used = fifty
    if used is None and label == "planner 50%":
        used = next((r for r in ok_rows if r.extra.get("is_min")), None)
    out: list[str] = []
    if used is None:
        return [f"- no {label} row (or minimum budget): target not evaluated"]
    if fifty is None:
        out.append(f"- 50% is infeasible; evaluated at the smallest feasible budget "
                   f"instead ({used.label}).")
    med = statistics.median(used.times)
    ratio = med / statistics.median(used.ref_times)
    out.append(f"- {used.label}: {ratio:.2f}x eager (median), limit {ratio_limit}x -> "
               f"**{'met' if ratio <= ratio_limit else 'NOT met'}**; measured peak "
               f"{_mib(used.peak)} MiB.")
    for system in ("checkpoint", "compile"):
        alts = [r for r in ok_rows if r.system == system]
        if not alts:
            out.append(f"- {system}: no successful row, not comparable")
            continue
        # time relative to eager (the same-rounds reference) to cancel load drift
        at_or_above = [r for r in alts if r.peak >= used.peak]
        below = [r for r in alts if r.peak < used.peak]
        beaten = []
        for r in sorted(at_or_above, key=lambda r: r.peak):
            faster, how = _versus(used, ratio, r)
            beaten.append(faster)
            out.append(f"- vs {r.label} ({_mib(r.peak)} MiB >= planner's){how} -> "
                       f"{'planner faster' if faster else 'planner NOT faster'}")
        if beaten:
            out.append(f"- **{'faster' if all(beaten) else 'NOT faster'} than {system}** at an "
                       f"equal or higher peak ({sum(beaten)} of {len(beaten)} rows beaten)")
        if not at_or_above:
            out.append(f"- {system}: every row peaks below the planner's "
                       f"({', '.join(f'{r.label} {_mib(r.peak)}' for r in below)} MiB)")
        for r in below:
            r_ratio = statistics.median(r.times) / statistics.median(r.ref_times)
            out.append(f"  - (lower peak) {r.label}: {_mib(r.peak)} MiB at {r_ratio:.2f}x "
                       f"eager")
    return out


def _versus(used: Row, ratio: float, r: Row) -> tuple[bool, str]:
    """Whether the planner row ``used`` (``ratio`` x eager) is faster than ``r``, and
    how that was measured: seconds side by side when the two were stepped in the
    same rounds, else each one's ratio to eager over its own rounds."""
    side = r.extra.get("partner_times", {}).get(used.label)
    if side:
        mine, theirs = statistics.median(side), statistics.median(r.times)
        return mine < theirs, (
            f", stepped side by side in the same rounds: planner {mine:.3f} s vs "
            f"{theirs:.3f} s per step (median; {mine / theirs:.2f}x; min {min(side):.3f} "
            f"vs {min(r.times):.3f})"
        )
    r_ratio = statistics.median(r.times) / statistics.median(r.ref_times)
    return ratio < r_ratio, f": {r_ratio:.2f}x eager"


# --------------------------------------------------------------------------- main


def bench_workload(name: str, factory: Callable, args: argparse.Namespace,
                   profile: Any) -> dict[str, Any]:
    log.info("=== %s", name)
    model, inputs = factory()
    analysis = planner.analyze(model, inputs, mode="train", profile=profile)
    unplanned = analysis.unplanned_peak_bytes
    del model, analysis
    eager = eager_row(name, factory)
    rows: list[Row] = [eager]
    if "checkpoint" in args.systems:
        rows.append(checkpoint_row(name, factory))
    if "planner" in args.systems:
        rows.extend(planner_rows(name, factory, profile, args.time_limit, unplanned,
                                 args.planner_shares))
    if "inductor" in args.systems:
        rows.extend(inductor_rows(name, factory, profile, args.time_limit, unplanned,
                                  args.inductor_shares))
    log.info("%s: interleaved timing of %d rows", name, len(rows))
    run_interleaved(rows, args.warmup, args.repeats)
    compile_rows: list[Row] = []
    if "compile" in args.systems:
        partners = [r for r in rows if r.label in ("planner 50%", "planner+inductor 50%")]
        compile_rows = run_compile_rows(name, factory, args.compile_budgets, eager,
                                        args.warmup, args.repeats, partners)
    # losses must agree (same seed, same data): a sanity check on every system
    for r in rows + compile_rows:
        if r.error is None and r.loss is not None and eager.loss is not None:
            if abs(r.loss - eager.loss) > 1e-4 * max(1.0, abs(eager.loss)):
                r.notes += f"; loss {r.loss:.6f} != eager {eager.loss:.6f}"
    ordered = ([eager] + [r for r in rows if r.system == "checkpoint"] + compile_rows
               + [r for r in rows if r.system == "planner"])
    result = {"name": name, "rows": ordered, "unplanned": unplanned, "eager_peak": eager.peak}
    for r in rows:
        r.release()
    gc.collect()
    return result


def render(results: list[dict[str, Any]], info: dict[str, Any], args) -> str:
    out = ["# Training benchmark: planner vs checkpointing vs torch.compile", ""]
    out.append(f"Command: `python benchmarks/training_bench.py {' '.join(info['argv'])}`  ")
    out.append(f"Machine: {info['machine']}; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads.  ")
    out.append(f"Load before: `{info['load_before']}`  ")
    out.append(f"Load after: `{info['load_after']}`  ")
    out.append(f"Wall time of the run: {info['wall']:.0f} s; calibrated profile: "
               f"{info['profile']}.")
    out.append("")
    out.append("One step = forward + backward of a module that returns its loss (no "
               "optimizer). Peak: the independent meter, module state + inputs + every "
               "allocation during the step (gradients included). Time: "
               f"{args.repeats} timed steps after {args.warmup} warm-up, interleaved "
               "with eager (see the docstring); `x eager` divides by eager's median "
               "(or min) over the same rounds.")
    for res in results:
        out.append("")
        out.append(f"## {res['name']}")
        out.append("")
        out.append(f"Unplanned peak (planner.analyze): {_mib(res['unplanned'])} MiB; eager "
                   f"measured peak: {_mib(res['eager_peak'])} MiB.")
        out.append("")
        out.append(render_table(res["rows"], res["unplanned"], res["eager_peak"]))
        out.append("")
        out.append("Target (50% of the unplanned peak, <= 1.2x eager, faster than both "
                   "alternatives at an equal or higher measured peak):")
        out.append("")
        for label in ("planner 50%", "planner+inductor 50%"):
            if any(r.label == label for r in res["rows"]):
                out.extend(target_check(res["rows"], label=label))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["gpt2", "cnn"],
                    choices=["gpt2", "cnn"])
    ap.add_argument("--systems", nargs="+",
                    default=["checkpoint", "compile", "planner", "inductor"],
                    choices=["checkpoint", "compile", "planner", "inductor"],
                    help="inductor: planner.plan(kernels='inductor') at --inductor-shares")
    ap.add_argument("--inductor-shares", nargs="+", default=["75%", "50%", "30%"])
    ap.add_argument("--compile-budgets", nargs="+", type=float,
                    default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--planner-shares", nargs="+", default=["75%", "60%", "50%", "30%", "min"],
                    help="planner (eager kernels) budgets; min: scan down to the smallest "
                         "feasible budget")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where every system runs")
    ap.add_argument("--cnn-batch", type=int, default=8,
                    help="images per CNN batch (8 = examples/resnet_cnn.py)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row")
    ap.add_argument("--time-limit", type=float, default=10.0, help="planner solver seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    start = time.perf_counter()
    info: dict[str, Any] = {
        "argv": argv if argv is not None else sys.argv[1:],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "no GPU used"),
        "load_before": uptime(),
    }
    profile: Any = "cpu"
    if "planner" in args.systems or "inductor" in args.systems:
        from planner.runtime.calibrate import calibrate

        with contextlib.redirect_stderr(sys.stderr):
            profile = calibrate(args.device, quick=True)
        host = (f"host {profile.host_bandwidth / 1e9:.1f} GB/s, "
                if profile.host_bandwidth else "")
        info["profile"] = (f"matmul {profile.matmul_flops['float32'] / 1e9:.0f} GFLOP/s fp32, "
                           f"memory {profile.memory_bandwidth / 1e9:.1f} GB/s, {host}disk read "
                           f"{profile.disk_read_bandwidth / 1e9:.2f} GB/s, write "
                           f"{profile.disk_write_bandwidth / 1e9:.2f} GB/s")
    else:
        info["profile"] = "none (planner not run)"
    factories = {"gpt2": on_device(make_gpt2), "cnn": on_device(make_cnn(args.cnn_batch))}
    results = []
    for w in args.workloads:
        results.append(bench_workload(w, factories[w], args, profile))
        info["load_after"] = uptime()
        info["wall"] = time.perf_counter() - start
        text = render(results, info, args)
        if args.out:  # after each workload: a run cut short keeps what it finished
            write_report(args.out, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
