"""planner.plan end to end for inference: every example at 100/75/50/30% of its
unplanned peak (or the smallest feasible budget, which must then be above the
requested one) runs bit-identical to eager while the independent meter stays
within the budget."""

from __future__ import annotations

import functools
import gc
import os

import pytest
import torch
from conftest import load_example
from torch import nn
from torch.utils import _pytree as pytree

import planner
from planner.runtime.copy_engine import completes_at_issue
from planner.runtime.meter import resident_bytes

FRACTIONS = [1.0, 0.75, 0.5, 0.3]


@functools.cache
def _peak(name: str) -> int:
    """The example's unplanned inference peak: the same at every fraction, so
    captured and analyzed once per example rather than once per test."""
    model, inputs = load_example(name)
    return planner.analyze(model, inputs, profile="cpu").unplanned_peak_bytes


def _plan_at(name: str, fraction: float, **kw):
    model, inputs = load_example(name)
    with torch.no_grad():
        expected = model(*inputs)
    budget = int(_peak(name) * fraction)
    try:
        pm = planner.plan(model, budget, inputs, profile="cpu", time_limit=5, **kw)
    except planner.BudgetTooSmall as exc:
        assert exc.min_budget is not None and exc.min_budget > budget
        budget = exc.min_budget
        model, inputs = load_example(name)
        pm = planner.plan(model, budget, inputs, profile="cpu", time_limit=5, **kw)
    return pm, inputs, expected, budget


def _same(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", ["mlp", "resnet", "unet", "gpt2", "llama"])
def test_examples_fit_and_match_eager(name: str, fraction: float) -> None:
    pm, inputs, expected, budget = _plan_at(name, fraction)
    try:
        out = pm.run_measured(*inputs)
        assert _same(out, expected), "planned outputs differ from eager"
        assert pm.measured.peak_bytes <= budget, (
            f"measured {pm.measured.peak_bytes} > budget {budget}"
        )
        assert pm.plan.predicted_peak_bytes <= budget
        if fraction < 1.0:
            assert any(t.decision != "keep" for t in pm.plan.tensors)
        out2 = pm(*inputs)  # a second call starts from the same state
        assert _same(out2, expected)
    finally:
        pm.close()


def test_model_output_pytree_is_preserved() -> None:
    pm, inputs, expected, _ = _plan_at("gpt2_full", 0.6)
    try:
        out = pm(*inputs)
        assert type(out) is type(expected)
        assert torch.equal(out.logits, expected.logits)
    finally:
        pm.close()


def test_generated_code_reads_as_a_schedule() -> None:
    pm, inputs, _, _ = _plan_at("gpt2", 0.5)
    try:
        code = pm.code
        assert code.startswith("def planned(rt, state, inputs")
        assert code.count("# step ") == len(pm.analysis.program.ops)
        # each read of a weight: a copy made at once where the engine makes it on
        # the calling thread (1 MiB or less on a CPU), else a prefetch then a wait
        reads = [t for t in pm.plan.tensors if t.home == "disk"]
        assert reads
        for t in reads:
            at_once = completes_at_issue(pm.device, t.nbytes)
            assert (f"rt.read_now({t.name!r}" in code) == at_once, t.name
            assert (f"rt.prefetch({t.name!r}" in code) != at_once, t.name
        assert code.count("rt.wait(") == code.count("rt.prefetch(")
        assert "del " in code
    finally:
        pm.close()


def test_offloaded_weights_leave_the_model_and_files_are_removed(tmp_path) -> None:
    model, inputs = load_example("mlp")
    with torch.no_grad():
        expected = model(*inputs)
    before = resident_bytes(model)
    pm = planner.plan(model, "55%", inputs, profile="cpu", time_limit=5, offload_dir=tmp_path)
    offloaded = [t for t in pm.plan.tensors if t.home == "disk"]
    assert offloaded, "a 55% budget must move weights to disk"
    assert resident_bytes(model) <= before - sum(t.nbytes for t in offloaded)
    assert resident_bytes(pm) + resident_bytes(model) < before
    root = pm.offload_dir
    assert root.parent == tmp_path and any(root.iterdir())
    # nothing writes them: large ones are read back as maps (inference on a CPU)
    assert pm._engine.mappable == {t.name for t in offloaded}
    assert torch.equal(pm(*inputs), expected)
    del pm
    gc.collect()
    assert not root.exists(), "offload directory left behind"
    assert os.listdir(tmp_path) == []


def test_wrong_input_shape_is_a_clear_error() -> None:
    pm, inputs, _, _ = _plan_at("mlp", 1.0)
    try:
        with pytest.raises(planner.PlannerError, match="planned for inputs"):
            pm(torch.randn(3, inputs[0].shape[1]))
    finally:
        pm.close()


def test_offload_dir_must_exist(tmp_path) -> None:
    model, inputs = load_example("mlp")
    with pytest.raises(planner.PlannerError, match="does not exist"):
        planner.plan(
            model, "80%", inputs, profile="cpu", time_limit=5, offload_dir=tmp_path / "missing"
        )


class _WideBatchNorm(nn.Module):
    """A BatchNorm over 1280 channels left in training mode, as a MobileNet's last
    one: each call updates running statistics of 5 KiB each, enough to move."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 1280, 1)
        self.bn = nn.BatchNorm2d(1280)
        self.head = nn.Linear(1280, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_buffers_a_call_updates_stay_on_the_device_in_inference() -> None:
    """At its smallest budget, the plan once gave the BatchNorm's running
    statistics a home on disk, where the call's update of them could not go
    (ValueError naming running_mean). Updated buffers now stay, and two calls
    update them exactly as two eager calls do."""
    x = torch.randn(4, 8, 4, 4)
    eager = _WideBatchNorm()
    with torch.no_grad():
        expected = [eager(x), eager(x)]
    model = _WideBatchNorm()
    with pytest.raises(planner.BudgetTooSmall) as too_small:
        planner.plan(model, 1, (x,), profile="cpu", time_limit=5)
    budget = too_small.value.min_budget
    pm = planner.plan(model, budget, (x,), profile="cpu", time_limit=5)
    try:
        stats = [t for t in pm.plan.tensors if t.kind == "buffer" and t.nbytes == 1280 * 4]
        assert len(stats) == 2 and all(t.home == "device" for t in stats)
        assert any(t.home != "device" for t in pm.plan.tensors if t.kind == "param")
        assert torch.equal(pm(x), expected[0]) and torch.equal(pm(x), expected[1])
        assert torch.equal(pm.state_tensor("bn.running_mean"), eager.bn.running_mean)
        assert torch.equal(pm.state_tensor("bn.running_var"), eager.bn.running_var)
    finally:
        pm.close()


class _ClippedWeights(nn.Module):
    """Weight clipping inside forward: the first layer's weight is written in place
    each call (as ``nn.Embedding(max_norm=...)`` renormalizes the rows it reads)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.mul_(0.9)
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_a_parameter_a_call_writes_stays_on_the_device_in_inference() -> None:
    """Homed on disk at its smallest budget, the written weight's update had
    nowhere to go (ValueError naming a.weight at the first call). It stays on the
    device now, like an updated buffer, and three calls match three eager calls."""
    x = torch.randn(8, 64)
    eager = _ClippedWeights()
    with torch.no_grad():
        expected = [eager(x) for _ in range(3)]
    model = _ClippedWeights()
    with pytest.raises(planner.BudgetTooSmall) as too_small:
        planner.plan(model, 1, (x,), profile="cpu", time_limit=5)
    pm = planner.plan(model, too_small.value.min_budget, (x,), profile="cpu", time_limit=5)
    try:
        homes = {t.name: t.home for t in pm.plan.tensors if t.kind == "param"}
        assert homes["a.weight"] == "device"
        assert any(home != "device" for home in homes.values()), "nothing moved"
        with torch.no_grad():
            assert all(torch.equal(pm(x), e) for e in expected)
        assert torch.equal(pm.state_tensor("a.weight"), eager.a.weight)
    finally:
        pm.close()
