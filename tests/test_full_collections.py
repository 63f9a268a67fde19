"""Full garbage collections wait while planning, and come back after."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import planner
from planner.full_collections import _DEFERRED, full_collections_deferred


@pytest.fixture(autouse=True)
def _thresholds_kept():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_deferred_inside_and_restored_after_even_on_error() -> None:
    gc.set_threshold(700, 10, 10)
    seen = []

    @full_collections_deferred
    def inner():
        seen.append(gc.get_threshold())

    @full_collections_deferred
    def outer(fail: bool):
        inner()
        seen.append(gc.get_threshold())  # the nested call's return ends nothing
        if fail:
            raise ValueError("boom")

    outer(False)
    assert seen == [(700, 10, _DEFERRED)] * 2
    assert gc.get_threshold() == (700, 10, 10)
    with pytest.raises(ValueError):
        outer(True)
    assert gc.get_threshold() == (700, 10, 10)


def test_thresholds_the_caller_sets_meanwhile_stand() -> None:
    gc.set_threshold(700, 10, 10)

    @full_collections_deferred
    def sets_its_own():
        gc.set_threshold(100, 5, 5)

    sets_its_own()
    assert gc.get_threshold() == (100, 5, 5)


def test_plan_defers_them_while_it_runs_the_model() -> None:
    gc.set_threshold(700, 10, 10)
    seen = []

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(gc.get_threshold()[2])
            return self.lin(x).relu()

    planner.plan(Recording(), "100%", example_inputs=(torch.randn(2, 8),))
    assert seen and set(seen) == {_DEFERRED}
    assert gc.get_threshold() == (700, 10, 10)
