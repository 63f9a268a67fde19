"""A model's parameters and buffers reached by name: found, replaced, released,
and the checks that a released tensor is really freed."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch

from planner.errors import PlannerError
from planner.model_slots import (
    compact,
    find_slot,
    free_if_moved_still_held,
    materialize,
    release_slots,
    replace_slot,
    slot_tensor,
    warn_if_still_held,
)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_a_parameter_and_a_buffer_are_found_by_qualified_name() -> None:
    model = _model()
    assert slot_tensor(model, "0.weight") is model[0].weight
    assert slot_tensor(model, "1.running_mean") is model[1].running_mean
    assert find_slot(model, "0.missing") is None
    assert find_slot(model, "7.weight") is None  # no such submodule


def test_a_replaced_slot_holds_the_new_tensor_and_nothing_else_changes() -> None:
    model = _model()
    bias = model[0].bias
    new = torch.nn.Parameter(torch.ones(2))
    replace_slot(model, "0.weight", new)
    assert model[0].weight is new and model[0].bias is bias
    replace_slot(model, "0.nothing", new)  # not a slot: left alone
    assert not hasattr(model[0], "nothing")


def test_a_released_weight_keeps_shape_and_raises_when_read() -> None:
    model = _model()
    release_slots(model, ["0.weight"])
    weight = model[0].weight
    assert isinstance(weight, torch.nn.Parameter) and weight.shape == (2, 3)
    with pytest.raises(PlannerError, match="0.weight"):
        model(torch.ones(4, 3))


def test_a_tied_weight_is_released_under_every_name_it_has() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    original = weakref.ref(model[0].weight)
    release_slots(model, ["0.weight"])  # the trace's one name for it
    assert model[1].weight is model[0].weight  # one stand-in, still tied
    assert isinstance(model[1].weight, torch.nn.Parameter) and model[1].weight.is_meta
    assert original() is None  # the full copy is freed
    release_slots(model, ["0.weight", "1.weight"])  # both names given: still one
    assert model[1].weight is model[0].weight


def test_compact_copies_only_a_view_of_a_larger_storage() -> None:
    whole = torch.arange(12.0)
    assert compact(whole) is whole
    part = whole[2:5]
    copy = compact(part)
    assert torch.equal(copy, part)
    assert copy.untyped_storage().nbytes() == 3 * 4


def test_materialize_keeps_a_parameter_a_parameter() -> None:
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    copy = materialize(frozen)
    assert isinstance(copy, torch.nn.Parameter) and not copy.requires_grad
    assert copy.data_ptr() != frozen.data_ptr() and torch.equal(copy, frozen)
    assert not isinstance(materialize(torch.ones(2)), torch.nn.Parameter)


def test_a_full_copy_still_held_elsewhere_is_warned_about_by_name() -> None:
    held = torch.ones(3)
    freed = torch.ones(3)
    refs = {"kept": weakref.ref(held), "gone": weakref.ref(freed)}
    del freed
    with pytest.warns(UserWarning, match=r"kept") as caught:
        warn_if_still_held(refs)
    assert "gone" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_still_held({"gone": refs["gone"]})  # nothing held: no warning


def test_a_moved_buffer_still_held_is_emptied_and_a_weight_is_warned_about() -> None:
    cache = torch.ones(4)
    weight = torch.ones(4)
    moved = {"cache": weakref.ref(cache), "weight": weakref.ref(weight)}
    with pytest.warns(UserWarning, match="weight"):
        free_if_moved_still_held(moved, updated={"cache"})
    assert cache.numel() == 0  # every holder sees it emptied
    assert weight.numel() == 4
