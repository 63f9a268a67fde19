"""A saved plan's file, edited by hand: refused on loading, as a PlannerError
that names the field (a budget or an action's step written as a string, a home
as a number, failed later as a bare ValueError, TypeError or AttributeError)."""

from __future__ import annotations

import json

import pytest
from conftest import toy

import planner


def _edits():
    def set_field(name, value):
        return lambda d: d.update({name: value})

    def set_first(items, name, value):
        return lambda d: d[items][0].update({name: value})

    return [
        ("budget_bytes is 'abc'", set_field("budget_bytes", "abc")),
        ("budget_bytes is None", set_field("budget_bytes", None)),
        ("op_level_budget_bytes is 'x'", set_field("op_level_budget_bytes", "x")),
        (r"actions\[0\].step is '0'", set_first("actions", "step", "0")),
        (r"tensors\[0\].home is 5", set_first("tensors", "home", 5)),
        (r"missing fields \['actions'\]", lambda d: d.pop("actions")),
        (r"unknown fields \['foo'\]", set_field("foo", 1)),
    ]


@pytest.mark.parametrize("says, edit", _edits(), ids=[s for s, _ in _edits()])
def test_an_edited_plan_file_is_refused_naming_the_field(tmp_path, says, edit) -> None:
    model, inputs = toy("mlp", 2)
    _, plan = planner.make_plan(model, "80%", inputs, profile="cpu", time_limit=1)
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["actions"]  # the premise: an action to edit
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(planner.PlannerError, match=f"cannot load plan .*{says}"):
        planner.make_plan(model, plan.budget_bytes, inputs, profile="cpu", reuse=path)
    assert planner.Plan.load(tmp_path / "plan.json") == plan  # a saved one still loads
