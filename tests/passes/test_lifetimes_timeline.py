"""Lifetimes and the memory timeline, checked against rules derivable by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_KINDS, TOY_SIZES, toy

from planner.ir import ValueKind, build_program, capture
from planner.passes import annotate_lifetimes, memory_timeline
from planner.passes.lifetimes import RESIDENT_KINDS


def _program(kind: str, size: int, mode: str):
    model, inputs = toy(kind, size)
    program = build_program(capture(model, inputs, mode))
    annotate_lifetimes(program)
    return program


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("kind", TOY_KINDS)
@pytest.mark.parametrize("size", TOY_SIZES)
def test_live_intervals_cover_every_use(kind: str, size: int, mode: str) -> None:
    program = _program(kind, size, mode)
    last = program.num_steps - 1
    returned = {program.values[v].storage for v in program.outputs}
    for storage in program.storages:
        start, end = storage.live
        base = program.values[storage.base]
        assert 0 <= start <= end <= last
        if base.kind in RESIDENT_KINDS:
            assert (start, end) == (0, last)
        for vi in storage.values:
            for use in program.values[vi].uses:
                assert start <= use <= end, f"{base.name} used at {use} outside {storage.live}"
        if storage.index in returned:
            assert end == last
        elif base.producer is not None:
            uses = [u for vi in storage.values for u in program.values[vi].uses]
            assert end == max(uses, default=start), "not freed at its last use"


def test_chain_timeline_by_hand() -> None:
    """A chain under inference: after the weights, at most an op's input and output
    (and the linear's own result feeding tanh) are alive, so the peak is weights +
    input + two activations."""
    model, (x,) = toy("chain", 3, batch=64)
    program = build_program(capture(model, (x,), "infer"))
    annotate_lifetimes(program)
    timeline = memory_timeline(program)
    weights = sum(p.numel() * 4 for p in model.parameters())
    act = x.numel() * 4  # every activation of the chain has the input's shape
    assert timeline.peak_bytes == weights + act + 2 * act
    assert len(timeline.resident_bytes) == program.num_steps


def test_timeline_counts_views_once() -> None:
    class Views(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            return y.view(-1).t().reshape(x.shape).sum(0)

    x = torch.randn(256, 256)
    program = build_program(capture(Views(), (x,), "infer"))
    annotate_lifetimes(program)
    timeline = memory_timeline(program)
    # x and y (its views add nothing) and a small sum
    assert timeline.peak_bytes <= 2 * x.numel() * 4 + 256 * 4


def test_train_kinds_and_tangent_lifetime() -> None:
    program = _program("residual", 2, "train")
    kinds = {program.storage_kind(s) for s in program.storages}
    assert {ValueKind.SAVED, ValueKind.GRAD, ValueKind.TANGENT, ValueKind.OUTPUT} <= kinds
    backward_start = program.backward_start()
    for storage in program.storages:
        if program.storage_kind(storage) is ValueKind.TANGENT:
            assert storage.live[0] == backward_start
        if program.storage_kind(storage) is ValueKind.SAVED:
            base = program.values[storage.base]
            assert program.ops[base.producer].phase.value == "forward"
            assert storage.live[1] >= backward_start


def test_timeline_requires_lifetimes() -> None:
    model, inputs = toy("chain", 1)
    program = build_program(capture(model, inputs, "infer"))
    with pytest.raises(ValueError, match="annotate_lifetimes"):
        memory_timeline(program)
