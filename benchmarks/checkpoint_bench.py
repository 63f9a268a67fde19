"""Inference from a safetensors checkpoint under a memory budget, side by side:
the planner reading disk-home weights from the checkpoint in place, the planner
copying them into its offload store first (what it did before, forced here by
turning ``DiskStore.link`` off), and HF Accelerate's ``load_checkpoint_and_dispatch``
with ``max_memory`` and an offload folder.

Model: ``--blocks`` x (Linear(width, width) + GELU), fp32, saved with safetensors
and built on the meta device for each system. For each: seconds to set up (plan,
or load and dispatch), bytes written to its offload directory, median seconds per
forward cold (the page cache of the files the forward reads dropped before each
timed forward: the checkpoint, or the system's copies) and warm, the meter's
peak, and its output against eager's. Repeats interleaved across systems.

    python benchmarks/checkpoint_bench.py --out BENCHMARKS_checkpoint.md
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate_bench import (
    MiB,
    System,
    check_and_meter,
    dir_bytes,
    eager_system,
    fmt_s,
    make_model,
    med,
    timed_call,
)
from bench_common import uptime, write_report
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import planner  # noqa: E402
from planner.budget import parse_budget  # noqa: E402
from planner.runtime.store import DiskStore  # noqa: E402

log = logging.getLogger("checkpoint_bench")


@contextlib.contextmanager
def copying_into_the_store() -> Iterator[None]:
    """Plan as before weights were read in place: every disk-home weight copied."""
    original = DiskStore.link
    DiskStore.link = lambda self, key, tensor: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        DiskStore.link = original  # type: ignore[method-assign]


def planner_system(
    name: str, args: argparse.Namespace, path: Path, budget: int, x: torch.Tensor, root: Path
) -> System:
    offload = Path(tempfile.mkdtemp(prefix="planner-", dir=root))
    model = make_model(args.blocks, args.width, device="meta")
    start = time.perf_counter()
    pm = planner.plan(
        model,
        budget,
        (x,),
        checkpoint=str(path),
        offload_dir=str(offload),
        profile=args.profile,
        time_limit=args.time_limit,
    )
    setup = time.perf_counter() - start
    homes: dict[str, int] = {}
    for t in pm.plan.tensors:
        if t.kind == "param":
            homes[t.home] = homes.get(t.home, 0) + 1
    # cold: the files its calls read dropped (the checkpoint, or its store's copies)
    reads = path.parent if pm._runtime.engine.disk.linked else offload
    s = System(name, pm, pm, str(reads), setup, close=pm.close)
    s.extra = {"written": dir_bytes(offload), "homes": homes}
    s.note = f"weights by home {homes}; plan {setup:.1f} s"
    return s


def accelerate_system(args: argparse.Namespace, path: Path, budget: int, root: Path) -> System:
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    offload = Path(tempfile.mkdtemp(prefix="accelerate-", dir=root))
    with init_empty_weights():
        model = make_model(args.blocks, args.width)
    start = time.perf_counter()
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget})
    model = load_checkpoint_and_dispatch(
        model, str(path), device_map=device_map, offload_folder=str(offload)
    )
    setup = time.perf_counter() - start
    where: dict[str, int] = {}
    for dev in device_map.values():
        where[str(dev)] = where.get(str(dev), 0) + 1

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    s = System(
        f'accelerate load_checkpoint_and_dispatch, max_memory={{"cpu": {budget / MiB:.0f} MiB}}',
        fn,
        model,
        str(offload),  # what its calls read (its copies, not the checkpoint)
        setup,
        note=f"device map (modules per device): {where}",
    )
    s.extra = {"written": dir_bytes(offload)}
    return s


def render(args: argparse.Namespace, systems: list[System], info: dict[str, Any]) -> str:
    eager = systems[0]
    lines = [
        "# Inference from a safetensors checkpoint: weights read in place",
        "",
        f"Model: {args.blocks} x (Linear({args.width}, {args.width}) + GELU), fp32, "
        f"{info['weight_bytes'] / MiB:.0f} MiB of weights in one safetensors file, built on "
        f"the meta device per system; input {args.tokens} x {args.width}; budget "
        f"{info['budget'] / MiB:.0f} MiB. torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, profile `{args.profile}`.",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Load at start: `{info['load_start']}`  ",
        f"Load at end: `{uptime()}`",
        "",
        f"Median of {args.repeats} timed forwards after a warm-up, interleaved across "
        "systems. *cold*: the page cache of the files the system's forward reads (the "
        "checkpoint, or its offload directory's copies) dropped before each timed "
        "forward. *written*: bytes in the system's offload directory after setup. "
        "*setup*: planning (planner) or "
        "`infer_auto_device_map` + `load_checkpoint_and_dispatch` (Accelerate). Peak: "
        "the planner's meter (file-backed storages are not counted).",
        "",
        "| system | setup s | written MiB | cold s | warm s | vs eager (cold / warm) | "
        "measured peak MiB | output vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    e_cold, e_warm = med(eager.cold), med(eager.warm)
    for s in systems:
        c, w = med(s.cold), med(s.warm)
        vs = f"{c / e_cold:.2f}x / {w / e_warm:.2f}x" if c and w and e_cold and e_warm else "-"
        written = "-" if s is eager else f"{s.extra['written'] / MiB:.1f}"
        outcome = "bit-identical" if s.equal else f"max diff {s.max_abs_diff:.1e}"
        peak = "-" if s.peak is None else f"{s.peak / MiB:.1f}"
        lines.append(
            f"| {s.name} | {s.setup_seconds:.1f} | {written} | {fmt_s(c)} | {fmt_s(w)} | "
            f"{vs} | {peak} | {outcome} |"
        )
    lines += ["", "All timings (s):", ""]
    for s in systems:
        lines.append(
            f"- {s.name}: cold {[round(v, 2) for v in s.cold]}, warm "
            f"{[round(v, 2) for v in s.warm]}" + (f"; {s.note}" if s.note else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budget", default="256MiB", help='bytes, "256MiB", or "25%%" of the weights')
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--profile", default="cpu", help="planner device profile")
    ap.add_argument("--root", default=None, help="parent of the checkpoint and offload dirs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    info: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "load_start": uptime(),
    }
    torch.manual_seed(0)
    reference = make_model(args.blocks, args.width)
    for p in reference.parameters():
        p.requires_grad_(False)
    state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    info["weight_bytes"] = sum(v.numel() * v.element_size() for v in state.values())
    budget = parse_budget(args.budget, info["weight_bytes"])
    info["budget"] = budget
    x = torch.randn(args.tokens, args.width)
    root = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=args.root))
    systems: list[System] = []
    try:
        path = root / "checkpoint" / "model.safetensors"
        path.parent.mkdir()
        save_file(state, str(path))
        del state
        eager = eager_system(reference)
        ref = eager.fn(x)
        systems.append(eager)
        log.info("planner, weights read in place...")
        systems.append(planner_system("planner, read in place", args, path, budget, x, root))
        log.info("planner, copying into its store...")
        with copying_into_the_store():
            systems.append(
                planner_system("planner, copied into its store", args, path, budget, x, root)
            )
        log.info("accelerate...")
        systems.append(accelerate_system(args, path, budget, root))
        for s in systems:
            check_and_meter(s, x, ref)
            s.fn(x)  # warm-up
        for _ in range(args.repeats):
            for s in systems:
                timed_call(s, x, cold=True)
            for s in systems:
                timed_call(s, x, cold=False)
    finally:
        for s in systems:
            if s.close is not None:
                s.close()
        shutil.rmtree(root, ignore_errors=True)
    text = render(args, systems, info)
    print(text)
    if args.out:
        write_report(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
