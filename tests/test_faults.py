"""Faults and bad inputs, end to end through planner.plan and PlannedModule: each
gives a clear error (or the documented fallback), leaves the caller's model and
weights as they were and no stray files, and the module runs again afterwards
where that makes sense. docs/RELIABILITY.md lists every case with its test."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import gc
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from forked import ran_in_a_forked_child
from torch import nn

import planner
from planner.runtime import copy_engine
from planner.runtime import store as store_module
from planner.runtime.store import StoreError
from planner.solver import validate

BUDGET = "90%"  # LongSkip at 90%: weights and the long-lived skip activation go to disk


class LongSkip(nn.Module):
    """A skip connection ``h`` across a widening block: the peak is inside the
    block, so a tight budget spills ``h`` to disk at run time (and streams weights)."""

    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        g = h
        for layer in self.layers:
            g = torch.tanh(layer(g))
        return self.down(torch.tanh(self.up(g))) + h


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def _model() -> tuple[nn.Module, tuple[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = LongSkip()
    inputs = (torch.randn(2048, 64),)
    with torch.no_grad():
        expected = model(*inputs)
    return model, inputs, expected


#: The CPU profile with copies modelled as free for the ops (as on a device with
#: copy engines), so plans keep several copies in flight: what these tests need to
#: stop a run in the middle of one.
OVERLAPPING = dataclasses.replace(planner.get_profile("cpu"), copy_compute_share=0.0)


def _plan(model: nn.Module, inputs: tuple, **kw) -> planner.PlannedModule:
    kw.setdefault("time_limit", 2)
    return planner.plan(model, kw.pop("budget", BUDGET), inputs, profile=OVERLAPPING, **kw)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter and buffer: the object in the model and a copy of its values."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return {name: (t, t.detach().clone()) for name, t in state.items()}


def _assert_untouched(model: nn.Module, snapshot: dict) -> None:
    now = dict(model.named_parameters())
    now.update(model.named_buffers())
    assert now.keys() == snapshot.keys()
    for name, (obj, values) in snapshot.items():
        assert now[name] is obj, f"{name} was replaced"
        assert obj.device.type == "cpu", f"{name} was released to {obj.device}"
        assert torch.equal(obj, values), f"{name} changed"


def _weight_files(pm: planner.PlannedModule) -> set[str]:
    """The files written at plan time (read off the plan): disk-home weights' and,
    in training, the .grad buffers of the gradients the plan delivers."""
    keys = {t.name for t in pm.plan.tensors if t.home == "disk"}
    keys |= {f"grad:{name}" for name, _ in pm._delivered_params}
    return {pm._disk.path(key).name for key in keys}


def _spills(pm: planner.PlannedModule) -> list[str]:
    """Activations the plan writes to disk while it runs."""
    return [t.name for t in pm.plan.tensors if t.home == "device" and t.decision == "offload:disk"]


def _failing_pwrite(err: int):
    """``os.pwrite`` for a transient copy (written over its open file in place):
    takes half of the data, then fails with ``OSError(err)`` (a disk filling up)."""
    real_pwrite = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:
        if offset == 0 and len(data) > 1:
            return real_pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(err, os.strerror(err))

    return pwrite


def _failing_fallocate(err: int):
    """``os.posix_fallocate`` failing with ``OSError(err)``: a transient copy's file
    is mapped, its blocks allocated first (no room left on the disk)."""

    def posix_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(err, os.strerror(err))

    return posix_fallocate


def _failing_open(err: int, calls: list[str] | None = None):
    """``open`` for the store module: a file opened for writing takes half of the
    data, then the write fails with ``OSError(err)`` (a disk filling up mid-file)."""
    real_open = builtins.open

    class Failing:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, data) -> int:
            self.f.write(bytes(data[: len(data) // 2]))
            self.f.flush()
            raise OSError(err, os.strerror(err))

    def fake(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        if calls is not None:
            calls.append(str(path))
        return Failing(f)

    return fake


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": "lots"}, ValueError, "cannot read budget 'lots': give bytes"),
        ({"budget": 0}, ValueError, "budget must be positive"),
        ({"budget": -5}, ValueError, "budget must be positive"),
        ({"budget": "-3%"}, ValueError, "budget"),
        ({"budget": 1}, planner.BudgetTooSmall, "Use a budget of at least"),
        ({"mode": "training"}, ValueError, "unknown mode 'training'"),
        ({"inputs": lambda x: ("not a tensor",)}, TypeError, "contain no tensor"),
        ({"inputs": lambda x: (x, object())}, TypeError, "found a object"),
        ({"inputs": lambda x: "not a tensor"}, TypeError, "example_inputs must be"),
        ({"model": DataDependent()}, planner.CaptureError, "x.sum"),
        ({"time_limit": -1.0}, ValueError, "time_limit must be"),
        ({"time_limit": math.nan}, ValueError, "time_limit must be"),
    ],
    ids=[
        "budget-malformed",
        "budget-zero",
        "budget-negative",
        "budget-negative-percent",
        "budget-impossible",
        "unknown-mode",
        "inputs-no-tensor",
        "inputs-not-a-pytree-of-tensors",
        "inputs-not-a-tuple",
        "untraceable-model",
        "time-limit-negative",
        "time-limit-nan",
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, kwargs, error, match) -> None:
    model, inputs, _ = _model()
    kwargs = dict(kwargs)
    model = kwargs.pop("model", model)
    inputs = kwargs.pop("inputs", lambda x: (x,))(inputs[0])
    if isinstance(model, DataDependent):
        inputs = (torch.randn(8),)
    before = _snapshot(model)
    (tmp_path / "mine.txt").write_text("the caller's")
    with pytest.raises(error, match=match) as info:
        _plan(model, inputs, offload_dir=tmp_path, **kwargs)
    assert os.listdir(tmp_path) == ["mine.txt"], "files left in offload_dir"
    _assert_untouched(model, before)
    if error is planner.BudgetTooSmall:
        smallest = info.value.min_budget
        assert smallest is not None and smallest > 1 and f"{smallest:,}" in str(info.value)
        pm = _plan(model, inputs, budget=smallest)  # the minimum it states does plan
        try:
            assert pm.plan.predicted_peak_bytes <= smallest
        finally:
            pm.close()


@pytest.mark.parametrize("failure", ["too small", "stale saved plan"])
def test_a_retry_inside_the_except_block_finds_the_weights_free(failure: str) -> None:
    """The documented retry, ``plan(model, e.min_budget)`` while the exception is
    alive (or a plan without a refused saved plan): its frames held the failed
    attempt's exported program, which references the weights, so the retry warned
    that every weight it moved off the device was still held outside the model,
    and their memory stayed in use."""
    import warnings

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(6)])

    x = torch.randn(64, 256)
    model = make()
    with torch.no_grad():
        expected = model(x)
    if failure == "too small":
        attempt = {"budget": 1000}
    else:  # made for another batch size: refused
        stale = planner.plan(make(), "40%", (torch.randn(32, 256),), profile="cpu", time_limit=5)
        attempt = {"budget": "40%", "plan": stale.plan}
        stale.close()
    with pytest.raises(planner.PlannerError) as info:
        planner.plan(model, example_inputs=(x,), profile="cpu", time_limit=5, **attempt)
    try:
        raise info.value
    except planner.PlannerError as e:
        budget = getattr(e, "min_budget", None) or "40%"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "still held outside the model" included
            pm = planner.plan(model, budget, (x,), profile="cpu", time_limit=5)
    assert any(t.decision != "keep" for t in pm.plan.tensors if t.name.endswith("weight"))
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
    pm.close()


def test_a_refused_plan_inside_the_callers_except_block_leaves_the_callers_frames() -> None:
    """Clearing every frame along the error's chain reached the exception the
    caller was handling, and wiped its locals (loggers, pdb post-mortem)."""
    model = nn.Sequential(nn.Linear(8, 8))

    def load(batch_id: int) -> None:
        raise ValueError(f"the caller's own, batch {batch_id}")

    try:
        load(1234)
    except ValueError as own:
        with pytest.raises(planner.PlannerError):
            planner.plan(model, 1, (torch.randn(2, 8),), profile="cpu", time_limit=5)
        assert own.__traceback__ is not None and own.__traceback__.tb_next is not None
        assert own.__traceback__.tb_next.tb_frame.f_locals.get("batch_id") == 1234


def test_offload_dir_that_cannot_be_written(tmp_path) -> None:
    """A directory the process cannot create files in: refused before any work,
    nothing created. Root ignores permission bits (os.access says yes), so as root
    the unwritable directory is /sys (a pseudo file system), else a path under a
    regular file."""
    model, inputs, _ = _model()
    before = _snapshot(model)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = Path(tempfile.mkdtemp(dir=locked))
    except OSError:
        unwritable, match = locked, "is not writable"
    else:  # root: permission bits do not stop it
        probe.rmdir()
        unwritable, match = locked, None
        try:
            Path(tempfile.mkdtemp(dir="/sys")).rmdir()
        except OSError:
            unwritable, match = Path("/sys"), "is not writable"
        else:
            (tmp_path / "file").write_text("x")
            unwritable, match = tmp_path / "file" / "sub", "not a directory"
    try:
        with pytest.raises(StoreError, match=match) as info:
            _plan(model, inputs, offload_dir=unwritable)
        assert str(unwritable) in str(info.value) and "offload_dir=None" in str(info.value)
        _assert_untouched(model, before)
        assert sorted(os.listdir(tmp_path)) in (["locked"], ["file", "locked"])
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


def test_a_profile_for_another_kind_of_device_is_a_clear_error(tmp_path, monkeypatch) -> None:
    """A GPU profile for CPU inputs is refused before any work (its plan would
    use a host tier this executor cannot make); the model is left as it was. With
    no profile given, a saved calibration for another kind of device gives way to
    the built-in for the inputs' device."""
    model, inputs, expected = _model()
    before = _snapshot(model)
    with pytest.raises(planner.PlannerError, match="'h100' is for a cuda device.*on cpu"):
        planner.plan(model, BUDGET, inputs, profile="h100", offload_dir=tmp_path)
    _assert_untouched(model, before)
    assert os.listdir(tmp_path) == []
    saved = tmp_path / "profile.json"
    planner.get_profile("h100").save(saved)
    monkeypatch.setenv("PLANNER_PROFILE", str(saved))
    pm = planner.plan(model, BUDGET, inputs, time_limit=2)
    try:
        assert pm.analysis.profile.device_type == "cpu"
        assert torch.equal(pm(*inputs), expected)
    finally:
        pm.close()


def test_example_inputs_on_the_meta_device_are_a_clear_error() -> None:
    """Before: a suggestion to calibrate a 'meta' profile, or a device mismatch
    inside the trace that told the user to make forward() traceable."""
    model, inputs, _ = _model()
    meta = tuple(x.to("meta") for x in inputs)
    for profile in ("cpu", None):
        with pytest.raises(planner.PlannerError, match="on the meta device.*real example inputs"):
            planner.plan(model, BUDGET, meta, profile=profile)


def test_input_with_another_dtype_or_shape_is_a_clear_error() -> None:
    model, inputs, expected = _model()
    pm = _plan(model, inputs)
    try:
        (x,) = inputs
        for bad in [(x.double(),), (x.to(torch.bfloat16),), (x[:5],)]:
            with pytest.raises(planner.PlannerError, match="shapes and dtypes: plan every shape"):
                pm(*bad)
        for bad in [(x, x), ()]:
            with pytest.raises(planner.PlannerError, match=r"planned as pm\(Tensor\)"):
                pm(*bad)
        assert torch.equal(pm(*inputs), expected)  # still usable
    finally:
        pm.close()


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_write_fails_while_planning(tmp_path, monkeypatch, err) -> None:
    model, inputs, expected = _model()
    before = _snapshot(model)
    (tmp_path / "mine.txt").write_text("the caller's")
    writes: list[str] = []
    monkeypatch.setattr(store_module, "open", _failing_open(err, writes), raising=False)
    with pytest.raises(StoreError) as info:
        _plan(model, inputs, offload_dir=tmp_path)
    assert writes, "the plan must write weights to disk for this test to mean anything"
    message = str(info.value)
    assert str(tmp_path) in message and "offload_dir=" in message
    assert ("disk is full" if err == errno.ENOSPC else "writable") in message
    assert os.listdir(tmp_path) == ["mine.txt"], "partial or stray offload files left"
    _assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(*inputs), expected)
    monkeypatch.undo()  # the disk has room again: planning the same model works
    pm = _plan(model, inputs, offload_dir=tmp_path)
    try:
        assert torch.equal(pm(*inputs), expected)
    finally:
        pm.close()
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_disk_write_fails_during_a_run(monkeypatch) -> None:
    model, inputs, expected = _model()
    pm = _plan(model, inputs)
    try:
        assert _spills(pm), "the plan must spill an activation to disk at run time"
        weights = _weight_files(pm)
        assert set(os.listdir(pm.offload_dir)) == weights
        # a spill's first write allocates its file's blocks (then maps it); one past
        # the open-file limit is written without a map
        for fails, failing in (
            ("posix_fallocate", _failing_fallocate(errno.ENOSPC)),
            ("pwrite", _failing_pwrite(errno.ENOSPC)),
        ):
            if fails == "pwrite":
                pm._disk.max_open_files = 0
            monkeypatch.setattr(store_module.os, fails, failing)
            with pytest.raises(StoreError, match="disk is full") as info:
                pm(*inputs)
            assert str(pm.offload_dir) in str(info.value)
            assert repr(_spills(pm)[0]) in str(info.value)
            assert set(os.listdir(pm.offload_dir)) == weights, "partial spill file left"
            monkeypatch.undo()
            for _ in range(2):
                assert torch.equal(pm(*inputs), expected)
            for key in _spills(pm):  # the next first write is the failing one
                pm._disk.discard(key)
    finally:
        pm.close()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=repr)
def test_exception_in_the_middle_of_a_run(monkeypatch, exc) -> None:
    model, inputs, expected = _model()
    # every copy through the copy threads, with a wait in the generated code (small
    # ones are otherwise made in place, at once), so that a slow read below is still
    # running when the run stops
    monkeypatch.setattr(copy_engine, "SYNC_MAX_BYTES", 0)
    pm = _plan(model, inputs)
    try:
        state = [t.clone() for t in pm._state]
        spilled = _spills(pm)
        assert spilled and set(os.listdir(pm.offload_dir)) == _weight_files(pm)

        lock = threading.Lock()
        started, finished, in_flight_at_raise = [], [], []
        read_into = pm._disk.read_into

        def slow_read(key, out):
            with lock:
                started.append(key)
            time.sleep(0.3)
            try:
                return read_into(key, out)
            finally:
                with lock:
                    finished.append(key)

        prefetch, wait = pm._runtime.prefetch, pm._runtime.wait
        reloads = []

        def recording_prefetch(key, tier):
            pending = prefetch(key, tier)
            if key == spilled[0]:
                reloads.append(pending)
            return pending

        def wait_then_fail(pending):
            if reloads and pending is reloads[0]:  # the spilled activation, late in the run
                with lock:
                    in_flight_at_raise.append(len(started) - len(finished))
                raise exc
            return wait(pending)

        monkeypatch.setattr(pm._disk, "read_into", slow_read)
        monkeypatch.setattr(pm._runtime, "prefetch", recording_prefetch)
        monkeypatch.setattr(pm._runtime, "wait", wait_then_fail)
        with pytest.raises(type(exc)) as info:
            pm(*inputs)
        assert info.value is exc  # propagated unchanged
        assert in_flight_at_raise and in_flight_at_raise[0] > 0, "no copy was pending"
        with lock:
            assert len(finished) == len(started), "copies still running after the error"
        assert set(os.listdir(pm.offload_dir)) == _weight_files(pm), "stray files"
        assert all(torch.equal(a, b) for a, b in zip(pm._state, state))
        monkeypatch.undo()
        assert torch.equal(pm(*inputs), expected)
    finally:
        pm.close()


def test_solver_time_limit_returns_the_best_plan_found() -> None:
    model, inputs, expected = _model()
    start = time.perf_counter()
    pm = _plan(model, inputs, time_limit=1e-3)
    assert time.perf_counter() - start < 30
    try:
        plan = pm.plan
        assert plan.solver.status in ("UNKNOWN", "FEASIBLE", "OPTIMAL")
        if plan.solver.status != "OPTIMAL":  # the search stopped: a baseline was kept
            assert "kept baseline" in plan.solver.name
        validate(pm.problem, plan)  # the independent replay accepts it
        assert plan.predicted_peak_bytes <= plan.budget_bytes
        report = pm.report
        assert report.to_dict()["solver"]["status"] == plan.solver.status
        assert plan.solver.status in str(report)
        out = pm.run_measured(*inputs)
        assert torch.equal(out, expected)
        assert pm.measured.peak_bytes <= plan.budget_bytes
    finally:
        pm.close()


def test_offload_files_deleted_or_corrupted_between_calls() -> None:
    model, inputs, expected = _model()
    pm = _plan(model, inputs)
    try:
        assert torch.equal(pm(*inputs), expected)  # every file verified once
        name = next(t.name for t in pm.plan.tensors if t.home == "disk")
        path = pm._disk.path(name)
        good = path.read_bytes()
        st = os.stat(path)

        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        path.write_bytes(bytes(bad))  # same size, and the old mtime put back
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(
            StoreError, match="corrupted .*load them into the model again.*plan it again"
        ):
            pm(*inputs)

        path.write_bytes(good[:100])
        with pytest.raises(StoreError, match="wrong size"):
            pm(*inputs)

        path.write_bytes(good)  # put back intact: checked again, and runs
        assert torch.equal(pm(*inputs), expected)

        path.unlink()
        with pytest.raises(StoreError, match="missing"):
            pm(*inputs)
        assert set(os.listdir(pm.offload_dir)) == _weight_files(pm) - {path.name}
    finally:
        pm.close()


def test_close_and_collection_remove_only_our_files(tmp_path) -> None:
    model, inputs, expected = _model()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.txt").write_text("the caller's")
    pm = _plan(model, inputs, offload_dir=tmp_path)
    root = pm.offload_dir
    assert root.parent == tmp_path and set(os.listdir(root)) == _weight_files(pm)
    assert torch.equal(pm(*inputs), expected)
    pm.close()
    pm.close()  # twice is fine
    assert not root.exists()
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(mine) == ["data.txt"]
    with pytest.raises(planner.PlannerError, match="closed"):
        pm(*inputs)

    model, inputs, _ = _model()
    pm = _plan(model, inputs)  # default: a fresh temporary directory
    root = pm.offload_dir
    assert Path(tempfile.gettempdir()) in root.parents and any(root.iterdir())
    del pm
    gc.collect()
    assert not root.exists()


def test_a_with_block_closes_the_module_however_it_ends(tmp_path) -> None:
    model, inputs, expected = _model()
    with _plan(model, inputs, offload_dir=tmp_path) as pm:
        root = pm.offload_dir
        assert any(root.iterdir()) and torch.equal(pm(*inputs), expected)
    assert not root.exists()
    with pytest.raises(planner.PlannerError, match="closed"):
        pm(*inputs)

    model, inputs, _ = _model()
    with pytest.raises(KeyError), _plan(model, inputs, offload_dir=tmp_path) as pm:
        root = pm.offload_dir
        raise KeyError("the caller's")
    assert not root.exists() and os.listdir(tmp_path) == []


# ---------------------------------------------------------------- training


def _train_plan():
    model, inputs, _ = _model()
    pm = _plan(model, inputs, budget="80%", mode="train")
    assert _spills(pm), "the training plan must spill forward activations to disk"
    return pm, model, inputs


def _eager_grads(*batches: torch.Tensor, weights=(1.0,)) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    eager = LongSkip()
    sum(w * eager(x).sum() for w, x in zip(weights, batches)).backward()
    return {n: p.grad for n, p in eager.named_parameters()}


def _assert_grads(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_training_second_forward_before_backward_is_an_error_not_wrong_gradients() -> None:
    pm, model, (x1,) = _train_plan()
    x2 = torch.randn_like(x1)
    try:
        o1, o2 = pm(x1), pm(x2)  # the second overwrites the first's spilled activations
        with pytest.raises(planner.PlannerError, match="overwritten them: call backward"):
            (o1.sum() + 2 * o2.sum()).backward()
        del o1, o2
        model.zero_grad(set_to_none=True)
        pm(x1).sum().backward()  # forward, backward, forward, backward: exact again
        pm(x2).sum().mul(2).backward()
        _assert_grads(model, _eager_grads(x1, x2, weights=(1.0, 2.0)))
    finally:
        pm.close()


def test_training_interrupted_in_the_backward(monkeypatch) -> None:
    pm, model, (x,) = _train_plan()
    try:
        loss = pm(x).sum()
        waits = []

        def interrupted(*args):
            waits.append(args)
            raise KeyboardInterrupt

        # a reload: waited for, or (a small copy) read at once
        monkeypatch.setattr(pm._runtime, "wait", interrupted)
        monkeypatch.setattr(pm._runtime, "read_now", interrupted)
        with pytest.raises(KeyboardInterrupt):
            loss.backward()
        assert waits, "the backward must reload a spill for this test to mean anything"
        assert set(os.listdir(pm.offload_dir)) == _weight_files(pm), (
            "spill files left after the interrupted step"
        )
        monkeypatch.undo()
        del loss
        model.zero_grad(set_to_none=True)
        pm(x).sum().backward()
        _assert_grads(model, _eager_grads(x))
    finally:
        pm.close()


class _Skip(nn.Module):
    """An activation made first and read last: at the smallest budget the plan
    spills it to disk in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.mid = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
        self.b = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        return self.b(self.mid(x)) + h


def test_threads_calling_one_plan_that_spills_get_their_own_outputs() -> None:
    """Two threads' runs of one plan used the same store slot for the spilled
    activation and overwrote each other's: 20 of 40 outputs wrong, silently.
    Calls now run one at a time."""
    torch.manual_seed(0)
    model = _Skip().eval()
    inputs = [torch.randn(1024, 256), torch.randn(1024, 256)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    try:
        pm = planner.plan(model, "10%", (inputs[0],), profile="cpu", time_limit=5)
    except planner.BudgetTooSmall as e:
        pm = planner.plan(model, e.min_budget, (inputs[0],), profile="cpu", time_limit=5)
    decisions = {t.name: t.decision for t in pm.plan.tensors}
    assert decisions["relu"].startswith("offload"), "nothing spilled: the test proves nothing"
    wrong: list[float] = []

    def calls(k: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                out = pm(inputs[k])
                if not torch.equal(out, expected[k]):
                    wrong.append((out - expected[k]).abs().max().item())

    threads = [threading.Thread(target=calls, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pm.close()
    assert wrong == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_collecting_the_module_leaves_the_parents_files() -> None:
    """A forked child's normal exit runs the module's finalizer: it removed the
    parent's offload files (and would stop a copy engine whose threads the child
    does not have), and the parent's next call found its weights gone."""
    torch.manual_seed(0)
    model = _Skip().eval()
    x = torch.randn(1024, 256)
    with torch.no_grad():
        expected = model(x)
    try:
        pm = planner.plan(model, "10%", (x,), profile="cpu", time_limit=5)
    except planner.BudgetTooSmall as e:
        pm = planner.plan(model, e.min_budget, (x,), profile="cpu", time_limit=5)
    files = sorted(os.listdir(pm.offload_dir))
    assert files, "nothing on disk: the test proves nothing"
    assert ran_in_a_forked_child(pm._finalizer)  # what the child's exit would run
    assert sorted(os.listdir(pm.offload_dir)) == files
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
    pm.close()
    assert not os.path.exists(pm.offload_dir)
