"""Lossy storage (``quantize=``): memory, time and accuracy of quantized plans.

Four parts, all in one process, each plan on a freshly built (identically seeded)
model; planning releases offloaded / quantized weights from the model it is given,
so every comparison is against a separate, untouched reference model:

- A. inference, ``examples/gpt2.py:make_gpt2`` (4 layers, width 256, batch 4 x 128
  tokens, vocabulary 8192, random weights, seed 0). W = fp32 weight bytes. For
  budgets 0.95 W and 1.2 W and ``quantize`` in (None, "int8", "int4"):
  ``planner.plan(model, budget, inputs, quantize=q)``; measured peak
  (``run_measured``), seconds per forward (``time_call``, median of 5), the weights
  the plan stores quantized (home ``device:<format>``: count, fp32 bytes, stored
  bytes), and the logits against the reference model over 32 random token batches:
  top-1 agreement (mean and min over batches) and relative L2 error (mean). The
  first row is the eager model (median of 5 forwards under ``no_grad``; peak from
  ``planner.measure_unplanned``). When no lossless plan fits at any of these
  budgets, one more row plans ``quantize=None`` at its reported ``min_budget``.
- B. agreement vs margin, for the int8 plan at 0.95 W: positions bucketed by the
  reference logits' top-1 minus top-2 gap, agreement and share of positions per
  bucket. The example's weights are random (std 0.02), so its logits are nearly
  flat over 8192 tokens; disagreements are expected where the top two are closer
  than the quantization noise.
- C. training, ``examples/resnet_cnn.py:make_resnet`` (batch 8, 32x32), loss =
  ``out.pow(2).mean()``. P = the unplanned training peak (``planner.analyze``).
  For budgets 0.3 P, 0.45 P, 0.6 P and ``quantize`` in (None, "int8"): one step's
  loss and gradients against the eager reference (loss relative difference, the
  smallest per-parameter gradient cosine similarity in float64), tensors with a
  quantize decision, measured peak (``run_measured_step``), seconds per step
  (median of 3 forward + backward, gradients cleared between). A third row per
  budget plans int8 with (de)quantization priced at memory speed (as the Triton
  kernels run on a GPU): on a CPU whose torch kernels are slow, the solver prefers a
  lossless plan wherever one fits, and that row shows int8 storage itself.
- D. weights read quantized from disk, inference, ``examples/mlp.py:make_mlp``
  (8 Linear(512, 512) + GELU and a head, batch 64). W = fp32 weight bytes. For
  budgets 0.3 W, 0.2 W and 0.15 W, three rows: ``quantize=None`` and "int8" with
  the "cpu" profile, and "int8" with (de)quantization priced at memory speed (as in
  C). Per row: measured peak (``run_measured``), seconds per forward (``time_call``,
  median of 5) and the eager reference timed right after it, the number of weights
  with home "disk:int8" (int8 codes on disk, read before each run of uses),
  "device:int8" and "disk" (full fp32 copy on disk), the disk bytes one forward
  reads as the plan's replay predicts
  (``planner.solver.validate.validate(...).bytes_moved["disk_read"]``), and the
  output's relative L2 error against the reference model. A budget no plan of a row
  meets is reported with ``BudgetTooSmall``'s ``min_budget``.

The machine is shared, so the eager reference is timed again next to every plan
(inference: right after the plan's forwards; training: its steps alternating with
the plan's) and ``x eager`` divides by that nearby time.

    python benchmarks/quantize_bench.py --out BENCHMARKS_quantize.md

A full run takes about 1.5 minutes on an idle 2-core CPU and over 5 minutes when
other jobs share it (most of it planning).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from bench_common import short_error, uptime, write_report  # noqa: E402

import planner  # noqa: E402
from planner.passes.device_profile import get_profile  # noqa: E402
from planner.solver.validate import validate  # noqa: E402

log = logging.getLogger("quantize_bench")
MiB = 1 << 20
GAP_EDGES = (0.01, 0.03, 0.1)  # top-1 minus top-2 logit buckets (part B)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.2f}"


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def median_seconds(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan_or_record(row: Any, model: torch.nn.Module, budget: int, inputs: tuple, **kw: Any) -> Any:
    """``planner.plan(model, budget, example_inputs=inputs, **kw)``, or None with the
    failure recorded on ``row`` (``does not fit`` and its min_budget, or the error):
    a row that cannot plan is reported, it does not abort the benchmark."""
    try:
        return planner.plan(model, budget, example_inputs=inputs, **kw)
    except planner.BudgetTooSmall as exc:
        row.error = "does not fit"
        row.min_budget = int(exc.min_budget)
        log.info("%s: BudgetTooSmall (min %s)", row.label, exc.min_budget)
    except Exception as exc:  # report, don't abort the benchmark
        traceback.print_exc()
        row.error = short_error(exc)
    return None


def plan_summary(pm: Any, plan_seconds: float) -> dict[str, Any]:
    plan = pm.plan
    quantized = [d for d in plan.tensors if d.home.startswith("device:")]
    stored = sum(
        b.numel() * b.element_size() for n, b in pm.named_buffers() if n.startswith("stored_")
    )
    homes = Counter(d.home for d in plan.tensors if d.kind in ("param", "buffer"))
    # weights whose home is a tier (host, disk, or a quantized copy there)
    tiers = sum(n for home, n in homes.items() if home.split(":", 1)[0] != "device")
    decisions = [d for d in plan.tensors if "quantize" in d.decision]
    return {
        "solver": f"{plan.solver.status} {plan.solver.seconds:.1f} s",
        "plan_seconds": plan_seconds,
        "predicted_peak": plan.predicted_peak_bytes,
        "n_stored_quantized": len(quantized),
        "stored_fp32_bytes": sum(d.nbytes for d in quantized),
        "stored_bytes": stored,
        "n_tier_weights": tiers,
        "homes": dict(homes),
        "n_quantize_decisions": len(decisions),
        "quantize_decision_bytes": sum(d.nbytes for d in decisions),
        "formats": sorted(
            {
                p.split(":", 1)[1]
                for d in decisions
                for p in d.decision.split("+")
                if p.startswith("quantize:")
            }
        ),
    }


# --------------------------------------------------------------------------- A + B


@dataclass
class InferRow:
    label: str
    budget: int | None = None
    quantize: str | None = None
    error: str | None = None
    min_budget: int | None = None
    peak: int | None = None
    seconds: float | None = None
    eager_seconds: float | None = None  # the eager reference timed next to this row
    agree: list[float] = field(default_factory=list)
    rel_l2: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def eval_batches(n: int, vocab: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        out.append(torch.randint(0, vocab, shape, generator=g))
    return out


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    from gpt2 import VOCAB_SIZE, make_gpt2

    reference, inputs = make_gpt2()
    reference.eval()
    W = weight_bytes(reference)
    batches = eval_batches(args.batches, VOCAB_SIZE, tuple(inputs[0].shape))
    with torch.no_grad():
        ref_logits = [reference(b).float() for b in batches]
    # part B's margins: top-1 minus top-2 of the reference logits, per position
    top2 = [lg.topk(2, dim=-1).values for lg in ref_logits]
    gaps = torch.cat([(t[..., 0] - t[..., 1]).flatten() for t in top2])
    ref_top1 = [lg.argmax(-1) for lg in ref_logits]

    def eager_forward() -> None:
        with torch.no_grad():
            reference(*inputs)

    eager = InferRow("eager (fp32, no budget)")
    model, _ = make_gpt2()
    analysis = planner.analyze(model, inputs)
    eager.peak = planner.measure_unplanned(analysis, model, inputs).peak_bytes
    del model, analysis
    eager.seconds = eager.eager_seconds = median_seconds(eager_forward, args.repeats)
    eager.agree = [1.0] * len(batches)
    eager.rel_l2 = [0.0] * len(batches)
    rows = [eager]
    margin: dict[str, Any] | None = None

    def run_row(label: str, budget: int, q: str | None) -> tuple[InferRow, list]:
        row = InferRow(label, budget, q)
        agree_pos: list[torch.Tensor] = []
        model, _ = make_gpt2()
        model.eval()
        start = time.perf_counter()
        pm = plan_or_record(row, model, budget, inputs, quantize=q, time_limit=args.time_limit)
        if pm is None:
            return row, agree_pos
        try:
            row.extra = plan_summary(pm, time.perf_counter() - start)
            pm.run_measured(*inputs)
            row.peak = pm.measured.peak_bytes
            row.seconds = pm.time_call(*inputs, repeats=args.repeats)
            row.eager_seconds = median_seconds(eager_forward, args.repeats)
            with torch.no_grad():
                for b, ref, top1 in zip(batches, ref_logits, ref_top1):
                    out = pm(b).float()
                    same = out.argmax(-1) == top1
                    agree_pos.append(same.flatten())
                    row.agree.append(same.float().mean().item())
                    row.rel_l2.append(((out - ref).norm() / ref.norm()).item())
            log.info(
                "%s: %s, peak %.2f MiB, %.3f s/forward, agreement %.4f",
                row.label,
                row.extra["solver"],
                row.peak / MiB,
                row.seconds,
                statistics.mean(row.agree),
            )
        except Exception as exc:
            traceback.print_exc()
            row.error = short_error(exc)
        finally:
            pm.close()
        return row, agree_pos

    for share in args.gpt2_budgets:
        for q in (None, "int8", "int4"):
            row, agree_pos = run_row(f"{q or 'none'} @ {share:g} W", int(share * W), q)
            rows.append(row)
            if q == "int8" and margin is None and agree_pos and share == min(args.gpt2_budgets):
                margin = {
                    "label": row.label,
                    "agree": torch.cat(agree_pos),
                    "gaps": gaps,
                    "batches": len(batches),
                    "shape": tuple(inputs[0].shape),
                }
    lossless = [r for r in rows if r.quantize is None and r is not eager]
    if lossless and all(r.min_budget is not None for r in lossless):
        # no lossless plan at the requested budgets: add one at its smallest budget,
        # so that the quantized rows have a lossless plan to compare with
        floor = max(r.min_budget for r in lossless)
        row, _ = run_row(f"none @ its min_budget ({floor / W:.2f} W)", floor, None)
        rows.append(row)
    head = reference.model.lm_head.weight
    return {
        "W": W,
        "rows": rows,
        "margin": margin,
        "gaps": gaps,
        "positions": gaps.numel(),
        "head_bytes": head.numel() * head.element_size(),
        "logits_bytes": ref_logits[0].numel() * ref_logits[0].element_size(),
    }


def render_inference(res: dict[str, Any]) -> list[str]:
    W = res["W"]
    lines = [
        "| config | budget MiB (x W) | solver (status, s) | measured peak MiB | peak / budget "
        "| s/forward | eager s (nearby) | x eager | weights stored quantized: n, fp32 MiB "
        "-> stored MiB | top-1 agreement mean (min) | rel. L2 error of logits (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        budget = "-" if r.budget is None else f"{_mib(r.budget)} ({r.budget / W:.2f})"
        if r.error:
            detail = r.error
            if r.min_budget is not None:
                detail += f" (min_budget {_mib(r.min_budget)} MiB = {r.min_budget / W:.2f} W)"
            lines.append(f"| {r.label} | {budget} | - | - | - | - | - | - | {detail} | - | - |")
            continue
        e = r.extra
        solver = e.get("solver", "-")
        ratio = r.peak / r.budget if r.budget else None
        x = r.seconds / r.eager_seconds if r.eager_seconds else float("nan")
        stored = (
            f"{e['n_stored_quantized']}, {_mib(e['stored_fp32_bytes'])} -> "
            f"{_mib(e['stored_bytes'])}"
            if e
            else "-"
        )
        if e and e.get("n_tier_weights"):
            stored += f"; {e['n_tier_weights']} weights offloaded"
        lines.append(
            f"| {r.label} | {budget} | {solver} | {_mib(r.peak)} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {r.seconds:.3f} | "
            f"{r.eager_seconds:.3f} | {x:.2f} | {stored} | "
            f"{statistics.mean(r.agree):.2%} ({min(r.agree):.2%}) | "
            f"{statistics.mean(r.rel_l2):.2e} |"
        )
    return lines


def render_margin(res: dict[str, Any]) -> list[str]:
    m = res["margin"]
    if m is None:
        return ["(the int8 plan at the lowest budget did not run; no margin table)"]
    gaps, agree = m["gaps"], m["agree"]
    edges = (0.0, *GAP_EDGES, float("inf"))
    lines = [
        f"Plan: {m['label']}; {gaps.numel()} positions ({m['batches']} batches x "
        f"{m['shape'][0]} x {m['shape'][1]}). Reference "
        f"top-1 minus top-2 logit gap: median {gaps.median().item():.4f}, "
        f"max {gaps.max().item():.4f}.",
        "",
        "| top-1 - top-2 gap | positions | share of positions | top-1 agreement | "
        "disagreements | share of all disagreements |",
        "|---|---|---|---|---|---|",
    ]
    total_dis = int((~agree).sum())
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (gaps >= lo) & (gaps < hi)
        n = int(sel.sum())
        name = (
            f"< {hi:g}" if lo == 0 else (f">= {lo:g}" if hi == float("inf") else f"{lo:g} - {hi:g}")
        )
        if n == 0:
            lines.append(f"| {name} | 0 | 0.0% | - | 0 | - |")
            continue
        dis = int((~agree[sel]).sum())
        share_dis = f"{dis / total_dis:.1%}" if total_dis else "-"
        lines.append(
            f"| {name} | {n} | {n / gaps.numel():.1%} | "
            f"{agree[sel].float().mean().item():.2%} | {dis} | {share_dis} |"
        )
    lines.append(
        f"| all | {gaps.numel()} | 100% | {agree.float().mean().item():.2%} | {total_dis} | 100% |"
    )
    return lines


# --------------------------------------------------------------------------- C


@dataclass
class TrainRow:
    label: str
    budget: int | None = None
    quantize: str | None = None
    error: str | None = None
    min_budget: int | None = None
    peak: int | None = None
    seconds: float | None = None
    eager_seconds: float | None = None
    times: list[float] = field(default_factory=list)
    eager_times: list[float] = field(default_factory=list)
    loss_rel: float | None = None
    min_cos: float | None = None
    min_cos_param: str = ""
    missing_grads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _loss(fn: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return fn(*inputs).pow(2).mean()


def _timed_step(fn: Any, params: list[torch.Tensor], inputs: tuple) -> float:
    for p in params:
        p.grad = None
    start = time.perf_counter()
    _loss(fn, inputs).backward()
    return time.perf_counter() - start


def _step_seconds(fn: Any, params: list[torch.Tensor], inputs: tuple, repeats: int) -> list[float]:
    _timed_step(fn, params, inputs)  # warm-up
    return [_timed_step(fn, params, inputs) for _ in range(repeats)]


def _paired_step_seconds(
    a: tuple[Any, list[torch.Tensor]],
    b: tuple[Any, list[torch.Tensor]],
    inputs: tuple,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """Step seconds of ``a`` and ``b``, their steps alternating (one warm-up
    each), so that a change in machine load hits both alike."""
    _timed_step(*a, inputs)
    _timed_step(*b, inputs)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed_step(*a, inputs))
        tb.append(_timed_step(*b, inputs))
    return ta, tb


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    from resnet_cnn import make_resnet

    reference, inputs = make_resnet()
    ref_params = dict(reference.named_parameters())
    ref_loss_t = _loss(reference, inputs)
    ref_loss_t.backward()
    ref_loss = float(ref_loss_t.detach())
    ref_grads = {
        n: p.grad.detach().double().clone() for n, p in ref_params.items() if p.grad is not None
    }

    model, _ = make_resnet()
    analysis = planner.analyze(model, inputs, mode="train")
    P = analysis.unplanned_peak_bytes
    eager = TrainRow("eager (no budget)")
    eager.peak = planner.measure_unplanned(analysis, model, inputs).peak_bytes
    del model, analysis
    eager.times = eager.eager_times = _step_seconds(
        reference, list(ref_params.values()), inputs, args.step_repeats
    )
    eager.seconds = eager.eager_seconds = statistics.median(eager.times)
    eager.loss_rel, eager.min_cos = 0.0, 1.0
    rows = [eager]
    profile = get_profile(None)
    # the same profile with (de)quantization priced at memory speed, as the Triton
    # kernels run on a GPU: where this CPU's slow torch kernels make the solver
    # prefer a lossless plan, these rows show what int8 storage itself costs
    fast = dataclasses.replace(
        profile,
        quantize_bandwidth=profile.memory_bandwidth,
        dequantize_bandwidth=profile.memory_bandwidth,
    )
    configs = ((None, profile, ""), ("int8", profile, ""), ("int8", fast, ", GPU-priced"))
    for share in args.cnn_budgets:
        budget = int(share * P)
        for q, row_profile, note in configs:
            row = TrainRow(f"{q or 'none'}{note} @ {share:g} P", budget, q)
            rows.append(row)
            model, _ = make_resnet()
            params = dict(model.named_parameters())  # before planning (it may release them)
            start = time.perf_counter()
            pm = plan_or_record(
                row,
                model,
                budget,
                inputs,
                mode="train",
                quantize=q,
                time_limit=args.time_limit,
                profile=row_profile,
            )
            if pm is None:
                continue
            try:
                row.extra = plan_summary(pm, time.perf_counter() - start)
                loss_t = _loss(pm, inputs)
                loss_t.backward()
                loss = float(loss_t.detach())
                row.loss_rel = abs(loss - ref_loss) / abs(ref_loss)
                cos = {}
                for name, g_ref in ref_grads.items():
                    p = params[name]
                    if p.grad is None:
                        row.missing_grads += 1
                        continue
                    g = p.grad.detach().double()
                    denom = g.norm() * g_ref.norm()
                    cos[name] = 1.0 if denom == 0 else float((g * g_ref).sum() / denom)
                if cos:
                    row.min_cos_param = min(cos, key=cos.__getitem__)
                    row.min_cos = cos[row.min_cos_param]
                for p in params.values():
                    p.grad = None
                pm.run_measured_step(*inputs)
                row.peak = pm.measured.peak_bytes
                row.times, row.eager_times = _paired_step_seconds(
                    (pm, list(params.values())),
                    (reference, list(ref_params.values())),
                    inputs,
                    args.step_repeats,
                )
                row.seconds = statistics.median(row.times)
                row.eager_seconds = statistics.median(row.eager_times)
                log.info(
                    "%s: %s, peak %.2f MiB, %.3f s/step, loss rel %.2e, min cos %.6f",
                    row.label,
                    row.extra["solver"],
                    row.peak / MiB,
                    row.seconds,
                    row.loss_rel,
                    row.min_cos if row.min_cos is not None else float("nan"),
                )
            except Exception as exc:
                traceback.print_exc()
                row.error = short_error(exc)
            finally:
                pm.close()
                del pm, model
    return {"P": P, "rows": rows, "ref_loss": ref_loss}


def render_training(res: dict[str, Any]) -> list[str]:
    P = res["P"]
    lines = [
        "| config | budget MiB (x P) | solver (status, s) | measured peak MiB | peak / budget "
        "| s/step median (min) | eager s/step nearby, median (min) | x eager median (min) "
        "| tensors with a quantize decision (fp32 MiB) | loss rel. diff "
        "| min grad cosine (parameter) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        budget = "-" if r.budget is None else f"{_mib(r.budget)} ({r.budget / P:.2f})"
        if r.error:
            detail = r.error
            if r.min_budget is not None:
                detail += f" (min_budget {_mib(r.min_budget)} MiB = {r.min_budget / P:.3f} P)"
            lines.append(f"| {r.label} | {budget} | - | - | - | - | - | - | {detail} | - | - |")
            continue
        e = r.extra
        ratio = f"{r.peak / r.budget:.3f}" if r.budget else "-"
        x = r.seconds / r.eager_seconds
        x_min = min(r.times) / min(r.eager_times)
        quant = f"{e['n_quantize_decisions']} ({_mib(e['quantize_decision_bytes'])})" if e else "-"
        cos = "-" if r.min_cos is None else f"{r.min_cos:.6f}"
        if r.min_cos_param:
            cos += f" (`{r.min_cos_param}`)"
        if r.missing_grads:
            cos += f"; {r.missing_grads} parameters got no gradient"
        lines.append(
            f"| {r.label} | {budget} | {e.get('solver', '-')} | {_mib(r.peak)} | {ratio} | "
            f"{r.seconds:.4f} ({min(r.times):.4f}) | {r.eager_seconds:.4f} "
            f"({min(r.eager_times):.4f}) | {x:.2f} ({x_min:.2f}) | {quant} | "
            f"{r.loss_rel:.2e} | {cos} |"
        )
    return lines


# --------------------------------------------------------------------------- D

DISK_HOMES = ("disk:int8", "device:int8", "disk")  # the homes part D counts


@dataclass
class DiskRow:
    label: str
    budget: int
    quantize: str | None
    error: str | None = None
    min_budget: int | None = None
    peak: int | None = None
    seconds: float | None = None
    eager_seconds: float | None = None
    disk_read: int | None = None  # bytes per forward, as the plan's replay predicts
    rel_l2: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def bench_disk(args: argparse.Namespace) -> dict[str, Any]:
    from mlp import make_mlp

    reference, inputs = make_mlp()
    reference.eval()
    W = weight_bytes(reference)
    with torch.no_grad():
        ref_out = reference(*inputs).float()

    def eager_forward() -> None:
        with torch.no_grad():
            reference(*inputs)

    cpu = get_profile("cpu")
    fast = dataclasses.replace(
        cpu, quantize_bandwidth=cpu.memory_bandwidth, dequantize_bandwidth=cpu.memory_bandwidth
    )
    configs = ((None, cpu, ""), ("int8", cpu, ""), ("int8", fast, ", GPU-priced"))
    rows = []
    for share in args.mlp_budgets:
        budget = int(share * W)
        for q, row_profile, note in configs:
            row = DiskRow(f"{q or 'none'}{note} @ {share:g} W", budget, q)
            rows.append(row)
            model, _ = make_mlp()
            model.eval()
            start = time.perf_counter()
            pm = plan_or_record(
                row,
                model,
                budget,
                inputs,
                quantize=q,
                time_limit=args.time_limit,
                profile=row_profile,
            )
            if pm is None:
                continue
            try:
                row.extra = plan_summary(pm, time.perf_counter() - start)
                row.disk_read = validate(pm.problem, pm.plan).bytes_moved["disk_read"]
                pm.run_measured(*inputs)
                row.peak = pm.measured.peak_bytes
                row.seconds = pm.time_call(*inputs, repeats=args.repeats)
                row.eager_seconds = median_seconds(eager_forward, args.repeats)
                with torch.no_grad():
                    out = pm(*inputs).float()
                row.rel_l2 = ((out - ref_out).norm() / ref_out.norm()).item()
                log.info(
                    "%s: %s, homes %s, peak %.2f MiB, %.4f s/forward, disk read %.2f MiB, "
                    "rel L2 %.2e",
                    row.label,
                    row.extra["solver"],
                    row.extra["homes"],
                    row.peak / MiB,
                    row.seconds,
                    row.disk_read / MiB,
                    row.rel_l2,
                )
            except Exception as exc:
                traceback.print_exc()
                row.error = short_error(exc)
            finally:
                pm.close()
                del pm, model
    return {"W": W, "rows": rows, "shape": tuple(inputs[0].shape)}


def render_disk(res: dict[str, Any]) -> list[str]:
    W = res["W"]
    lines = [
        "| config | budget MiB (x W) | solver (status, s) | measured peak MiB | peak / budget "
        "| s/forward | eager s (nearby) | x eager | weights with home disk:int8 / "
        "device:int8 / disk | disk MiB read per forward (replay) | rel. L2 error of output |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        budget = f"{_mib(r.budget)} ({r.budget / W:.2f})"
        if r.error:
            detail = r.error
            if r.min_budget is not None:
                detail += f" (min_budget {_mib(r.min_budget)} MiB = {r.min_budget / W:.3f} W)"
            lines.append(f"| {r.label} | {budget} | - | - | - | - | - | - | {detail} | - | - |")
            continue
        homes = r.extra.get("homes", {})
        counts = " / ".join(str(homes.get(h, 0)) for h in DISK_HOMES)
        lines.append(
            f"| {r.label} | {budget} | {r.extra.get('solver', '-')} | {_mib(r.peak)} | "
            f"{r.peak / r.budget:.3f} | {r.seconds:.4f} | {r.eager_seconds:.4f} | "
            f"{r.seconds / r.eager_seconds:.2f} | {counts} | {_mib(r.disk_read)} | "
            f"{r.rel_l2:.2e} |"
        )
    return lines


def disk_facts(res: dict[str, Any]) -> str:
    """One paragraph of what part D measured, read off its rows."""
    W = res["W"]
    ran = [r for r in res["rows"] if not r.error]
    facts = []
    qfetch = [r for r in ran if r.extra.get("homes", {}).get("disk:int8")]
    if qfetch:
        facts.append(
            "Plans with int8 codes at home on disk: "
            + "; ".join(f"{r.label} ({r.extra['homes']['disk:int8']} weights)" for r in qfetch)
            + "."
        )
    else:
        facts.append("No plan put a weight's int8 codes at home on disk.")
    no_fit = [r for r in res["rows"] if r.min_budget is not None]
    if no_fit:
        facts.append(
            "Did not fit: "
            + "; ".join(f"{r.label} (min_budget {r.min_budget / W:.3f} W)" for r in no_fit)
            + "."
        )
    by_budget: dict[int, list[DiskRow]] = {}
    for r in ran:
        by_budget.setdefault(r.budget, []).append(r)
    reads = []
    for budget, rs in by_budget.items():
        reads.append(
            f"{budget / W:.2g} W: "
            + ", ".join(f"`{r.label.split(' @ ')[0]}` {_mib(r.disk_read)}" for r in rs)
        )
    if reads:
        facts.append("Disk MiB read per forward (replay) at " + "; ".join(reads) + ".")
    exact = [r for r in ran if r.rel_l2 == 0.0]
    lossy = [r for r in ran if r.rel_l2 != 0.0]
    if exact:
        facts.append(
            f"Output identical to the reference (rel. L2 error 0): {len(exact)} of "
            f"{len(ran)} plans that ran"
            + (f" ({', '.join(r.label for r in exact)})" if len(exact) <= 4 else "")
            + "."
        )
    if lossy:
        errs = [r.rel_l2 for r in lossy]
        facts.append(
            f"Other plans: rel. L2 error {min(errs):.2e} to {max(errs):.2e}."
            if min(errs) != max(errs)
            else f"Other plans: rel. L2 error {errs[0]:.2e}."
        )
    within = [r for r in ran if r.peak is not None and r.peak <= r.budget]
    facts.append(f"Measured peak within the budget: {len(within)} of {len(ran)} plans.")
    return " ".join(facts)


# --------------------------------------------------------------------------- main


def render(
    info: dict[str, Any],
    inf: dict[str, Any] | None,
    tr: dict[str, Any] | None,
    dk: dict[str, Any] | None,
    args: argparse.Namespace,
) -> str:
    out = ["# Lossy storage benchmark: `quantize=` plans", ""]
    out.append(f"Command: `python benchmarks/quantize_bench.py {' '.join(info['argv'])}`  ")
    out.append(
        f"Machine: {info['machine']}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; device profile: {info['profile']}.  "
    )
    out.append(f"Load before: `{info['load_before']}`  ")
    out.append(f"Load after: `{info['load_after']}`  ")
    out.append(
        f"Wall time of the run: {info['wall']:.0f} s; solver time limit "
        f"{args.time_limit:g} s per plan."
    )
    out.append("")
    out.append(
        "Each plan is made on a freshly built model (same seed, same weights) and compared "
        "with a separate, untouched reference model. Peak: planner's independent meter "
        "(module state + inputs + every allocation during the call). All in one process "
        "on a shared machine: `eager (nearby)` is the eager reference timed next to each "
        "plan (inference: right after the plan's forwards; training: steps alternating "
        "with the plan's), and `x eager` divides by it. "
        "`solver`: CP-SAT status and seconds (`pm.plan.solver`)."
    )
    if inf is not None:
        W = inf["W"]
        out += ["", "## A. Inference: GPT-2 example (`examples/gpt2.py:make_gpt2`)", ""]
        out.append(
            f"W = fp32 weight bytes = {_mib(W)} MiB. Batch 4 x 128 tokens, vocabulary "
            f"8192, random weights (seed 0). Accuracy over {args.batches} random token "
            "batches (seeds 100..): top-1 agreement of the planned logits with the "
            "reference model's (mean over batches, min in parentheses) and "
            "||planned - ref|| / ||ref|| of the logits. "
            f"Time: median of {args.repeats} forwards (`pm.time_call`; eager under "
            "`no_grad`). Eager peak: `planner.measure_unplanned`. `stored MiB`: the "
            "quantized codes + scales the planned module holds."
        )
        out.append("")
        out.append(
            f"Floor of a lossless plan: the LM head's weight (tied to the token "
            f"embedding, {_mib(inf['head_bytes'])} MiB fp32) and its output, the "
            f"logits ({_mib(inf['logits_bytes'])} MiB), must be resident together "
            f"during the LM-head matmul, whatever is offloaded: "
            f"{(inf['head_bytes'] + inf['logits_bytes']) / W:.2f} W before the "
            f"hidden states. Storing that weight quantized (read by a fused op) is "
            f"what lets a plan go below it."
        )
        out.append("")
        out += render_inference(inf)
        out += ["", "## B. Agreement vs margin (int8 at the lowest budget)", ""]
        out += render_margin(inf)
    if tr is not None:
        P = tr["P"]
        out += ["", "## C. Training: ResNet-like CNN (`examples/resnet_cnn.py:make_resnet`)", ""]
        out.append(
            f'P = unplanned training peak (`planner.analyze(..., mode="train")`) = '
            f"{_mib(P)} MiB. Batch 8 x 3 x 32 x 32; loss = `out.pow(2).mean()` (eager "
            f"reference loss {tr['ref_loss']:.6f}); one step = forward + backward, no "
            f"optimizer. Loss and gradients of one step against the eager reference; "
            "gradient cosine similarity in float64, the smallest over parameters. "
            f"Peak: `pm.run_measured_step` (eager: `planner.measure_unplanned`). Time: "
            f"median (and min, the least disturbed) of {args.step_repeats} steps after one "
            f"warm-up, gradients cleared between."
        )
        out.append("")
        out += render_training(tr)
    if dk is not None:
        W = dk["W"]
        out += [
            "",
            "## D. Weights read quantized from disk: MLP example inference "
            "(`examples/mlp.py:make_mlp`)",
            "",
        ]
        out.append(
            f"W = fp32 weight bytes = {_mib(W)} MiB (8 Linear(512, 512) + GELU, a "
            f"Linear(512, 10) head; batch {dk['shape'][0]} x {dk['shape'][1]}). Rows: "
            '`quantize=None` and `"int8"` with the `cpu` profile (torch (de)quantizers '
            'priced at its `quantize_bandwidth`), and `"int8"` with (de)quantization '
            "priced at memory speed (`GPU-priced`, as in C). Weight homes from "
            "`pm.plan.tensors`: `disk:int8` = the weight's int8 codes live on disk and "
            "each run of uses reads only them; `device:int8` = codes + scales held on "
            "the device; `disk` = a full fp32 copy on disk. Disk bytes per forward: "
            '`validate(pm.problem, pm.plan).bytes_moved["disk_read"]` (the plan\'s '
            "replay, not a measurement). Peak: `pm.run_measured`. Time: median of "
            f"{args.repeats} forwards (`pm.time_call`), then the eager reference (median "
            f"of {args.repeats} under `no_grad`) right after it. Error: "
            "||planned - ref|| / ||ref|| of the output on the example batch."
        )
        out.append("")
        out += render_disk(dk)
        out += ["", disk_facts(dk)]
    out += [
        "",
        "## How to read",
        "",
        "`quantize=` lets the solver store a tensor as int8 / int4 codes instead of fp32 "
        "where the budget needs it; with `None` the same budget must be met by offloading "
        "and recomputation only, and `does not fit` gives the smallest budget that can. "
        "Inference (A): `weights stored quantized` are weights the planned module holds "
        "only as codes + scales (home `device:<format>`); the accuracy columns are what "
        "that costs, the time column what the fused dequantizing reads cost; a lookup "
        "(`aten.embedding`) of such a weight gathers exact fp32 rows from the weight's "
        "full copy in the offload directory, so only its other reads see the codes. "
        "`weights offloaded`: weights whose home is a tier (host, disk). A lossless "
        "plan that fits is bit-identical to eager (100% agreement, zero error). Top-1 "
        "agreement on this random-weight GPT-2 is a pessimistic figure: its logits are "
        "nearly flat, and table B shows how many positions have a top-1/top-2 gap "
        "smaller than the quantization noise and where the disagreements sit. Training "
        "(C): a `quantize:` decision there stores a tensor quantized between its uses "
        "(typically an activation saved for the backward), so the forward, hence the "
        "loss, can be exact while gradients move slightly; the min cosine column is the "
        "worst parameter. Disk (D): a `disk:int8` home is a weight kept only as int8 "
        "codes on disk, read before each run of its uses; the disk column is what the "
        "plan's replay moves, the error column what the codes cost. Numbers come from "
        "a shared, noisy 2-core VM (see the load "
        "above): time ratios within ~20% are noise, and the CNN's steps take tens of "
        "milliseconds, where fixed per-call costs dominate.",
        "",
        "Regenerate:",
        "",
        "```bash",
        "python benchmarks/quantize_bench.py --out BENCHMARKS_quantize.md",
        "```",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["infer", "train", "disk"],
        choices=["infer", "train", "disk"],
    )
    ap.add_argument(
        "--gpt2-budgets",
        nargs="+",
        type=float,
        default=[0.95, 1.2],
        help="budgets as multiples of the fp32 weight bytes W",
    )
    ap.add_argument(
        "--cnn-budgets",
        nargs="+",
        type=float,
        default=[0.3, 0.45, 0.6],
        help="budgets as multiples of the unplanned training peak P",
    )
    ap.add_argument(
        "--mlp-budgets",
        nargs="+",
        type=float,
        default=[0.3, 0.2, 0.15],
        help="part D budgets as multiples of the MLP's fp32 weight bytes W",
    )
    ap.add_argument("--batches", type=int, default=32, help="token batches for accuracy")
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per row")
    ap.add_argument("--step-repeats", type=int, default=3, help="timed train steps per row")
    ap.add_argument("--time-limit", type=float, default=20.0, help="solver seconds per plan")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    start = time.perf_counter()
    profile = get_profile(None)
    info: dict[str, Any] = {
        "argv": argv if argv is not None else sys.argv[1:],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "load_before": uptime(),
        "profile": getattr(profile, "name", str(profile)),
    }
    inf = bench_inference(args) if "infer" in args.parts else None
    tr = bench_training(args) if "train" in args.parts else None
    dk = bench_disk(args) if "disk" in args.parts else None
    info["load_after"] = uptime()
    info["wall"] = time.perf_counter() - start
    text = render(info, inf, tr, dk, args)
    print(text)
    if args.out:
        write_report(args.out, text)
    return text


if __name__ == "__main__":
    main()
