"""Saved plans: reused without solving, refused for another graph or budget."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import load_example, toy

import planner


def test_saved_plan_is_reused_and_checked(tmp_path, monkeypatch) -> None:
    model, inputs = load_example("mlp")
    with torch.no_grad():
        expected = model(*inputs)
    first = planner.plan(model, "60%", inputs, profile="cpu", time_limit=5)
    path = first.plan.save(tmp_path / "plan.json")
    budget = first.plan.budget_bytes
    first.close()

    import planner.api as api

    def no_solving(*args, **kwargs):
        raise AssertionError("a reused plan must not be solved again")

    monkeypatch.setattr(api, "solve", no_solving)
    model, inputs = load_example("mlp")
    again = planner.plan(model, budget, inputs, profile="cpu", plan=path)
    try:
        assert again.plan.actions == planner.Plan.load(path).actions
        assert torch.equal(again(*inputs), expected)
    finally:
        again.close()

    model, inputs = load_example("mlp")
    with pytest.raises(planner.PlannerError, match="made for a budget"):
        planner.plan(model, budget + 4096, inputs, profile="cpu", plan=path)
    other, other_inputs = toy("chain", 2)
    with pytest.raises(planner.PlannerError, match="different graph"):
        planner.plan(other, budget, other_inputs, profile="cpu", plan=path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(planner.PlannerError, match="cannot load plan"):
        planner.plan(model, budget, inputs, profile="cpu", plan=tmp_path / "bad.json")


def test_same_inputs_give_the_same_plan() -> None:
    plans = []
    for _ in range(2):
        model, inputs = load_example("unet")
        _, plan = planner.make_plan(model, "70%", inputs, mode="train", profile="cpu", time_limit=5)
        plans.append(plan)
    assert plans[0].actions == plans[1].actions
    assert [t.decision for t in plans[0].tensors] == [t.decision for t in plans[1].tensors]


def test_a_refused_plan_says_what_differs() -> None:
    """A plan for another graph was refused with one message for every cause
    ("model, dtypes, input shapes, mode or quantize setting differ"), a plan made
    for an H100's profile (its tensors go to the host tier) among them: the
    refusal names what differs, and what to pass instead."""
    model, inputs = toy("mlp", 2)
    _, saved = planner.make_plan(model, "80%", inputs, profile="cpu", time_limit=1)

    def refusal(model, inputs, plan=saved, **kwargs) -> str:
        with pytest.raises(planner.PlannerError, match="made for a different graph") as e:
            planner.make_plan(model, plan.budget_bytes, inputs, reuse=plan, **kwargs)
        return str(e.value)

    assert "made with mode='infer'" in refusal(model, inputs, mode="train", profile="cpu")
    assert "example inputs differ in size" in refusal(model, (inputs[0][:4],), profile="cpu")
    wide = refusal(copy.deepcopy(model).double(), (inputs[0].double(),), profile="cpu")
    assert "weights and buffers differ in size" in wide and "bytes here" in wide
    assert "weights and buffers differ:" in refusal(*toy("mlp", 3), profile="cpu")
    assert "quantize= setting (here 'int8'" in refusal(
        model, inputs, profile="cpu", quantize="int8"
    )
    _, trained = planner.make_plan(model, "80%", inputs, mode="train", profile="cpu", time_limit=1)
    frozen = copy.deepcopy(model)
    next(frozen.parameters()).requires_grad_(False)
    assert "which parameters require grad" in refusal(
        frozen, inputs, plan=trained, mode="train", profile="cpu"
    )
    tight = dataclasses.replace(saved, budget_bytes=saved.predicted_peak_bytes - 1)
    with pytest.raises(planner.PlannerError, match="does not replay.*plan again without plan="):
        planner.make_plan(model, tight.budget_bytes, inputs, profile="cpu", reuse=tight)
    _, h100 = planner.make_plan(model, "80%", inputs, profile="h100", time_limit=1)
    assert any(d.home == "host" for d in h100.tensors)  # the premise
    assert "host tier" in refusal(model, inputs, plan=h100, profile="cpu")


def test_a_refused_plan_of_several_shapes_is_named() -> None:
    """With extra_example_inputs, a saved plan given for the wrong shape (one
    shape's plan twice) was refused as if the example inputs were wrong: the
    refusal names the plan and its inputs."""
    model, (x,) = toy("mlp", 2)
    small = x[:4]
    pm = planner.plan(
        copy.deepcopy(model), "80%", (x,), profile="cpu", time_limit=1,
        extra_example_inputs=[(small,)],
    )  # fmt: skip
    saved = [pm.plan, pm.other_shapes[0].plan]
    pm.close()
    with pytest.raises(planner.PlannerError, match=r"plan\[1\] \(for extra_example_inputs\[0\]\)"):
        planner.plan(
            copy.deepcopy(model), "80%", (x,), profile="cpu",
            extra_example_inputs=[(small,)], plan=[saved[0], saved[0]],
        )  # fmt: skip
    again = planner.plan(
        model, "80%", (x,), profile="cpu", extra_example_inputs=[(small,)], plan=saved
    )
    try:
        assert torch.equal(again(small), toy("mlp", 2)[0](small))
    finally:
        again.close()


def test_a_plan_given_as_data_is_refused_before_tracing(monkeypatch) -> None:
    """plan= given a plan's to_dict() or its JSON text was traced, then refused as
    "cannot load plan" followed by the whole plan (kilobytes): refused before any
    work, saying what to pass."""
    import json

    import planner.api as api

    model, inputs = toy("mlp", 2)
    _, saved = planner.make_plan(model, "80%", inputs, profile="cpu", time_limit=1)

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before the saved plan was checked")

    monkeypatch.setattr(api, "capture", no_tracing)
    for given, says in (
        (saved.to_dict(), r"a dict .*Plan.from_dict"),
        (json.dumps(saved.to_dict()), r"JSON text, not a path"),
        (7, "got an object of type int"),
    ):
        with pytest.raises(planner.PlannerError, match=f"plan= takes a saved plan.*{says}") as e:
            planner.plan(model, saved.budget_bytes, inputs, profile="cpu", plan=given)
        assert len(str(e.value)) < 300
    with pytest.raises(planner.PlannerError, match="plan= takes a saved plan.*NoneType"):
        planner.plan(
            model, saved.budget_bytes, inputs, profile="cpu",
            extra_example_inputs=[(inputs[0][:4],)], plan=[saved, None],
        )  # fmt: skip


def test_a_reused_plan_takes_its_figures_from_its_replay(tmp_path) -> None:
    """A saved plan's peak and timelines came from the file, not the replay that
    checked it: an eager plan whose file's timeline read high was refused as
    "compiled runs" over the budget, and one reading low reported a planned peak
    it does not hold. The caller's Plan is left as given."""
    import json

    model, inputs = toy("mlp", 2)
    first = planner.plan(copy.deepcopy(model), "80%", inputs, profile="cpu", time_limit=1)
    true = first.plan
    data = json.loads(true.save(tmp_path / "plan.json").read_text())
    first.close()
    for name, scale in (("high", 3), ("low", 0)):
        edited = {**data, "predicted_peak_bytes": data["predicted_peak_bytes"] * scale}
        for key in ("timeline", "op_timeline", "between_ops_timeline"):
            edited[key] = [level * scale for level in data[key]]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(edited))
        pm = planner.plan(copy.deepcopy(model), true.budget_bytes, inputs, profile="cpu", plan=path)
        try:
            assert pm.plan.predicted_peak_bytes == true.predicted_peak_bytes
            assert pm.plan.op_timeline == true.op_timeline
            assert torch.equal(pm(*inputs), model(*inputs))
        finally:
            pm.close()
    given = planner.Plan.from_dict({**data, "predicted_peak_bytes": 0})
    pm = planner.plan(copy.deepcopy(model), true.budget_bytes, inputs, profile="cpu", plan=given)
    pm.close()
    assert given.predicted_peak_bytes == 0  # the caller's, unchanged


def test_a_refused_plan_of_other_dtypes_of_one_size_names_dtypes() -> None:
    """A float16 model's plan given to its bfloat16 copy (every tensor the same
    size) was refused as differing "over the same weights and inputs", naming
    quantize=, kernels= or the model's code: never the dtypes that differ."""
    model, inputs = toy("mlp", 2)
    half, x = copy.deepcopy(model).half(), inputs[0].half()
    _, saved = planner.make_plan(half, "80%", (x,), profile="cpu", time_limit=1)
    with pytest.raises(planner.PlannerError, match="made for a different graph") as e:
        planner.make_plan(
            half.bfloat16(), saved.budget_bytes, (x.bfloat16(),), profile="cpu", reuse=saved
        )
    assert "dtypes" in str(e.value) and "the same weights and inputs" not in str(e.value)
