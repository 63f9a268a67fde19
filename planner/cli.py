"""``planner`` command line: ``report`` and ``calibrate``.

    planner report FILE.py:FACTORY [--mode train] [--json] [--measure] [--profile P]
                   [--budget B] [--checkpoint PATH]
    planner calibrate [--out PATH] [--quick]

FACTORY() must return ``(model, example_inputs)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from planner.errors import BudgetTooSmall, PlannerError, PlannerWarning


def load_factory(spec: str) -> tuple[Any, Any]:
    """Import ``FILE.py:FACTORY`` and call it; errors say what was expected."""
    if ":" not in spec:
        raise SystemExit(
            f"error: expected FILE.py:FACTORY, got {spec!r} (e.g. examples/mlp.py:make_mlp)"
        )
    file_part, _, factory_name = spec.rpartition(":")
    path = Path(file_part)
    if path.is_dir():
        raise SystemExit(
            f"error: {str(path)!r} is a directory: give the Python file that defines "
            f"{factory_name}, FILE.py:{factory_name}"
        )
    if not path.is_file():
        raise SystemExit(f"error: no such file {str(path)!r}")
    module_name = f"_planner_factory_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"error: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: say so in one line
        raise SystemExit(f"error: importing {str(path)!r} raised {_one_line(exc)}") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(module, factory_name, None)
    if factory is not None and not callable(factory):
        kind = type(factory).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise SystemExit(
            f"error: {factory_name!r} in {str(path)!r} is {article} {kind}, not a function: "
            f"give a function that returns (model, example_inputs)"
        )
    if not callable(factory):
        names = sorted(n for n in dir(module) if n.startswith(("make", "build", "create")))
        raise SystemExit(
            f"error: {str(path)!r} has no function {factory_name!r}"
            + (f"; it has {', '.join(names)}" if names else "")
        )
    try:
        result = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory: say so in one line
        raise SystemExit(f"error: {factory_name}() raised {_one_line(exc)}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise SystemExit(
            f"error: {factory_name}() must return (model, example_inputs), "
            f"got {type(result).__name__}"
        )
    return result


def _cmd_report(args: argparse.Namespace) -> int:
    from planner.api import DEFAULT_TIME_LIMIT, analyze, report
    from planner.api import plan as plan_module
    from planner.budget import is_smallest, parse_budget

    needs_budget = [
        flag
        for flag, given in (
            ("--save-plan", args.save_plan),
            ("--kernels inductor", args.kernels != "eager"),
            ("--quantize", args.quantize),
            ("--no-measured-room", not args.measure_room),
            ("--time-limit", args.time_limit is not None),
        )
        if given
    ]
    if args.budget is None and needs_budget:  # they shape a plan; without one, ignored
        verb = "needs" if len(needs_budget) == 1 else "need"
        raise SystemExit(f"error: {', '.join(needs_budget)} {verb} a plan: give --budget too")
    if args.budget is not None and not is_smallest(args.budget):
        # its form, before the model is built and traced (a share's bytes need the
        # unplanned peak: any will do to read it); planning reads it again
        parse_budget(args.budget, unplanned_peak=1 << 62)
    if args.time_limit is not None and not args.time_limit >= 0:  # NaN too
        raise SystemExit(
            f"error: --time-limit {args.time_limit} is not seconds of solver search: give a "
            f"number >= 0 (default {DEFAULT_TIME_LIMIT:g}; 0 keeps the best baseline plan)"
        )
    for flag, path in (("--save-plan", args.save_plan), ("--plot", args.plot)):
        _check_writable(flag, path)  # before minutes of planning, not after
    if args.plot is not None:
        from planner.plot import unwritable_format

        why = unwritable_format(args.plot)
        if why is not None:
            raise SystemExit(f"error: --plot {args.plot}: {why}")
    model, example_inputs = load_factory(args.factory)
    if args.checkpoint is not None:  # a model built on the meta device takes its weights
        from planner.runtime.checkpoint import attach_checkpoint

        attach_checkpoint(model, args.checkpoint)
    if args.budget is not None:
        reference = None
        if args.quantize and args.mode == "infer":  # the lossless outputs, to report the error
            import torch

            args_, kwargs_ = _split_inputs(example_inputs)
            with torch.no_grad():
                reference = model(*args_, **kwargs_)
        pm = plan_module(
            model,
            args.budget,
            example_inputs,
            mode=args.mode,
            profile=args.profile,
            quantize=args.quantize,
            time_limit=DEFAULT_TIME_LIMIT if args.time_limit is None else args.time_limit,
            kernels=args.kernels,
            measure_room=args.measure_room,
        )
        try:
            args_, kwargs_ = _split_inputs(example_inputs)
            if args.mode == "train":
                pm.run_measured_step(*args_, **kwargs_)
            else:
                pm.run_measured(*args_, **kwargs_)
                pm.time_call(*args_, repeats=3, **kwargs_)
            if args.quantize:
                pm.measure_quantization_error(*args_, reference=reference, **kwargs_)
            result = pm.report
            if args.save_plan:
                pm.plan.save(args.save_plan)
            if args.plot:
                from planner.plot import plot_timeline

                plotted = plot_timeline(
                    pm.analysis, pm.plan, args.plot, pm.measured.peak_bytes if pm.measured else None
                )
        finally:
            pm.close()
    else:
        result = report(
            model, example_inputs, mode=args.mode, profile=args.profile, measure_peak=args.measure
        )
        if args.plot:
            from planner.plot import plot_timeline

            plotted = plot_timeline(
                analyze(model, example_inputs, args.mode, args.profile),
                None,
                args.plot,
                result.measured["peak_bytes"] if result.measured else None,
            )
    if args.json:
        print(result.to_json())
    else:
        from planner.report import render_text

        print(render_text(result, width=_text_width()), end="")
    if args.plot:  # on stderr: stdout stays the report (--json pipes)
        print(f"plot written to {plotted}", file=sys.stderr)
    return 0


def _text_width() -> int:
    """The text report's width: a terminal's, when printed to one (140-column rows
    wrapped on a 100-column terminal, each onto a second line); else 140, the same
    text in every file and pipe."""
    if sys.stdout.isatty():
        import shutil

        return max(80, shutil.get_terminal_size((140, 24)).columns)
    return 140


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    from planner.ir.capture import normalize_example_inputs

    return normalize_example_inputs(example_inputs)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from planner.passes.device_profile import PROFILE_ENV_VAR, default_profile_path
    from planner.runtime.calibrate import calibrate
    from planner.runtime.store import StoreError, check_offload_dir

    target = Path(args.out).expanduser() if args.out else default_profile_path()
    flag = (
        "--out"
        if args.out
        else f"${PROFILE_ENV_VAR}"
        if os.environ.get(PROFILE_ENV_VAR)
        else "the profile path"
    )
    # before measuring, not after: a bare "[Errno 2] No such file or directory"
    _check_writable(flag, str(target), make_parents=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # calibrate's RuntimeError was a traceback
            raise SystemExit(
                "error: --device cuda: CUDA is not available here (no GPU visible, or "
                "a torch built without CUDA); measure this machine with --device cpu"
            )
    # expanded once, checked and measured: "~/dir" given as --disk-dir=~/dir (no shell
    # expands it) passed the check, then failed to measure after the rest
    disk_dir = None if args.disk_dir is None else Path(args.disk_dir).expanduser()
    if disk_dir is not None:  # the disk is timed last: it failed after the rest
        if not disk_dir.exists():
            raise SystemExit(
                f"error: --disk-dir {args.disk_dir} does not exist; create it or give "
                f"an existing directory (the one offloaded tensors will live in)"
            )
        if not disk_dir.is_dir():
            raise SystemExit(f"error: --disk-dir {args.disk_dir} is not a directory")
        try:  # the store's own probe (permission bits do not tell for root)
            check_offload_dir(disk_dir)
        except StoreError as exc:
            raise SystemExit(f"error: --disk-dir {args.disk_dir} is not writable: {exc}") from exc
    disk = None if disk_dir is None else str(disk_dir)
    profile = calibrate(device=args.device, disk_dir=disk, quick=args.quick)
    path = profile.save(target)
    for key, value in profile.to_dict().items():
        print(f"{key:24s} {value}")
    print(f"saved to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planner", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress, and show Python warnings (hidden otherwise)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("report", help="print the placement report of a model")
    rep.add_argument("factory", help="FILE.py:FACTORY, FACTORY() -> (model, example_inputs)")
    rep.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="infer: the forward pass; train: one training step, forward and backward "
        "(default: infer)",
    )
    rep.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (pm.report.to_json()) instead of the table",
    )
    rep.add_argument(
        "--measure",
        action="store_true",
        help="without --budget: also run the unplanned model once under the memory meter "
        "(with --budget the planned module is always run once under it)",
    )
    rep.add_argument(
        "--profile",
        default=None,
        help="device profile: h100, h200, a100, rtx4090, t4, cpu, or a JSON path "
        "(default: the calibrated one, else this machine's built-in)",
    )
    rep.add_argument(
        "--budget",
        default=None,
        help="plan under this budget: bytes, '512MiB', '2GB', '60%%' of the unplanned peak or "
        "'min' (the smallest a plan is found for), "
        "then run the plan once under the memory meter (default: no plan; the report of "
        "the model as it is, every tensor kept)",
    )
    rep.add_argument(
        "--quantize",
        default=None,
        choices=("int8", "int4"),
        help="with --budget: allow lossy quantized storage in this format; the report "
        "adds each quantized tensor's error (default: none, lossless)",
    )
    rep.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="with --budget: seconds of CP-SAT's search (default 20); capture, the "
        "baselines and compiling come on top",
    )
    rep.add_argument(
        "--kernels",
        default="eager",
        choices=("eager", "inductor"),  # planner.codegen.emit.KERNELS (torch-free import)
        help="with --budget: run ops eagerly (bit-identical, default) or runs of them "
        "compiled by TorchInductor (fused, within rounding of eager)",
    )
    rep.add_argument(
        "--no-measured-room",
        dest="measure_room",
        action="store_false",
        help="with --kernels inductor: solve for the budget only, not also for more "
        "(schedules whose compiled runs hold within the budget; faster to plan)",
    )
    rep.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="a safetensors checkpoint (a file, a sharded one's index, or their "
        "directory) for a model FACTORY builds on the meta device (torch.device('meta')) "
        "(default: none, the weights FACTORY made)",
    )
    rep.add_argument(
        "--save-plan",
        default=None,
        metavar="PATH",
        help="with --budget: write the plan as JSON here, for planner.plan(..., plan=PATH) "
        "(default: not saved)",
    )
    rep.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="draw planned (and unplanned) residency per step against the budget into "
        "this file, PNG (or another format matplotlib writes, by its suffix) (default: no plot)",
    )
    rep.set_defaults(run=_cmd_report)

    cal = sub.add_parser("calibrate", help="measure this machine and save a device profile")
    cal.add_argument("--out", default=None, help="where to save (default: the profile path)")
    cal.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device to measure (default: cpu)"
    )
    cal.add_argument(
        "--disk-dir",
        default=None,
        help="directory to time disk reads/writes in: the one offloaded tensors will live "
        "in (default: the system's temporary directory)",
    )
    cal.add_argument("--quick", action="store_true", help="smaller measurements (~10 s)")
    cal.set_defaults(run=_cmd_calibrate)
    return parser


def _check_writable(flag: str, path: str | None, make_parents: bool = False) -> None:
    """An output path whose directory is missing or read-only is an error now;
    ``make_parents``: the directories the writer makes may be missing, the
    nearest that exists must take them."""
    if path is None:
        return
    if not path.strip():
        raise SystemExit(f"error: {flag} was given an empty path: give a file path")
    target = Path(path)
    where = target.parent if str(target.parent) else Path(".")
    if make_parents:
        while not where.exists() and where != where.parent:
            where = where.parent
        if where.exists() and not where.is_dir():
            raise SystemExit(
                f"error: {flag} {path}: {where} is a file, not a directory; give a path "
                f"in a directory you can write to"
            )
    if target.is_dir():
        raise SystemExit(f"error: {flag} {path} is a directory: give a file path")
    if target.exists():  # a file (or /dev/stdout) written in place: its own permission
        if not os.access(target, os.W_OK):
            raise SystemExit(f"error: {flag} {path} is not writable")
        return
    if not where.is_dir():
        raise SystemExit(
            f"error: {flag} {path}: directory {where} does not exist; create it or give "
            f"a path in an existing directory"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: directory {where} is not writable")
    # as root the permission bits pass where a write fails (/proc, /sys, a read-only
    # mount): it failed after the solve, as a bare "[Errno 2] No such file or directory"
    probe = where / f".planner-write-probe-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise SystemExit(
            f"error: {flag} {path}: cannot create a file in {where} "
            f"({exc.strerror or exc}); give a path in a directory you can write to"
        ) from None
    os.unlink(probe)


def _negative_budget_joined(argv: list[str]) -> list[str]:
    """``--budget -5%`` as ``--budget=-5%``: argparse takes a value starting with
    ``-`` for an option and said only "expected one argument"; joined, the budget's
    own check says what is wrong with it."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        flag = len(arg) >= 3 and "--budget".startswith(arg)  # argparse takes "--bud" too
        if flag and out[i + 1].startswith("-") and out[i + 1][1:2].isdigit():
            out[i : i + 2] = [f"--budget={out[i + 1]}"]
            break
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _negative_budget_joined(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # the caller's state is left as it was (main() may be called in a process
    # that goes on): warning filters, and the level of torch's logger
    level = None if args.verbose else _quiet_torch_trace_logs()
    try:
        with warnings.catch_warnings():
            _show_planner_warnings(everything=args.verbose)
            return _run(args)
    finally:
        if level is not None:
            logging.getLogger(_FAKE_TENSOR_LOG).setLevel(level)


def _show_planner_warnings(everything: bool) -> None:
    """The planner's own warnings (a model left in training mode planned for
    inference, forward hooks a planned call does not run) as one line each on
    stderr; those of torch, transformers and the factory only with -v, as Python
    shows them (without -v all were hidden, the planner's too)."""
    if not everything:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=PlannerWarning)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, PlannerWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _run(args: argparse.Namespace) -> int:
    """The command, its errors as the exit codes the README gives."""
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: the planned module is closed on the way out
        print("error: interrupted", file=sys.stderr)
        return 130
    except BudgetTooSmall as exc:  # its advice in the CLI's words
        message = str(exc).replace("(quantize=...)", "(--quantize ...)")
        message = message.replace("(quantize='int4')", "(--quantize int4)")
        print(f"error: {message}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # the reader stopped reading (`| head`): nothing to tell it
        # Python's flush of stdout at exit would fail too, and print that it did
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # OSError: an output path (--save-plan, --plot) that cannot be written
    except (PlannerError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


_FAKE_TENSOR_LOG = "torch._subclasses.fake_tensor"


def _quiet_torch_trace_logs() -> int:
    """torch logs an op its fake tensors cannot run (a shape the model does not
    take) as a 20-line traceback at ERROR, before the planner's error says the same
    with the user's source line: shown with -v only. Returns the logger's level
    before, which ``main`` puts back."""
    import torch  # noqa: F401 - importing torch sets its loggers' levels: after it

    logger = logging.getLogger(_FAKE_TENSOR_LOG)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    return level


def _one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
