"""The prompt in one call against token by token, through planned modules, side by side.

Model: ``generate_bench.py``'s Llama decoding step (a 77 MiB Llama at its defaults,
static cache, random weights), with room for ``--prompt-len`` prompt tokens and
``--new-tokens`` generated ones. A run is the prompt followed by greedy decoding.

Systems (rows), each on its own deep copy of the step:

- eager, token by token: the prompt one token per call, then one per generated token;
- eager, prompt in one call: the same step given the prompt's tokens at once;
- planner X: ``planner.plan(step, X, one_token, extra_example_inputs=[prompt])``
  (one module, a plan for each shape, the weights homed alike), for X in
  ``--budgets``, run both ways: the prompt token by token through the token's plan,
  and in one call through the prompt's plan;
- accelerate disk_offload, both ways (every weight on disk, loaded by a hook at
  each forward: a call of many tokens reads them once, as the prompt's plan does).

Timing: one warm-up run per row, then ``--repeats`` rounds in each of which every
row runs once, the order rotated per round. Columns: the prompt's seconds
(time to the first generated token), and ms per generated token after it;
medians over the rounds, ``x`` against the same row token by token. Peak: the
independent meter over the prompt's call and over one token's call, the larger
(the planned module's ``run_measured``). Tokens: compared with eager token by
token (the prompt in one call rounds differently from token by token, so a
generated token may differ where two logits are close).

    python benchmarks/prefill_bench.py --out BENCHMARKS_prefill.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from bench_common import short_error, uptime, write_report  # noqa: E402
from generate_bench import accelerate_row, make_decoder  # noqa: E402
from generate_llama import generate, prompt_inputs  # noqa: E402

import planner  # noqa: E402
from planner.runtime.meter import measure  # noqa: E402

MiB = 1 << 20


@dataclass
class Row:
    label: str
    fn: Callable[..., torch.Tensor] | None
    module: nn.Module | None
    prefill: bool
    pm: Any = None
    budget: int | None = None
    notes: str = ""
    error: str | None = None
    prompt_seconds: list[float] = field(default_factory=list)
    token_seconds: list[float] = field(default_factory=list)
    tokens: list[int] | None = None
    peak: int | None = None


def timed_run(row: Row, prompt: list[int], new_tokens: int) -> None:
    """The prompt (its seconds), then ``new_tokens - 1`` decoding calls (seconds
    per call); keeps the tokens."""
    assert row.fn is not None
    start = time.perf_counter()
    chunk = len(prompt) if row.prefill else 0
    first, _ = generate(row.fn, prompt, 1, keep_logits=False, chunk=chunk)
    prompt_done = time.perf_counter()
    tokens = list(prompt) + first
    with torch.no_grad():
        for position in range(len(prompt), len(prompt) + new_tokens - 1):
            out = row.fn(**prompt_inputs([tokens[position]], first=position))
            tokens.append(int(out[0, -1].argmax()))
    end = time.perf_counter()
    row.prompt_seconds.append(prompt_done - start)
    row.token_seconds.append((end - prompt_done) / max(new_tokens - 1, 1))
    row.tokens = tokens[len(prompt) :]


def metered(row: Row, prompt: list[int]) -> None:
    """The larger of the prompt's call and a token's call under the meter (both
    rewrite cache positions the next run writes first)."""
    calls = [prompt_inputs([prompt[0]])]
    if row.prefill:
        calls.append(prompt_inputs(prompt))
    peaks = []
    for call in calls:
        if row.pm is not None:
            row.pm.run_measured(**call)
            peaks.append(row.pm.measured.peak_bytes)
        else:
            assert row.fn is not None

            def run(call: dict = call) -> torch.Tensor:
                with torch.no_grad():
                    return row.fn(**call)  # type: ignore[misc]

            peaks.append(measure(run, row.module, call)[1].peak_bytes)
    row.peak = max(peaks)


def build_rows(args: argparse.Namespace, root: str) -> tuple[list[Row], int]:
    step, example = make_decoder(max_cache_len=args.prompt_len + args.new_tokens)
    prompt = list(range(1, args.prompt_len + 1))
    chunk = prompt_inputs(prompt)
    unplanned = planner.analyze(copy.deepcopy(step), chunk).unplanned_peak_bytes
    rows = [Row("eager, token by token", step, step, False)]
    eager_chunk = copy.deepcopy(step)
    rows.append(Row("eager, prompt in one call", eager_chunk, eager_chunk, True))
    for budget in args.budgets:
        start = time.perf_counter()
        try:
            pm = planner.plan(
                copy.deepcopy(step),
                budget,
                example,
                offload_dir=root,
                time_limit=args.time_limit,
                extra_example_inputs=[chunk],
            )
        except Exception as exc:
            traceback.print_exc()
            rows.append(Row(f"planner {budget}", None, None, False, error=short_error(exc)))
            continue
        seconds = time.perf_counter() - start
        params = [d for d in pm.plan.tensors if d.kind == "param"]
        moved = [d for d in params if d.home != "device"]
        notes = (
            f"budget {pm.plan.budget_bytes / MiB:.2f} MiB; weights homed on disk: "
            f"{len(moved)} of {len(params)}, {sum(d.nbytes for d in moved) / MiB:.1f} of "
            f"{sum(d.nbytes for d in params) / MiB:.1f} MiB; planned in {seconds:.0f} s "
            f"(both shapes)"
        )
        for prefill in (False, True):
            how = "prompt in one call" if prefill else "token by token"
            rows.append(
                Row(f"planner {budget}, {how}", pm, pm, prefill, pm=pm, budget=pm.plan.budget_bytes,
                    notes=notes)
            )  # fmt: skip
    for prefill in (False, True):
        how = "prompt in one call" if prefill else "token by token"
        accel = accelerate_row(copy.deepcopy(step), root)
        rows.append(
            Row(f"accelerate disk_offload, {how}", accel.fn, accel.module, prefill,
                error=accel.error, notes=accel.notes)
        )  # fmt: skip
    return rows, unplanned


def render(rows: list[Row], args: argparse.Namespace, info: dict[str, Any]) -> str:
    lines = [
        "# The prompt in one call vs token by token (planned modules of two shapes)",
        "",
        f"Command: `python benchmarks/prefill_bench.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Load before: `{info['load_before']}`; after: "
        f"`{info['load_after']}`. Wall time {info['wall']:.0f} s.",
        "",
        f"A {info['weights'] / MiB:.1f} MiB Llama step (`generate_bench.py`'s), a "
        f"{args.prompt_len}-token prompt, then {args.new_tokens} generated tokens; "
        f"unplanned peak of the prompt's call {info['unplanned'] / MiB:.2f} MiB. "
        f"Medians over {args.repeats} rounds; `x` is against the same system token by "
        "token, in the same rounds.",
        "",
        "| system | measured peak MiB | prompt s | x | ms per generated token | tokens "
        "as eager's | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {}
    for row in rows:
        if row.error or not row.prompt_seconds:
            lines.append(f"| {row.label} | - | - | - | - | - | {row.error or 'did not run'} |")
            continue
        system = row.label.rsplit(",", 1)[0]
        prompt = statistics.median(row.prompt_seconds)
        base.setdefault(system, prompt)
        reference = rows[0].tokens
        same = "yes" if row.tokens == reference else f"{_agree(row.tokens, reference)}"
        peak = f"{row.peak / MiB:.2f}" if row.peak else "-"
        lines.append(
            f"| {row.label} | {peak} | {prompt:.3f} | {prompt / base[system]:.2f} | "
            f"{statistics.median(row.token_seconds) * 1e3:.1f} | {same} | {row.notes} |"
        )
    return "\n".join(lines) + "\n"


def _agree(tokens: list[int] | None, reference: list[int] | None) -> str:
    if not tokens or not reference:
        return "-"
    n = sum(a == b for a, b in zip(tokens, reference))
    return f"{n} of {len(reference)}"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--budgets", nargs="+", default=["50%", "30%"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS_prefill.md"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    load_before = uptime()
    with tempfile.TemporaryDirectory(prefix="prefill-bench-") as root:
        rows, unplanned = build_rows(args, root)
        weights = sum(p.numel() * p.element_size() for p in make_decoder()[0].parameters())
        prompt = list(range(1, args.prompt_len + 1))
        live = [r for r in rows if not r.error]
        for row in live:
            try:
                timed_run(row, prompt, args.new_tokens)  # warm-up
                row.prompt_seconds.clear()
                row.token_seconds.clear()
                metered(row, prompt)
            except Exception as exc:
                traceback.print_exc()
                row.error = short_error(exc)
        live = [r for r in live if not r.error]
        for k in range(args.repeats):
            for row in live[k % len(live) :] + live[: k % len(live)]:
                timed_run(row, prompt, args.new_tokens)
        info = {
            "load_before": load_before,
            "load_after": uptime(),
            "wall": time.perf_counter() - started,
            "unplanned": unplanned,
            "weights": weights,
        }
        text = render(rows, args, info)
        for row in rows:
            if row.pm is not None:
                row.pm.close()
    write_report(args.out, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
