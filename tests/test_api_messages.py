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
    for dotted in re.findall(r"\b(planner(?:\.\w+)+)\(", str(err.value)):
        obj = planner
        for part in dotted.split(".")[1:]:
            assert hasattr(obj, part), f"the message names {dotted}(), which does not exist"
            obj = getattr(obj, part)


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
