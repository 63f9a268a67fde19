"""Messages of the public entry points name only things that exist."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import planner


def test_a_profile_for_another_device_names_a_calibration_that_exists() -> None:
    """The message told users to call planner.calibrate('cpu'), which does not
    exist (AttributeError)."""
    model = nn.Linear(8, 8)
    with pytest.raises(planner.PlannerError) as err:
        planner.plan(model, "50%", (torch.randn(2, 8),), profile="h100")
    message = str(err.value)
    # every dotted name it gives, called or not: the old loop matched only
    # ``planner.x(`` and so checked nothing once the message stopped calling one
    dotted_names = re.findall(r"\b(planner(?:\.\w+)+)", message)
    commands = re.findall(r"`planner (\w+)", message)
    assert dotted_names or commands, f"the message names no way to get a profile: {message}"
    for dotted in dotted_names:
        obj = planner
        for part in dotted.split(".")[1:]:
            assert hasattr(obj, part), f"the message names {dotted}, which does not exist"
            obj = getattr(obj, part)
    from planner.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert command in subcommands, f"the message names `planner {command}`: no such command"


@pytest.mark.parametrize("entry", [planner.plan, planner.analyze, planner.make_plan])
def test_a_wrong_keyword_names_the_function(entry) -> None:
    """A typo'd keyword (offload= for offload_dir=) said only "got an unexpected
    keyword argument", without the function, as Python itself says it."""
    budget = () if entry is planner.analyze else ("50%",)
    with pytest.raises(TypeError, match=rf"^{entry.__name__}\(\) got an unexpected keyword"):
        entry(nn.Linear(8, 8), *budget, (torch.randn(2, 8),), offload="x")


def test_every_error_the_reliability_doc_names_is_exported() -> None:
    for name in (
        "BudgetTooSmall",
        "CaptureError",
        "InvalidPlan",
        "StoreError",
        "LinkedFileChanged",
    ):
        assert issubclass(getattr(planner, name), planner.PlannerError)
