"""Bad input to plan(), a call and the CLI (cases a sweep of the public surface
found): each is a planner error that says what to do, and a failed plan leaves the
model as it was given. docs/RELIABILITY.md lists them with what they were before."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import planner
from planner.errors import CaptureError, PlannerError


def _mlp(device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def _raw(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def _damaged_files(tmp_path) -> dict[str, str]:
    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_file(_mlp().state_dict(), str(good))
    entry = {"dtype": "F32", "shape": [64, 32], "data_offsets": [0, 8192]}
    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")  # MemoryError before
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    return {
        "a text file": str(huge),
        "a header that is a list": _raw(tmp_path / "list", b"[]"),  # AttributeError
        "an entry with no dtype": _raw(  # KeyError
            tmp_path / "nodtype",
            json.dumps({"0.weight": {"shape": [64, 32], "data_offsets": [0, 8192]}}).encode(),
        ),
        "offsets past the end": _raw(  # torch's "storage that is not resizable"
            tmp_path / "past", json.dumps({"0.weight": entry}).encode(), b"\0" * 64
        ),
        "a file cut short": str(cut),
    }


def test_a_damaged_or_foreign_checkpoint_is_a_planner_error_and_the_model_stays(tmp_path) -> None:
    x = torch.randn(8, 32)
    for what, path in _damaged_files(tmp_path).items():
        model = _mlp("meta")
        with pytest.raises(PlannerError, match="safetensors") as info:
            planner.plan(model, "60%", (x,), checkpoint=path, time_limit=1)
        assert "Save it again" in str(info.value) or "Pass a file saved" in str(info.value), what
        assert all(p.is_meta for p in model.parameters()), what


def test_a_failed_plan_with_a_checkpoint_leaves_the_model_on_the_meta_device(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "good.safetensors"
    save_file(_mlp().state_dict(), str(path))
    x = torch.randn(8, 32)
    for bad in ({"budget": "lots"}, {"budget": 100}, {"offload_dir": str(tmp_path / "nope")}):
        model = _mlp("meta")
        before = dict(model.named_parameters())
        with pytest.raises((PlannerError, ValueError)):
            options = dict(bad)
            budget = options.pop("budget", "60%")
            planner.plan(model, budget, (x,), checkpoint=str(path), time_limit=1, **options)
        after = dict(model.named_parameters())
        assert all(after[n] is p for n, p in before.items()), bad  # the same meta parameters
    model = _mlp("meta")  # and planning it again works
    pm = planner.plan(model, "100%", (x,), checkpoint=str(path), time_limit=1)
    pm.close()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_scripted_model_is_a_capture_error(mode) -> None:
    scripted = torch.jit.script(_mlp())
    with pytest.raises(CaptureError, match="TorchScript"):  # RuntimeError before
        planner.plan(scripted, "60%", (torch.randn(8, 32),), mode=mode, time_limit=1)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_sparse_inputs_are_told_to_be_dense(mode) -> None:
    x = torch.randn(8, 32)
    with pytest.raises(CaptureError, match="to_dense"):  # NotImplementedError before
        planner.plan(_mlp(), "100%", (x.to_sparse(),), mode=mode, time_limit=1)
    pm = planner.plan(_mlp(), "100%", (x,), mode=mode, time_limit=1)
    try:  # before: "has strides (0, 0) ... (here: args[0].contiguous())", which stays sparse
        with pytest.raises(PlannerError, match=r"args\[0\]\.to_dense\(\)"):
            pm(x.to_sparse())
        pm(x)
    finally:
        pm.close()


def test_cli_an_output_path_where_root_cannot_write_is_refused_before_planning(
    tmp_path, capsys
) -> None:
    """Permission bits do not stop root; /proc refuses new files whoever asks."""
    from planner.cli import main

    marker = tmp_path / "factory_ran"
    factory = tmp_path / "f.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n"
    )
    for flag, path in (("--save-plan", "/proc/p.json"), ("--plot", "/proc/p.png")):
        with pytest.raises(SystemExit) as info:
            main(["report", f"{factory}:make", "--budget", "100%", flag, path])
        # root: "cannot create a file in /proc (...)"; others: "... is not writable"
        assert str(info.value.code).startswith(f"error: {flag} {path}: "), info.value.code
        assert not marker.exists()  # said before the model is loaded
    assert main(["report", f"{factory}:make", "--budget", "100%", "--save-plan",
                 str(tmp_path / "p.json")]) == 0  # fmt: skip
    assert (tmp_path / "p.json").exists() and sorted(os.listdir(tmp_path)) == [
        "f.py", "factory_ran", "p.json"
    ]  # fmt: skip


def test_extra_example_inputs_on_another_device_say_so() -> None:
    x = torch.randn(8, 32)
    model = _mlp()
    with pytest.raises(PlannerError, match=r"extra_example_inputs\[0\] hold tensors on meta"):
        # before: "planner could not trace Sequential: FakeTensorDeviceMismatchError ...
        # Make forward() traceable by torch.export(strict=False)"
        planner.plan(model, "100%", (x,), extra_example_inputs=[(x[:4].to("meta"),)])
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("bad", [torch.randn(4, 31), torch.randn(4, 32, dtype=torch.float64)])
def test_extra_example_inputs_the_model_does_not_take_name_their_set(bad: torch.Tensor) -> None:
    """The first set captured, the second failed (a width, a dtype): the error
    said what failed, not that it was extra_example_inputs[1] that did."""
    x = torch.randn(8, 32)
    extra = [(x[:4],), (bad,)]
    with pytest.raises(
        CaptureError, match=r"^with extra_example_inputs\[1\]: .*(\[4, 31\]|float64)"
    ):
        planner.plan(_mlp(), "100%", (x,), extra_example_inputs=extra)


@pytest.mark.parametrize("bad", [("a",), (object(),)])
def test_extra_example_inputs_that_are_not_tensors_name_their_set(bad: tuple) -> None:
    """A set without a tensor (or holding an object) said "example_inputs contain
    no tensor", naming the set that was fine."""
    x = torch.randn(8, 32)
    with pytest.raises(PlannerError, match=r"^with extra_example_inputs\[1\]: example_inputs"):
        planner.plan(_mlp(), "100%", (x,), extra_example_inputs=[(x[:4],), bad])


def test_example_inputs_the_model_does_not_take_are_not_blamed_on_the_trace() -> None:
    """A batch of the wrong width fails in eager too; the only advice was to "make
    forward() traceable by torch.export(strict=False)"."""
    with pytest.raises(CaptureError, match="Check that the model runs on these example inputs"):
        planner.plan(_mlp(), "100%", (torch.randn(8, 31),))


@pytest.mark.parametrize(
    "bad",
    [
        {"budget": True},
        {"budget": 0},
        {"budget": float("nan")},
        {"budget": "0%"},
        {"budget": "lots"},
        {"mode": "training"},
        {"quantize": "int3"},
        {"kernels": "triton"},
        {"time_limit": -1},
        {"profile": "h101"},
        {"profile": 5},
        {"offload_dir": 5},
        {"checkpoint": 5},
        {"example_inputs": None},
        {"model": lambda x: x},
    ],
    ids=lambda bad: f"{next(iter(bad))}={next(iter(bad.values()))!r}",
)
def test_every_bad_argument_is_a_planner_error(bad) -> None:
    """`except planner.PlannerError` catches them all: budgets, modes, quantize=,
    kernels=, time_limit= and example inputs were plain ValueError and TypeError
    (still subclasses), and profile=5, offload_dir=5, checkpoint=5 os.fspath's
    bare TypeError."""
    options = dict(bad)
    model = options.pop("model", None) or _mlp()
    budget = options.pop("budget", "100%")
    example = options.pop("example_inputs", (torch.randn(8, 32),))
    options.setdefault("time_limit", 1)
    with pytest.raises(PlannerError) as info:
        planner.plan(model, budget, example, **options)
    assert isinstance(info.value, (ValueError, TypeError, planner.StoreError))  # as before


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_plan_failing_after_placing_the_weights_leaves_the_model_on_the_meta_device(
    tmp_path, monkeypatch, mode
) -> None:
    """A failure after the planned module placed the weights (a Ctrl-C there, or a
    late error): training had given the parameters their offload homes as data
    (param.data = ..., a map of a file then removed), inference had materialized
    the weights it keeps; neither was a view of the checkpoint any more, so neither
    was put back."""
    import planner.planned_module as planned_module

    torch.manual_seed(0)
    path = tmp_path / "good.safetensors"
    save_file(_mlp().state_dict(), str(path))
    x = torch.randn(8, 32)
    try:
        planner.plan(_mlp("meta"), "1%", (x,), mode=mode, checkpoint=str(path), time_limit=1)
        raise AssertionError("1% was expected to be below the smallest budget")
    except planner.BudgetTooSmall as exc:
        budget = exc.min_budget  # the smallest: weights homed off the device

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(planned_module, "HookWatch", interrupted)
    model = _mlp("meta")
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with pytest.raises(KeyboardInterrupt):
        planner.plan(model, budget, (x,), mode=mode, checkpoint=str(path), time_limit=1)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    moved = [n for n, t in before.items() if after[n] is not t or not after[n].is_meta]
    assert moved == []
