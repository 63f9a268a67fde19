"""planner vs HF Accelerate, side by side: weights larger than the memory budget.

Model: ``--blocks`` x (Linear(width, width) + GELU), fp32, fed ``--tokens`` rows.
Systems, all in one process, all on the same weights:

- eager: everything resident (the compute-only reference, no budget);
- planner: ``planner.plan(model, budget, ...)`` with the calibrated device profile;
- accelerate disk_offload: ``accelerate.disk_offload`` (every weight on disk, loaded
  synchronously by a hook just before its module runs);
- accelerate max_memory: ``infer_auto_device_map(max_memory={"cpu": budget})`` +
  ``dispatch_model`` (the first blocks resident, the rest offloaded to disk);
- planner @ matched peak: planner again, with its budget set to the measured peak of
  Accelerate's disk_offload (``--no-match`` skips it).

For each: median seconds per forward after a warm-up, "cold" (the page cache of the
system's offload files dropped before every timed forward with
``posix_fadvise(DONTNEED)``) and "warm" (not dropped); repeats are interleaved across
systems so that a change in machine load hits them alike. Peak memory comes from
planner's independent meter (``planner.runtime.meter.measure``), each system's module
and the input passed as resident (file-backed / meta storages are not counted),
plus every allocation during one forward. Outputs are compared with eager's.

    python benchmarks/accelerate_bench.py --out BENCHMARKS_accelerate.md

A full run at the defaults (16 x 4096, 512 tokens, 256MiB) takes a few minutes on a
2-core CPU and peaks near 2 GiB of RAM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import planner  # noqa: E402
from planner.budget import parse_budget  # noqa: E402
from planner.errors import BudgetTooSmall  # noqa: E402
from planner.passes.device_profile import default_profile_path, get_profile  # noqa: E402
from planner.runtime.meter import measure  # noqa: E402

log = logging.getLogger("accelerate_bench")
MiB = 1 << 20


# ----------------------------------------------------------------------------- model


def make_model(blocks: int, width: int, device: str | None = None) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    with torch.device(device) if device else contextlib.nullcontext():
        for _ in range(blocks):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval()


def fresh_model(blocks: int, width: int, state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """A new module whose parameters share storage with ``state`` (no copy): each
    system gets its own module object, all compute on the very same weights."""
    model = make_model(blocks, width, device="meta")
    model.load_state_dict(state, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------- page cache


def drop_page_cache(directory: str | os.PathLike[str] | None) -> int:
    """Write back and drop the cached pages of every file under ``directory``."""
    if directory is None:
        return 0
    n = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def dir_bytes(directory: str | os.PathLike[str] | None) -> int:
    if directory is None:
        return 0
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


# ------------------------------------------------------------------------- systems


@dataclass
class System:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    offload_dir: str | None
    setup_seconds: float
    note: str = ""
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # seconds blocked on I/O per timed call
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per warm call
    load_cpu: list[float] = field(default_factory=list)  # CPU s spent loading weights per call
    peak: int | None = None
    resident: int | None = None
    metered_seconds: float | None = None
    equal: bool | None = None
    allclose: bool | None = None
    max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] | None = None
    blocked: list[float] = field(default_factory=lambda: [0.0])  # running I/O-wait counter
    loading: list[float] = field(default_factory=lambda: [0.0])  # running load-CPU counter


def eager_system(model: torch.nn.Module) -> System:
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return System("eager (all weights resident, no budget)", fn, model, None, 0.0)


def planner_system(
    name: str,
    model: torch.nn.Module,
    budget: int,
    x: torch.Tensor,
    root: str,
    profile: Any,
    time_limit: float,
) -> System:
    start = time.perf_counter()
    pm = planner.plan(
        model, budget, (x,), mode="infer", offload_dir=root, profile=profile, time_limit=time_limit
    )
    setup = time.perf_counter() - start
    sysm = System(name, pm, pm, str(pm.offload_dir), setup, close=pm.close)
    # count the seconds the executor blocks in rt.wait (prefetch not yet done): the
    # I/O that compute did not hide. Instance attribute: planner's code is unchanged.
    rt = pm._runtime
    orig_wait = rt.wait

    def timed_wait(pending: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return orig_wait(pending)
        finally:
            sysm.blocked[0] += time.perf_counter() - t0

    rt.wait = timed_wait  # type: ignore[method-assign]
    # CPU seconds the background reader spends per weight read (copy out of the page
    # cache into a fresh buffer, its page faults, the CRC32 check)
    disk = rt.engine.disk
    orig_read = disk.read_into
    lock = threading.Lock()

    def timed_read(key: str, out: torch.Tensor) -> torch.Tensor:
        t0 = time.thread_time()
        try:
            return orig_read(key, out)
        finally:
            with lock:
                sysm.loading[0] += time.thread_time() - t0

    disk.read_into = timed_read  # type: ignore[method-assign]
    plan = pm.plan
    homes: dict[str, int] = {}
    for t in plan.tensors:
        if t.kind in ("param", "buffer"):
            homes[t.home] = homes.get(t.home, 0) + 1
    sysm.extra = {
        "budget": plan.budget_bytes,
        "predicted_peak": plan.predicted_peak_bytes,
        "estimated_seconds": plan.estimated_seconds,
        "unplanned_estimated_seconds": plan.unplanned_estimated_seconds,
        "solver": f"{plan.solver.name} {plan.solver.status} {plan.solver.seconds:.2f}s",
        "homes": homes,
        "prefetches": sum(1 for a in plan.actions if a.kind == "prefetch"),
        "baselines (est. s)": {
            k: (round(v["seconds"], 3) if v.get("fits") else "no fit")
            for k, v in plan.baselines.items()
        },
    }
    sysm.note = (
        f"budget {plan.budget_bytes / MiB:.0f} MiB; predicted peak "
        f"{plan.predicted_peak_bytes / MiB:.0f} MiB; estimated "
        f"{plan.estimated_seconds:.2f} s; weights by home {homes}"
    )
    return sysm


_ACCEL_LOAD = [0.0]
_ACCEL_LOAD_CPU = [0.0]


def _instrument_accelerate() -> None:
    """Count seconds spent loading offloaded weights (synchronous, in the hook)."""
    from accelerate.utils import offload

    cls = offload.OffloadedWeightsLoader
    if getattr(cls, "_bench_timed", False):
        return
    orig = cls.__getitem__

    def timed(self: Any, key: str) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return orig(self, key)
        finally:
            _ACCEL_LOAD[0] += time.perf_counter() - t0
            _ACCEL_LOAD_CPU[0] += time.thread_time() - c0

    cls.__getitem__ = timed  # type: ignore[method-assign]
    cls._bench_timed = True  # type: ignore[attr-defined]


def accelerate_disk_system(model: torch.nn.Module, root: str) -> System:
    from accelerate import disk_offload

    d = tempfile.mkdtemp(prefix="accel-disk-", dir=root)
    start = time.perf_counter()
    disk_offload(model, offload_dir=d, execution_device=torch.device("cpu"))
    setup = time.perf_counter() - start

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    s = System(
        "accelerate disk_offload",
        fn,
        model,
        d,
        setup,
        note="every weight on disk; loaded by a pre-forward hook, no prefetch",
        close=lambda: shutil.rmtree(d, ignore_errors=True),
    )
    s.blocked = _ACCEL_LOAD
    s.loading = _ACCEL_LOAD_CPU
    return s


def accelerate_map_system(model: torch.nn.Module, budget: int, root: str) -> System:
    from accelerate import dispatch_model, infer_auto_device_map

    d = tempfile.mkdtemp(prefix="accel-map-", dir=root)
    start = time.perf_counter()
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget})
    dispatch_model(model, device_map=device_map, offload_dir=d)
    setup = time.perf_counter() - start
    where: dict[str, int] = {}
    for dev in device_map.values():
        where[str(dev)] = where.get(str(dev), 0) + 1
    if set(device_map) == {""}:
        where = {str(device_map[""]): 1}

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    s = System(
        f'accelerate max_memory={{"cpu": {budget / MiB:.0f} MiB}} + disk',
        fn,
        model,
        d,
        setup,
        note=f"device map (modules per device): {where}",
        close=lambda: shutil.rmtree(d, ignore_errors=True),
    )
    s.extra = {"device_map": device_map}
    s.blocked = _ACCEL_LOAD
    s.loading = _ACCEL_LOAD_CPU
    return s


# --------------------------------------------------------------------- measurement


def check_and_meter(s: System, x: torch.Tensor, ref: torch.Tensor) -> None:
    out, m = measure(lambda: s.fn(x), s.module, x)
    s.peak, s.resident, s.metered_seconds = m.peak_bytes, m.resident_bytes, m.seconds
    s.equal = bool(torch.equal(out, ref))
    s.allclose = bool(torch.allclose(out, ref, rtol=1e-5, atol=1e-5))
    s.max_abs_diff = float((out - ref).abs().max())
    log.info(
        "%s: peak %.1f MiB (resident %.1f), equal=%s allclose=%s max|diff|=%.3g",
        s.name,
        s.peak / MiB,
        s.resident / MiB,
        s.equal,
        s.allclose,
        s.max_abs_diff,
    )


def timed_call(s: System, x: torch.Tensor, cold: bool) -> float:
    if cold:
        drop_page_cache(s.offload_dir)
    blocked0, loading0 = s.blocked[0], s.loading[0]
    c0 = time.process_time()
    t0 = time.perf_counter()
    s.fn(x)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    (s.cold if cold else s.warm).append(dt)
    if cold:
        s.waits.append(s.blocked[0] - blocked0)
    else:
        s.cpu.append(cpu)
        s.load_cpu.append(s.loading[0] - loading0)
    return dt


def load_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------- report


def render(args: argparse.Namespace, systems: list[System], info: dict[str, Any]) -> str:
    eager = systems[0]
    planner_main = next((s for s in systems if s.name.startswith("planner")), None)
    lines = [
        "# planner vs HF Accelerate: offloaded inference under a memory budget",
        "",
        f"Model: {args.blocks} x (Linear({args.width}, {args.width}) + GELU), fp32, "
        f"{info['weight_bytes'] / MiB:.0f} MiB of weights; input {args.tokens} x {args.width}. "
        f"Budget {info['budget'] / MiB:.0f} MiB "
        f"({100 * info['budget'] / info['weight_bytes']:.0f}% of the weights). "
        f"torch {torch.__version__}, accelerate {info['accelerate']}, "
        f"{torch.get_num_threads()} intra-op threads, profile `{info['profile']}`.",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Load at start: `{info['load_start']}`  ",
        f"Load at end: `{info['load_end']}`",
        "",
        f"Seconds per forward: median of {args.repeats} after one warm-up, repeats interleaved "
        "across systems. *cold*: the page cache of the system's offload files dropped "
        "(`posix_fadvise(DONTNEED)`) before each timed forward; *warm*: not dropped. "
        "*I/O wait*: median seconds per cold forward blocked on weight loads (planner: in "
        "`rt.wait`; Accelerate: inside the hook's synchronous load). Peak: planner's meter, "
        "module state resident in RAM + every allocation during one forward. "
        "*CPU s*: process CPU seconds (all threads) per warm forward; *load CPU s*: of which "
        "spent loading weights (planner: the background reader thread; Accelerate: the hook's "
        "load). Speed-up = Accelerate's median / planner's median (the first `planner` row).",
        "",
        "| system | cold s | warm s | I/O wait s (cold) | CPU s (warm) | load CPU s (warm) | "
        "vs eager (cold / warm) | speed-up of planner (cold / warm) | "
        "measured peak MiB | peak / budget | output vs eager | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    e_cold = med(eager.cold)
    for s in systems:
        c, w = med(s.cold), med(s.warm)
        e_warm = med(eager.warm)
        vs = (
            "-"
            if c is None or not e_cold or not w or not e_warm
            else f"{c / e_cold:.2f}x / {w / e_warm:.2f}x"
        )
        sp = "-"
        if planner_main is not None and s.name.startswith("accelerate") and c and w:
            pc, pw = med(planner_main.cold), med(planner_main.warm)
            if pc and pw:
                sp = f"{c / pc:.2f}x / {w / pw:.2f}x"
        if s.equal:
            outcome = "bit-identical"
        elif s.allclose:
            outcome = f"allclose (max diff {s.max_abs_diff:.1e})"
        else:
            outcome = f"**MISMATCH** (max diff {s.max_abs_diff:.1e})"
        peak = "-" if s.peak is None else f"{s.peak / MiB:.2f}"
        ratio = "-" if s.peak is None or s is eager else f"{s.peak / info['budget']:.2f}"
        wait = "-" if not s.waits else f"{statistics.median(s.waits):.2f}"
        lines.append(
            f"| {s.name} | {fmt_s(c)} | {fmt_s(w)} | {wait} | {fmt_s(med(s.cpu))} | "
            f"{fmt_s(med(s.load_cpu))} | {vs} | {sp} | {peak} | "
            f"{ratio} | {outcome} | {s.setup_seconds:.1f} |"
        )
    lines += ["", "All timings (s):", ""]
    for s in systems:
        lines.append(
            f"- {s.name}: cold {[round(v, 2) for v in s.cold]}, warm "
            f"{[round(v, 2) for v in s.warm]}; metered run {s.metered_seconds or 0:.2f} s"
            + (f"; {s.note}" if s.note else "")
        )
    for s in systems:
        if s.name.startswith("planner") and s.extra:
            lines += ["", f"{s.name}: plan says {s.extra}"]
    if info.get("match_note"):
        lines += ["", info["match_note"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument(
        "--budget", default="256MiB", help='bytes, "256MiB", or a share "25%%" of the weights'
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per mode")
    ap.add_argument("--time-limit", type=float, default=10.0, help="planner solver seconds")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="calibrate (quick) now instead of using the saved profile",
    )
    ap.add_argument(
        "--no-match",
        action="store_true",
        help="skip planner at Accelerate disk_offload's measured peak",
    )
    ap.add_argument("--offload-root", default=None, help="parent of all offload dirs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the markdown here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("accelerate").setLevel(logging.ERROR)

    import accelerate

    info: dict[str, Any] = {
        "accelerate": accelerate.__version__,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "load_start": load_line(),
    }
    log.info("load: %s", info["load_start"])
    if args.calibrate or not default_profile_path().is_file():
        from planner.runtime.calibrate import calibrate

        profile: Any = calibrate(quick=True)
        info["profile"] = "calibrate(quick=True), this run"
    else:
        profile = get_profile(None)
        info["profile"] = str(default_profile_path())

    torch.manual_seed(args.seed)
    reference = make_model(args.blocks, args.width)
    for p in reference.parameters():
        p.requires_grad_(False)
    state = {k: v.detach() for k, v in reference.state_dict().items()}
    weight_bytes = sum(v.numel() * v.element_size() for v in state.values())
    info["weight_bytes"] = weight_bytes
    budget = parse_budget(args.budget, weight_bytes)
    info["budget"] = budget
    x = torch.randn(args.tokens, args.width)

    root = tempfile.mkdtemp(prefix="accelerate-bench-", dir=args.offload_root)
    systems: list[System] = []
    try:
        eager = eager_system(reference)
        ref = eager.fn(x)
        systems.append(eager)
        _instrument_accelerate()
        log.info("planning (budget %d MiB)...", budget // MiB)
        systems.append(
            planner_system(
                f"planner @ {budget / MiB:.0f} MiB budget",
                fresh_model(args.blocks, args.width, state),
                budget,
                x,
                root,
                profile,
                args.time_limit,
            )
        )
        log.info("accelerate disk_offload...")
        acc_disk = accelerate_disk_system(fresh_model(args.blocks, args.width, state), root)
        systems.append(acc_disk)
        log.info("accelerate max_memory map...")
        systems.append(
            accelerate_map_system(fresh_model(args.blocks, args.width, state), budget, root)
        )
        for s in systems:
            s.fn(x)  # warm-up (also builds any lazy state)
            check_and_meter(s, x, ref)
        if not args.no_match and acc_disk.peak is not None:
            target = acc_disk.peak
            try:
                s = planner_system(
                    f"planner @ {target / MiB:.0f} MiB (= disk_offload's peak)",
                    fresh_model(args.blocks, args.width, state),
                    target,
                    x,
                    root,
                    profile,
                    args.time_limit,
                )
                s.fn(x)
                check_and_meter(s, x, ref)
                systems.append(s)
            except BudgetTooSmall as exc:
                info["match_note"] = (
                    f"planner at Accelerate disk_offload's measured peak "
                    f"({target / MiB:.1f} MiB): BudgetTooSmall, min_budget="
                    f"{exc.min_budget}: {exc}"
                )
                log.info(info["match_note"])
                if exc.min_budget:
                    low = int(exc.min_budget)
                    s = planner_system(
                        f"planner @ {low / MiB:.1f} MiB (its smallest budget)",
                        fresh_model(args.blocks, args.width, state),
                        low,
                        x,
                        root,
                        profile,
                        args.time_limit,
                    )
                    s.fn(x)
                    check_and_meter(s, x, ref)
                    systems.append(s)
        for s in systems:
            log.info(
                "offload dir of %s: %s (%.0f MiB)",
                s.name,
                s.offload_dir,
                dir_bytes(s.offload_dir) / MiB,
            )
        for r in range(args.repeats):
            for cold in (True, False):
                for s in systems:
                    dt = timed_call(s, x, cold)
                    log.info("rep %d %s %s: %.2f s", r, "cold" if cold else "warm", s.name, dt)
        info["load_end"] = load_line()
        text = render(args, systems, info)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
            log.info("wrote %s", args.out)
        bad = [s.name for s in systems if not s.allclose]
        if bad:
            log.error("outputs differ from eager: %s", bad)
            return 1
        return 0
    finally:
        for s in systems:
            if s.close is not None:
                s.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
