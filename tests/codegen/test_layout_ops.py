"""Ops the executor runs into their traced layout (planner.codegen.layout_ops)."""

from __future__ import annotations

import pytest
import torch

import planner
from planner.codegen import layout_ops
from planner.runtime.meter import measure

aten = torch.ops.aten


def _span_bytes(t: torch.Tensor) -> int:
    """What the trace records for the ops' outputs: ``t``'s span from offset 0."""
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _base() -> torch.Tensor:
    return torch.randn(2, 16, 32)


CASES = {  # op -> (its first argument, a view of a larger tensor; the other arguments)
    aten.copy.default: (lambda b: b.select(1, 12), lambda: (torch.randn(2, 32),)),
    aten.select_scatter.default: (lambda b: b[:, :, 8:24], lambda: (torch.randn(2, 16), 1, 3)),
    aten.slice_scatter.default: (
        lambda b: b[:, :, 8:24],
        lambda: (torch.randn(2, 3, 16), 1, 2, 5),
    ),
    aten.diagonal_scatter.default: (
        lambda b: b[:, 4:12, 4:12],
        lambda: (torch.randn(2, 7), 1, 1, 2),
    ),
}


@pytest.mark.parametrize("op", list(CASES), ids=lambda op: op.__name__)
def test_the_ops_values_in_the_traced_span(op: torch._ops.OpOverload) -> None:
    make_self, make_args = CASES[op]
    self, args = make_self(_base()), make_args()
    assert self.untyped_storage().nbytes() > _span_bytes(self)  # ATen clones all of it
    out, measured = measure(lambda: layout_ops.AS_TRACED[op](self, *args))
    assert torch.equal(out, op(self, *args))
    assert out.stride() == self.stride() and out.storage_offset() == 0
    assert out.untyped_storage().nbytes() == _span_bytes(self)
    assert measured.peak_allocated_bytes == _span_bytes(self)


def test_overlapping_first_argument_left_to_aten() -> None:
    self = torch.randn(1, 32).expand(4, 32)  # ATen clones it compact
    src = torch.randn(4, 32)
    assert torch.equal(layout_ops.copy(self, src), aten.copy.default(self, src))


class RowWrites(torch.nn.Module):
    """Writes rows into a view of a buffer, one at a time (RWKV's time loop does
    so): functionalized, a ``copy`` into a row and a ``select_scatter`` into a
    view whose storage is larger than the view."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], x.shape[1], 32)
        half = out[:, :, :16]
        for i in range(x.shape[1]):
            half[:, i] = x[:, i] * self.w
        return out * 2


def test_row_writes_planned_to_their_smallest_budget_hold_it_by_the_meter() -> None:
    """Run by ATen's kernels the copies and scatters held the whole buffer each, 64
    bytes a step more than planned: this plan measured 22,784 bytes against its
    budget of 22,720."""
    torch.manual_seed(0)
    model, x = RowWrites(), torch.randn(2, 16, 16)
    with pytest.raises(planner.BudgetTooSmall) as info:
        planner.plan(model, 1, ((x,), {}), mode="train", profile="cpu", time_limit=5)
    budget = info.value.min_budget
    pm = planner.plan(model, budget, ((x,), {}), mode="train", profile="cpu", time_limit=5)
    pm.run_measured_step(x)
    assert pm.measured is not None
    assert pm.measured.peak_bytes <= budget
    model.w.grad = None  # the metered step's
    out = pm(x)
    assert torch.equal(out, model(x))
    out.sum().backward()
    planned_grad = model.w.grad.clone()
    model.w.grad = None
    model(x).sum().backward()
    assert torch.equal(planned_grad, model.w.grad)
