"""Training over several input shapes (``extra_example_inputs`` with mode="train"):
one module whose plans train the model's one set of parameters, e.g. a data set's
last, smaller batch beside the full ones."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import WithLoss, assert_same_adamw_steps, assert_step_within, load_example
from torch import nn

import planner


def _fresh(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model, inputs = load_example(name)
    return WithLoss(model), inputs


def _smaller_batch(inputs: tuple, rows: int) -> tuple:
    return tuple(x[:rows].clone() for x in inputs)


def _param_homes(pm: planner.PlannedModule) -> dict[str, str]:
    return {d.name: d.home for d in pm.plan.tensors if d.kind == "param"}


def _plan(model: nn.Module, budget: int, shapes: list[tuple]) -> planner.PlannedModule:
    return planner.plan(
        model, budget, shapes[0], mode="train", profile="cpu", time_limit=5,
        extra_example_inputs=shapes[1:],
    )  # fmt: skip


@functools.cache
def _budget(name: str, fraction: float) -> int:
    """``fraction`` of the example's unplanned training peak (the same for every
    test that asks: captured and analyzed once per example and fraction)."""
    model, inputs = _fresh(name)
    peak = planner.analyze(model, inputs, mode="train", profile="cpu").unplanned_peak_bytes
    return int(peak * fraction)


@pytest.mark.parametrize(("name", "fraction"), [("mlp", 0.3), ("resnet", 0.5)])
def test_full_and_last_batches_train_the_same_parameters_as_eager(
    name: str, fraction: float
) -> None:
    """An SGD loop over two epochs of [full batch, smaller last batch]: the planned
    module's losses, parameters and buffers (BatchNorm statistics) follow eager's,
    though each shape has its own plan; the MLP's parameters live in files and
    its gradients are delivered early (one .grad buffer whichever shape made it)."""
    eager, full = _fresh(name)
    model, _ = _fresh(name)
    small = _smaller_batch(full, full[0].shape[0] // 2)
    pm = _plan(model, _budget(name, fraction), [full, small])
    try:
        other = pm.other_shapes[0]
        assert _param_homes(pm) == _param_homes(other)
        if name == "mlp":
            assert "disk" in _param_homes(pm).values(), "nothing moved: the test proves nothing"
            assert any(a.kind == "deliver" for a in other.plan.actions)
        assert [id(p) for p in pm.parameters()] == [id(p) for p in model.parameters()]
        if name == "mlp":  # not cleared between shapes, gradients add up as eager's do
            for module in (pm, eager):
                module(*full).backward()
                module(*small).backward()
            for (key, p), q in zip(model.named_parameters(), eager.parameters()):
                assert torch.equal(p.grad, q.grad), key
            for p in [*model.parameters(), *eager.parameters()]:
                p.grad = None
        losses: dict[str, list[float]] = {"planned": [], "eager": []}
        for label, module in (("planned", pm), ("eager", eager)):
            opt = torch.optim.SGD(module.parameters(), lr=0.05)
            for _ in range(2):
                for batch in (full, small):
                    opt.zero_grad(set_to_none=True)
                    loss = module(*batch)
                    loss.backward()
                    opt.step()
                    losses[label].append(loss.item())
        torch.testing.assert_close(losses["planned"], losses["eager"])
        if name == "mlp":  # no BatchNorm: each shape's step is eager's bit for bit
            assert losses["planned"] == losses["eager"]
        for (key, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
            torch.testing.assert_close(a, b, msg=lambda m, key=key: f"{key}: {m}")
        # the checkpoint round trip loads the model's entries once, strictly
        pm.load_state_dict(copy.deepcopy(pm.state_dict()))
    finally:
        pm.close()


def test_each_shapes_step_holds_the_budget_by_the_meter_and_the_report_says_whose() -> None:
    """Each shape's step within the budget by the meter; the report puts a
    measurement beside the plan that ran it (shape 0's above, the others' in
    their lines), not beside shape 0's prediction whatever shape ran."""
    model, full = _fresh("mlp")
    small = _smaller_batch(full, 3)
    budget = _budget("mlp", 0.3)
    pm = _plan(model, budget, [full, small])
    try:
        pm.run_measured_step(*small)
        assert pm.measured is not None and pm.measured.peak_bytes <= budget
        assert pm.other_shapes[0].measured is pm.measured
        report = pm.report
        assert report.measured is None, "shape 1's step shown against shape 0's plan"
        (line,) = [s for s in report.other_shapes if s["shape"] == 1]
        assert line["inputs"] == [((3, 512), "float32")]
        assert line["measured_peak_bytes"] == pm.measured.peak_bytes
        assert "shape 1: (3, 512) float32: planned peak" in str(report)
        for p in model.parameters():
            p.grad = None
        pm.run_measured_step(*full)
        assert pm.measured.peak_bytes <= budget
        assert pm.report.measured["peak_bytes"] == pm.measured.peak_bytes
    finally:
        pm.close()


def test_a_second_training_plan_of_the_model_is_refused_by_the_first() -> None:
    """Planned one shape at a time, the second plan takes over the parameters the
    first homes in its store (their data now points at its own copy): the first
    module's next step is an error naming extra_example_inputs, where before it
    trained on stale values and its losses drifted from eager's."""
    model, full = _fresh("mlp")
    budget = _budget("mlp", 0.3)
    first = planner.plan(model, budget, full, mode="train", profile="cpu", time_limit=5)
    second = planner.plan(
        model, "100%", _smaller_batch(full, 3), mode="train", profile="cpu", time_limit=5
    )
    try:
        assert "disk" in _param_homes(first).values(), "nothing homed in a tier"
        second(*_smaller_batch(full, 3)).backward()
        with pytest.raises(planner.PlannerError, match="extra_example_inputs"):
            first(*full)
    finally:
        first.close()
        second.close()


def test_a_backward_after_another_shapes_spilling_forward_is_refused() -> None:
    """The shapes' activations spill into one store under the same names: the
    backward of a forward that another shape's forward has spilled over since
    would read the other's values, so it is an error, as within one shape."""
    model, full = _fresh("resnet")
    # nearly the full batch, so that both shapes spill at this budget (with half the
    # batch the smaller shape's plan may fit without spilling, as the solver chooses)
    small = _smaller_batch(full, full[0].shape[0] - 1)
    pm = _plan(model, _budget("resnet", 0.3), [full, small])
    try:
        assert pm._forward_spills and pm.other_shapes[0]._forward_spills, "nothing spills"
        first = pm(*full)
        pm(*small).backward()
        with pytest.raises(planner.PlannerError, match="another input shape"):
            first.backward()
    finally:
        pm.close()


def test_a_frozen_base_stored_int8_serves_both_shapes_once() -> None:
    """quantize= with several shapes: the frozen base is quantized once, each shape
    trains the adapters exactly as eager over the round-tripped base, and
    pm.parameters() lists each of the model's parameters once (one stand-in per
    frozen weight), so optimizer state indexes as over model.parameters()."""
    from test_frozen_quantized import QUANTIZE_OVER_DISK, _frozen_bytes, _lora, _quantized_homes

    from planner.runtime import quant

    model, x = _lora()
    small = x[:16].clone()
    budget = int(0.65 * _frozen_bytes(model))
    pm = planner.plan(
        model, budget, (x,), mode="train", quantize={"weights": "int8"},
        profile=QUANTIZE_OVER_DISK, time_limit=20, extra_example_inputs=[(small,)],
    )  # fmt: skip
    try:
        homes = _quantized_homes(pm)
        assert homes and homes == _quantized_homes(pm.other_shapes[0])
        assert [id(p) for p in pm.parameters()] == [id(p) for p in model.parameters()]
        reference = quant.round_tripped(_lora()[0], set(homes), "int8")
        assert_same_adamw_steps(pm, reference, [(x,), (small,), (x,)])
        assert_step_within(pm, (small,), budget)
    finally:
        pm.close()


def test_with_inductor_kernels_each_shapes_training_step_is_checked_by_the_meter() -> None:
    """kernels="inductor": each shape's compiled plan is checked by the meter on a
    step of its own inputs (effects undone) before the module is returned, and
    training through either shape follows eager within rounding."""
    eager, full = _fresh("mlp")
    model, _ = _fresh("mlp")
    small = _smaller_batch(full, 5)
    budget = _budget("mlp", 0.3)
    pm = planner.plan(
        model, budget, full, mode="train", profile="cpu", time_limit=5, kernels="inductor",
        extra_example_inputs=[small],
    )  # fmt: skip
    try:
        for module in (pm, pm.other_shapes[0]):
            assert module.measured is not None, "the meter's check did not run"
            assert module.measured.peak_bytes <= budget
        for batch in (full, small, full):
            for m in (model, eager):
                m.zero_grad(set_to_none=True)
            torch.testing.assert_close(pm(*batch), eager(*batch))
            pm(*batch).backward()
            eager(*batch).backward()
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        pm.close()
