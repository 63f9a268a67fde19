"""Train GPT-2 (the small example, LM loss inside the model) under a memory budget.

A plain training loop: AdamW over a few steps on one fixed batch, the model planned
by ``planner.plan(..., mode="train")`` at the budget given on the command line
(default 60% of the unplanned peak of forward + backward). Each step prints the
loss; at the end the script prints the measured peak of one step (forward +
backward, metered by ``planner.runtime.meter``, which never reads the plan) against
the budget, and the median time per step against the same loop run eagerly
(unplanned) from the same seed, with the eager losses alongside.

    python examples/train_gpt2.py                  # 60%, 5 steps
    python examples/train_gpt2.py --budget 50% --steps 3
    python examples/train_gpt2.py --budget 120MiB --no-eager
    python examples/train_gpt2.py --last-batch 3   # a data set's last, smaller batch

With ``--last-batch N`` the steps alternate between the full batch and one of N
sequences (an epoch of batch + N sequences, as a data loader without
``drop_last`` gives), both shapes planned in one call
(``extra_example_inputs``): each has its own plan, and both train the same
parameters. The first step of each shape runs under the meter.

A budget below the smallest feasible one is reported (``planner.BudgetTooSmall``)
and the loop goes on at that smallest budget instead.

What the metered peak covers: parameters, inputs, gradients and everything the
planned forward and backward allocate. At tight budgets the plan may give a
parameter a home on disk (the model keeps the parameter; its data becomes a shared
map of its file, which AdamW updates in place) and deliver its gradient into a
file-backed ``.grad``: file pages, which the meter does not count. AdamW's state
(two tensors per parameter, created by the first ``opt.step()``) is the caller's
memory, outside the planned module; it is printed separately. Deterministic: the
model, the batch and the optimizer are seeded, and the planned step computes
bit-for-bit what the captured graph computes, so its losses match the eager loop's
to float rounding.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpt2  # noqa: E402  (the example next to this file)

import planner  # noqa: E402
from planner.runtime.meter import measure, resident_bytes  # noqa: E402

MiB = 2**20


def build(batch: int, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The GPT-2 training example (``gpt2.make_gpt2_train`` at batch 8): the model
    returning its LM loss, and one batch of token ids; seeded."""
    if batch == 8:
        model, inputs = gpt2.make_gpt2_train()
    else:
        lm, inputs = gpt2._build(batch=batch)
        model = gpt2.GPT2LMLoss(lm)
    torch.manual_seed(seed)  # the optimizer and anything random in the loop
    return model, inputs


def run_loop(
    step_module: Callable[..., torch.Tensor],
    params: Any,
    batches: list[tuple[torch.Tensor, ...]],
    steps: int,
    lr: float,
    meter_resident: nn.Module,
    label: str,
    verbose: bool,
) -> dict[str, Any]:
    """``steps`` AdamW steps, step i on ``batches[i % len(batches)]``. The first
    step of each batch runs its forward + backward under the meter (its time is not
    counted: the profiler slows it down); the others are timed, per batch shape
    (``step_seconds``: the full batch's median; ``last_step_seconds``: the last
    batch's)."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    times: list[list[float]] = [[] for _ in batches]
    peaks: list[int] = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        inputs = batches[i % len(batches)]

        def fwd_bwd(inputs: tuple[torch.Tensor, ...] = inputs) -> torch.Tensor:
            loss = step_module(*inputs)
            loss.backward()
            return loss

        if i < len(batches):
            loss, measured = measure(fwd_bwd, meter_resident, inputs)
            peaks.append(measured.peak_bytes)
        else:
            start = time.perf_counter()
            loss = fwd_bwd()
            times[i % len(batches)].append(time.perf_counter() - start)
        opt.step()
        losses.append(loss.item())
        if verbose:
            took = f"{times[i % len(batches)][-1]:.3f} s" if i >= len(batches) else "metered"
            print(f"  [{label}] step {i}: loss {losses[-1]:.6f}  ({took})", flush=True)
    opt_state = resident_bytes(
        [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    )
    return {
        "losses": losses,
        "step_seconds": _median(times[0]),
        "last_step_seconds": _median(times[1]) if len(times) > 1 else None,
        "peak_bytes": max(peaks) if peaks else None,
        "optimizer_state_bytes": opt_state,
    }


def plan_model(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    budget: str | int,
    profile: Any,
    time_limit: float,
    verbose: bool,
    kernels: str = "eager",
    extra_inputs: list[tuple[torch.Tensor, ...]] | None = None,
):
    """Plan at ``budget``; below the smallest feasible budget, say so and plan at it."""
    options = {
        "mode": "train",
        "profile": profile,
        "time_limit": time_limit,
        "kernels": kernels,
        "extra_example_inputs": extra_inputs,
    }
    try:
        return (
            planner.plan(model, budget, inputs, **options),
            budget,
            None,
        )
    except planner.BudgetTooSmall as exc:
        if exc.min_budget is None:
            raise
        if verbose:
            print(
                f"budget {budget} is too small (BudgetTooSmall): the smallest feasible "
                f"budget is {exc.min_budget / MiB:.1f} MiB; using that",
                flush=True,
            )
        pm = planner.plan(model, exc.min_budget, inputs, **options)
        return pm, exc.min_budget, exc


def parse_budget_arg(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budget",
        default="60%",
        help='bytes, a size ("120MiB") or a share of the unplanned peak ("60%%")',
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--batch",
        type=int,
        default=8,
        help="sequences per batch (8 = examples/gpt2.py:make_gpt2_train)",
    )
    ap.add_argument(
        "--last-batch",
        type=int,
        default=0,
        help="alternate the batch with a last one of this many sequences (0: off)",
    )
    ap.add_argument("--time-limit", type=float, default=10.0, help="solver seconds")
    ap.add_argument(
        "--profile",
        default="cpu",
        help='device profile: a built-in name, a JSON path, or "calibrate" '
        "(measure this machine first, a few seconds)",
    )
    ap.add_argument(
        "--no-eager",
        action="store_true",
        help="skip the eager reference loop (no time or loss comparison)",
    )
    ap.add_argument(
        "--kernels",
        default="eager",
        choices=("eager", "inductor"),
        help="inductor: runs of ops between the plan's memory steps compiled by "
        "TorchInductor (faster; losses equal eager's within rounding, not bit for bit)",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    verbose = not args.quiet
    torch.manual_seed(args.seed)

    profile: Any = args.profile
    if args.profile == "calibrate":
        from planner.runtime.calibrate import calibrate

        profile = calibrate(quick=True)

    if not 0 <= args.last_batch < args.batch:
        ap.error(f"--last-batch must be from 0 to {args.batch - 1} (the batch is {args.batch})")

    # planned loop
    model, inputs = build(args.batch, args.seed)
    batches = _batches(inputs, args.last_batch)
    start = time.perf_counter()
    pm, used_budget, too_small = plan_model(
        model,
        inputs,
        parse_budget_arg(args.budget),
        profile,
        args.time_limit,
        verbose,
        args.kernels,
        batches[1:],
    )
    plan_seconds = time.perf_counter() - start
    budget_bytes = pm.plan.budget_bytes
    unplanned_peak = pm.plan.unplanned_peak_bytes
    if verbose:
        print(
            f"planned GPT-2 training step at {args.budget} -> budget "
            f"{budget_bytes / MiB:.1f} MiB (unplanned peak {unplanned_peak / MiB:.1f} MiB) "
            f"in {plan_seconds:.1f} s; solver {pm.plan.solver.status}, estimated "
            f"{pm.plan.estimated_seconds:.3f} s/step vs "
            f"{pm.plan.unplanned_estimated_seconds:.3f} s unplanned",
            flush=True,
        )
    try:
        planned = run_loop(
            pm, pm.parameters(), batches, args.steps, args.lr, pm, "planned", verbose
        )
    finally:
        pm.close()

    result: dict[str, Any] = {
        "budget_arg": args.budget,
        "budget_bytes": budget_bytes,
        "budget_too_small": too_small is not None,
        "unplanned_peak_bytes": unplanned_peak,
        "planned": planned,
        "eager": None,
    }

    # eager reference: same factory, same seed, same optimizer
    if not args.no_eager:
        torch.manual_seed(args.seed)
        model, inputs = build(args.batch, args.seed)
        result["eager"] = run_loop(
            model,
            model.parameters(),
            _batches(inputs, args.last_batch),
            args.steps,
            args.lr,
            model,
            "eager",
            verbose,
        )

    if verbose:
        _summary(result)
    return result


def _median(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


def _batches(inputs: tuple[torch.Tensor, ...], last: int) -> list[tuple[torch.Tensor, ...]]:
    """The full batch, and with ``last`` sequences a last, smaller batch (its first
    ``last`` rows, copied: the planned step takes its own tensors)."""
    if not last:
        return [inputs]
    return [inputs, tuple(x[:last].clone() for x in inputs)]


def _summary(result: dict[str, Any]) -> None:
    planned, eager = result["planned"], result["eager"]
    budget = result["budget_bytes"]
    peak = planned["peak_bytes"]
    fits = "within" if peak <= budget else "OVER"
    print(
        f"\nmeasured peak of a step (forward+backward, meter): {peak / MiB:.1f} MiB, "
        f"{fits} the budget {budget / MiB:.1f} MiB ({peak / budget:.2f}x); "
        f"AdamW state outside the planned module: "
        f"{planned['optimizer_state_bytes'] / MiB:.1f} MiB"
    )
    if eager is None:
        print(f"time per step (fwd+bwd, median): planned {planned['step_seconds']:.3f} s")
        return
    print(f"eager peak of a step: {eager['peak_bytes'] / MiB:.1f} MiB")
    ratio = planned["step_seconds"] / eager["step_seconds"]
    print(
        f"time per step (fwd+bwd, median): planned {planned['step_seconds']:.3f} s, "
        f"eager {eager['step_seconds']:.3f} s ({ratio:.2f}x eager)"
    )
    if planned["last_step_seconds"] is not None:
        last = planned["last_step_seconds"] / eager["last_step_seconds"]
        print(
            f"time per last-batch step (median): planned {planned['last_step_seconds']:.3f} "
            f"s, eager {eager['last_step_seconds']:.3f} s ({last:.2f}x eager)"
        )
    print("losses (planned / eager):")
    for i, (a, b) in enumerate(zip(planned["losses"], eager["losses"])):
        print(f"  step {i}: {a:.6f} / {b:.6f}  (diff {abs(a - b):.2e})")
    if not all(math.isfinite(x) for x in planned["losses"]):
        print("WARNING: non-finite planned loss")


if __name__ == "__main__":
    main()
