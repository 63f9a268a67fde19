"""`planner report` end to end, and the Report's JSON contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT, toy

import planner
from planner.cli import main

JSON_KEYS = {
    "budget_bytes",
    "unplanned_peak_bytes",
    "planned_peak_bytes",
    "estimated_seconds",
    "unplanned_estimated_seconds",
    "solver",
    "tensors",
}


def test_report_json_contract() -> None:
    model, inputs = toy("residual", 2)
    report = planner.report(model, inputs, mode="train", profile="cpu")
    data = json.loads(report.to_json())
    assert JSON_KEYS <= set(data)
    assert data["budget_bytes"] is None
    assert data["planned_peak_bytes"] == data["unplanned_peak_bytes"] > 0
    assert set(data["solver"]) == {"name", "status", "seconds", "objective", "bound"}
    row = data["tensors"][0]
    assert {"name", "bytes", "kind", "live", "decision", "producer"} <= set(row)
    assert sum(r["bytes"] for r in data["tensors"] if r["kind"] == "param") == sum(
        p.numel() * 4 for p in model.parameters()
    )


def test_report_text_lists_every_tensor() -> None:
    model, inputs = toy("chain", 1)
    report = planner.report(model, inputs, profile="cpu")
    text = str(report)
    for row in report.tensors:
        assert row.name in text
    assert "unplanned peak" in text


def test_cli_gpt2_train_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["report", f"{EXAMPLES}/gpt2.py:make_gpt2", "--mode", "train", "--json", "--profile", "cpu"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {row["kind"] for row in data["tensors"]}
    assert {"param", "saved-for-backward", "grad", "tangent"} <= kinds
    assert data["unplanned_peak_bytes"] > 0
    assert len(data["tensors"]) > 100


def test_cli_measure_in_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", f"{EXAMPLES}/mlp.py:make_mlp", "--measure", "--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "measured peak" in out and "predicted/measured" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples/nope.py:make", "no such file"),
        ("examples/mlp.py", "expected FILE.py:FACTORY"),
        ("examples/mlp.py:make_nothing", "has no function 'make_nothing'"),
    ],
)
def test_cli_bad_factory(spec: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["report", str(ROOT / spec) if ":" in spec and "nope" not in spec else spec])


def test_cli_budget_plans(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    plan_path = tmp_path / "plan.json"
    code = main(
        [
            "report",
            f"{EXAMPLES}/mlp.py:make_mlp",
            "--budget",
            "60%",
            "--json",
            "--profile",
            "cpu",
            "--time-limit",
            "10",
            "--save-plan",
            str(plan_path),
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget_bytes"] == int(data["unplanned_peak_bytes"] * 0.6)
    assert data["planned_peak_bytes"] <= data["budget_bytes"]
    # --budget runs the plan once under the independent meter: its peak, not the
    # plan's own prediction, is what must hold the budget
    assert data["measured"] is not None, "the CLI did not meter the planned run"
    assert 0 < data["measured"]["peak_bytes"] <= data["budget_bytes"], data["measured"]
    decisions = {row["decision"] for row in data["tensors"]}
    assert decisions - {"keep"}, "a 60% budget must move something"
    assert plan_path.exists()
    # the MLP's weights go to disk: the report says at which rates, and why
    assert any("disk" in d for d in decisions)
    assert "calibrate" in data["disk_rates"]  # a built-in profile knows no page cache


def test_cli_budget_with_inductor_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "report",
            f"{EXAMPLES}/mlp.py:make_mlp",
            "--budget",
            "60%",
            "--kernels",
            "inductor",
            "--profile",
            "cpu",
            "--time-limit",
            "5",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "kernels:            inductor:" in text
    assert "with runs compiled" in text  # the planned peak as compiled runs hold it
    assert "measured peak" in text


def test_cli_inductor_without_measured_room(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-measured-room: only the schedule for the budget is solved."""
    from planner import measured_room

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("measured room searched")

    monkeypatch.setattr(measured_room, "plan_by_measured_room", refuse)
    monkeypatch.setattr("planner.api.plan_by_measured_room", refuse)
    argv = ["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", "60%", "--kernels", "inductor"]
    code = main([*argv, "--profile", "cpu", "--time-limit", "5", "--no-measured-room"])
    assert code == 0
    assert "schedule solved for" not in capsys.readouterr().out


def _too_small(capsys: pytest.CaptureFixture[str], *options: str) -> str:
    """The CLI's stderr for the MLP example at 1 KiB (exit code 3: BudgetTooSmall)."""
    argv = ["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", "1KiB", *options]
    code = main([*argv, "--profile", "cpu", "--time-limit", "5"])
    assert code == 3
    err = capsys.readouterr().err
    assert "smallest budget a plan was found for" in err
    return err


def test_cli_budget_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    err = _too_small(capsys)
    assert "(--quantize ...)" in err and "quantize=" not in err  # the CLI's words


def test_cli_budget_min_plans_at_the_smallest_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """--budget min is the budget the too-small error names, planned and metered."""
    smallest = re.search(r"Use a budget of at least ([\d,]+) bytes", _too_small(capsys))
    assert smallest is not None
    argv = ["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", "min", "--json"]
    assert main([*argv, "--profile", "cpu", "--time-limit", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget_bytes"] == int(smallest.group(1).replace(",", ""))
    assert report["measured"]["peak_bytes"] <= report["budget_bytes"]


def test_console_script_runs() -> None:
    """The installed entry point works from a shell (what the README tells users)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "planner.cli",
            "report",
            f"{EXAMPLES}/mlp.py:make_mlp",
            "--json",
            "--profile",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["unplanned_peak_bytes"] > 0
    assert "USDT" not in proc.stderr


def _factory_file(tmp_path, body: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "factory.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "def make():\n    raise RuntimeError('no weights here')\n",
            r"make\(\) raised RuntimeError: no weights here$",
        ),
        (
            "def make():\n    raise ValueError('bad config value')\n",
            r"make\(\) raised ValueError: bad config value$",
        ),
        ("def make(:\n", r"importing '.*factory\.py' raised SyntaxError"),
        ("import no_such_module_here\n", r"raised ModuleNotFoundError: No module named"),
    ],
    ids=["factory-raises", "factory-value-error", "syntax-error", "missing-import"],
)
def test_cli_a_failing_factory_is_one_line(tmp_path, body: str, message: str) -> None:
    """The user's file or factory failing: one line naming what raised, not a
    traceback through the planner (a ValueError read as a bad budget before)."""
    with pytest.raises(SystemExit, match=message):
        main(["report", f"{_factory_file(tmp_path, body)}:make"])


def test_cli_plan_options_without_a_budget_are_an_error(tmp_path) -> None:
    """They shape a plan; without --budget none is made, and they were ignored."""
    saved = tmp_path / "p.json"
    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    with pytest.raises(SystemExit, match=r"--save-plan, --kernels inductor need a plan"):
        main(["report", spec, "--save-plan", str(saved), "--kernels", "inductor"])
    assert not saved.exists()
    with pytest.raises(SystemExit, match=r"--time-limit needs a plan"):  # ignored before
        main(["report", spec, "--time-limit", "5"])


def test_cli_an_unwritable_output_path_is_refused_before_planning(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Said at once, naming the flag: it was a bare "No such file or directory"
    after the whole solve and run."""
    monkeypatch.setattr("planner.cli.load_factory", lambda _: pytest.fail("planned first"))
    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    missing = tmp_path / "no" / "such" / "dir" / "plan.json"
    with pytest.raises(SystemExit, match=r"--save-plan .*plan.json: directory .*dir does not"):
        main(["report", spec, "--budget", "60%", "--save-plan", str(missing)])
    with pytest.raises(SystemExit, match=r"--plot .* is a directory"):
        main(["report", spec, "--budget", "60%", "--plot", str(tmp_path)])
    # an empty path was "is a directory"; a suffix matplotlib cannot write failed
    # only after the solve
    with pytest.raises(SystemExit, match=r"--save-plan was given an empty path"):
        main(["report", spec, "--budget", "60%", "--save-plan", ""])
    with pytest.raises(SystemExit, match=r"--plot .*p.xyz: matplotlib cannot write .xyz .*\.png"):
        main(["report", spec, "--budget", "60%", "--plot", str(tmp_path / "p.xyz")])
    assert not (tmp_path / "p.xyz").exists()


def test_cli_a_writable_file_in_a_read_only_directory_is_accepted(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing file is written in place (``--save-plan /dev/stdout``, a file
    one may write in a directory one may not): only the file's permission counts."""
    import os

    import planner.cli as cli

    target = tmp_path / "plan.json"
    target.write_text("")
    real_access = os.access
    # as a non-root user sees it: the directory read-only, the file writable
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: str(p) != str(tmp_path) and real_access(p, mode)
    )

    class Loaded(Exception):
        pass

    def loaded(_):  # the check passed: planning would start here
        raise Loaded

    monkeypatch.setattr(cli, "load_factory", loaded)
    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    with pytest.raises(Loaded):
        main(["report", spec, "--budget", "60%", "--save-plan", str(target)])
    with pytest.raises(SystemExit, match="is not writable"):
        main(["report", spec, "--budget", "60%", "--save-plan", str(tmp_path / "new.json")])


def test_cli_a_negative_budget_is_the_budget_check_s_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--budget -5%``: argparse took it for an option ("expected one argument")."""
    code = main(["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", "-5%"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "-5%" in err
    assert "expected one argument" not in err
    code = main(["report", f"{EXAMPLES}/mlp.py:make_mlp", "--bud", "-5%"])  # abbreviated
    err = capsys.readouterr().err
    assert code == 1 and "cannot read budget '-5%'" in err


def test_huge_sizes_print_without_a_wall_of_digits() -> None:
    from planner.report import format_bytes

    assert format_bytes(1e30) == "8.88e+14 PiB"  # was "909494701772928256.0 TiB"
    assert format_bytes(3 * 2**50) == "3.0 PiB"
    assert format_bytes(5 * 2**40) == "5.0 TiB"


def test_cli_a_pgf_plot_without_its_tex_system_is_refused_before_planning(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib lists .pgf among its formats but lays its text out with a TeX
    system run when saving: without one, --plot p.pgf passed the check and failed
    after the solve with matplotlib's "'xelatex' not found" traceback."""
    import shutil

    monkeypatch.setattr("planner.cli.load_factory", lambda _: pytest.fail("planned first"))
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda cmd, *a, **k: None if "tex" in cmd else real_which(cmd, *a, **k)
    )
    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    refused = r"--plot .*p.pgf: matplotlib writes .pgf files with \w*tex"
    with pytest.raises(SystemExit, match=refused):
        main(["report", spec, "--budget", "60%", "--plot", str(tmp_path / "p.pgf")])


def test_cli_plot_writes_the_timeline_and_names_the_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """With a budget and without; a path without a suffix is written as PNG, under
    the name the CLI prints (matplotlib added ".png" to it silently)."""
    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    assert main(["report", spec, "--budget", "60%", "--plot", str(tmp_path / "timeline")]) == 0
    written = tmp_path / "timeline.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert f"plot written to {written}" in captured.err
    assert "plot written" not in captured.out  # stdout stays the report
    assert main(["report", spec, "--plot", str(tmp_path / "unplanned.svg")]) == 0
    assert (tmp_path / "unplanned.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(os.listdir(tmp_path)) == ["timeline.png", "unplanned.svg"]


def test_cli_plot_to_a_device_or_pipe_writes_it_in_place(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--plot /dev/stdout passed the writability check (it exists) and then wrote a
    new file /dev/stdout.png (as root) or failed after planning; "plot." was written
    as "plot..png"."""
    import threading

    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        assert main(["report", spec, "--plot", str(fifo)]) == 0
    finally:
        # a reader still waiting for a writer (main failed first) is let go; one
        # still draining what was written is left to finish. Never a blocking open:
        # checked with is_alive(), a draining reader made it wait forever (CI hung)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader has the pipe open
            pass
        reader.join(timeout=30)
    assert not reader.is_alive(), "the reader never got the plot"
    assert read and read[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {fifo}\n" in capsys.readouterr().err
    assert main(["report", spec, "--plot", str(tmp_path / "plot.")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["pipe", "plot.png"]


@pytest.mark.parametrize(("quantize", "advice"), [("int8", "(--quantize int4)"), ("int4", None)])
def test_cli_budget_too_small_with_quantize_does_not_advise_quantize_again(
    capsys: pytest.CaptureFixture[str], quantize: str, advice: str | None
) -> None:
    err = _too_small(capsys, "--quantize", quantize)
    assert err.count(" bytes (") == 2  # the budget and the smallest in KiB/MiB too
    assert "(--quantize ...)" not in err  # was advised with --quantize already given
    if advice is not None:
        assert advice in err


def test_cli_every_report_option_says_what_it_does_and_its_default() -> None:
    import argparse

    from planner.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("report", "calibrate"):
        for action in sub.choices[command]._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{command} {flag} has no help"
            if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                assert "default" in action.help, f"{command} {flag} does not say its default"


@pytest.mark.parametrize("via", ["env", "--out"])
def test_cli_calibrate_refuses_an_unwritable_profile_path_before_measuring(
    tmp_path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    """$PLANNER_PROFILE (or --out) where no file can be made: calibrate measured
    for seconds (minutes without --quick), then failed with a bare "[Errno 2] No
    such file or directory: '/proc/nope'" naming neither the option nor the fix."""
    monkeypatch.setattr(
        "planner.runtime.calibrate.calibrate", lambda **_: pytest.fail("measured first")
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "sub" / "profile.json"  # under a regular file: never creatable
    argv = ["calibrate", "--quick"]
    if via == "env":
        monkeypatch.setenv("PLANNER_PROFILE", str(target))
        flag = r"\$PLANNER_PROFILE"
    else:
        argv += ["--out", str(target)]
        flag = "--out"
    with pytest.raises(SystemExit, match=rf"^error: {flag} .*profile\.json: .*a-file"):
        main(argv)
    assert blocker.read_text() == "" and not list(tmp_path.glob(".planner-write-probe*"))


def test_cli_calibrate_still_makes_the_profile_directory(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check does not refuse a path whose directories do not exist yet
    (~/.cache/planner on a fresh machine): save() makes them."""
    from planner.passes.device_profile import BUILTIN_PROFILES

    monkeypatch.setattr("planner.runtime.calibrate.calibrate", lambda **_: BUILTIN_PROFILES["cpu"])
    target = tmp_path / "new" / "dirs" / "profile.json"
    monkeypatch.setenv("PLANNER_PROFILE", str(target))
    assert main(["calibrate", "--quick"]) == 0
    assert target.is_file() and f"saved to {target}" in capsys.readouterr().out


def test_cli_calibrate_refuses_a_missing_disk_dir_before_measuring(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--disk-dir that does not exist failed after the memory and compute
    measurements as "[Errno 2] No such file or directory: '.../planner-calibrate-...'"."""
    monkeypatch.setattr(
        "planner.runtime.calibrate.calibrate", lambda **_: pytest.fail("measured first")
    )
    out = str(tmp_path / "p.json")
    missing = tmp_path / "no" / "dir"
    with pytest.raises(SystemExit, match=r"^error: --disk-dir .*no/dir does not exist"):
        main(["calibrate", "--quick", "--out", out, "--disk-dir", str(missing)])
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --disk-dir .*/f is not a directory"):
        main(["calibrate", "--quick", "--out", out, "--disk-dir", str(tmp_path / "f")])


def test_cli_calibrate_measures_the_disk_dir_it_checked(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--disk-dir=~/dir (a shell expands no "~" after "=") was checked expanded,
    then measured as given: a literal "~" directory, which failed after the
    memory and compute measurements."""

    class Measured(Exception):
        pass

    def calibrate(**kwargs: object) -> None:
        raise Measured(kwargs["disk_dir"])

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("planner.runtime.calibrate.calibrate", calibrate)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(Measured) as measured:
        main(["calibrate", "--quick", "--out", str(tmp_path / "p.json"), "--disk-dir=~/scratch"])
    assert measured.value.args[0] == str(tmp_path / "scratch")


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("abc", "cannot read budget 'abc'"),
        ("0", "budget must be positive"),
        ("0%", "must be a positive percentage"),
        ("50MB/s", "cannot read budget"),
        ("0.5", "less than one byte"),
    ],
)
def test_cli_a_malformed_budget_is_refused_before_the_model_is_loaded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, budget: str, message: str
) -> None:
    """It was read only after the factory ran and the model was traced (seconds
    for the MLP, minutes for a large model), then refused."""
    monkeypatch.setattr("planner.cli.load_factory", lambda _: pytest.fail("loaded first"))
    code = main(["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", budget])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("budget", ["min", "150%", "1e3", "512KiB", " 50 % "])
def test_cli_a_well_formed_budget_goes_on_to_the_model(
    monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    class Loaded(Exception):
        pass

    def loaded(_):  # type: ignore[no-untyped-def]
        raise Loaded

    monkeypatch.setattr("planner.cli.load_factory", loaded)
    with pytest.raises(Loaded):
        main(["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", budget])


def test_cli_a_trace_failure_is_not_preceded_by_torch_s_traceback(tmp_path) -> None:
    """An op the example inputs do not fit (a shape mismatch) printed torch's
    20-line "failed while attempting to run meta for aten.mm.default" traceback,
    each line prefixed "E1208 ... fake_tensor.py:3090]", before the planner's
    error that says the same with the user's source line (-v keeps it)."""
    body = "import torch\ndef make():\n    return torch.nn.Linear(4, 4), (torch.randn(2, 5),)\n"
    spec = f"{_factory_file(tmp_path, body)}:make"
    proc = subprocess.run(
        [sys.executable, "-m", "planner.cli", "report", spec, "--profile", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: planner could not trace Linear"), proc.stderr[:300]
    assert "fake_tensor.py" not in proc.stderr and len(proc.stderr.splitlines()) <= 4


def test_cli_a_factory_that_is_not_a_function_or_a_file_that_is_a_directory(tmp_path) -> None:
    """``make = 3`` read "has no function 'make'; it has make"; a directory
    given as FILE.py read "no such file" though it exists."""
    path = _factory_file(tmp_path, "make = 3\n")
    with pytest.raises(SystemExit, match=r"'make' in .*factory\.py' is an int, not a function"):
        main(["report", f"{path}:make"])
    with pytest.raises(SystemExit, match=r"is a directory: give the Python file"):
        main(["report", f"{tmp_path}:make"])


def test_cli_calibrate_cuda_without_cuda_is_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``planner calibrate --device cuda`` where CUDA is not available ended in a
    Python traceback (calibrate's RuntimeError, which main did not catch)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        code = main(["calibrate", "--device", "cuda", "--out", str(tmp_path / "p.json")])
    except SystemExit as exc:  # said before measuring
        code, err = 1, str(exc)
    else:
        err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "CUDA is not available" in err, err
    assert "--device cpu" in err and not (tmp_path / "p.json").exists()


def test_cli_text_fits_the_terminal_it_is_printed_to(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table was 140 columns wherever it was printed: on a 100-column terminal
    every row wrapped onto a second line. A terminal's width is used (piped or
    redirected, the text stays 140 wide)."""
    import shutil

    spec = f"{EXAMPLES}/mlp.py:make_mlp"
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((100, 40)))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["report", spec, "--mode", "train", "--profile", "cpu"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 100
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert main(["report", spec, "--mode", "train", "--profile", "cpu"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(len(line) for line in table) > 100  # the MLP's training table: 128 wide


def test_cli_shows_the_planner_s_own_warnings_without_verbose(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without -v every Python warning was hidden, the planner's own with the
    libraries': a model left in training mode planned for inference drew dropout
    in its plan, and nothing said so. Shown in a line each; the factory's own (and
    libraries') stay hidden; the caller's warning filters are as they were."""
    import warnings

    body = (
        "import warnings\nimport torch\n"
        "def make():\n"
        "    warnings.warn('a warning of the factory itself')\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.1))\n"
        "    return m, (torch.randn(8, 64),)\n"
    )
    spec = f"{_factory_file(tmp_path, body)}:make"
    filters, shown = list(warnings.filters), warnings.showwarning
    assert main(["report", spec, "--budget", "90%", "--profile", "cpu"]) == 0
    assert warnings.filters == filters and warnings.showwarning is shown
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "training mode" in line]
    assert line.startswith("warning: Sequential is in training mode"), err
    assert "factory itself" not in err


def test_cli_output_read_in_part_ends_quietly(tmp_path) -> None:
    """``planner report ... --json | head -c 10``: the reader closing the pipe early
    printed "error: [Errno 32] Broken pipe" (and Python's own complaint at exit)."""
    import fcntl

    body = (
        "import torch\ndef make():\n"
        "    layers = [torch.nn.Linear(16, 16) for _ in range(40)]\n"
        "    return torch.nn.Sequential(*layers), (torch.randn(4, 16),)\n"
    )
    spec = f"{_factory_file(tmp_path, body)}:make"
    command = [sys.executable, "-m", "planner.cli", "report", spec, "--json", "--profile", "cpu"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, bufsize=0
    )
    assert proc.stdout is not None and proc.stderr is not None
    fcntl.fcntl(proc.stdout, 1031, 4096)  # F_SETPIPE_SZ: the report outgrows the pipe
    assert proc.stdout.read(10).startswith(b"{")
    proc.stdout.close()  # as head does after its bytes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


@pytest.mark.parametrize("limit", ["-5", "nan"])
def test_cli_a_negative_time_limit_is_refused_before_the_model_is_loaded(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """It was refused after the model was built and traced, in the API's words
    ("time_limit=20.0")."""
    monkeypatch.setattr("planner.cli.load_factory", lambda _: pytest.fail("loaded first"))
    argv = ["report", f"{EXAMPLES}/mlp.py:make_mlp", "--budget", "50%", "--time-limit", limit]
    with pytest.raises(SystemExit, match=r"^error: --time-limit .* give a number >= 0"):
        main(argv)


def test_cli_leaves_torch_s_logger_level_as_it_was(tmp_path) -> None:
    """Without -v the CLI quiets torch's fake-tensor logger while it runs; main()
    called in a process that goes on (a test, a notebook) left it at CRITICAL."""
    import logging

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    before = logger.level
    path = _factory_file(tmp_path, "make = 3\n")
    with pytest.raises(SystemExit):  # refused inside the command, before any model
        main(["report", f"{path}:make"])
    assert logger.level == before
