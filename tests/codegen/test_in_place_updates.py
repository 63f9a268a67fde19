"""A buffer's update written into the buffer runs in place: the values of the
op's ``out=`` overload, without a temporary the buffer's size."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import planner
from planner.codegen.in_place_updates import WRITTEN_IN_PLACE
from planner.runtime.meter import measure

aten = torch.ops.aten
_INDEX = torch.tensor([1, 5, 5, 9])


def _cases() -> list[tuple[object, Callable[[torch.Tensor], tuple]]]:
    torch.manual_seed(0)
    rows = torch.randn(4, 256)
    return [
        (aten.index_put.default, lambda b: ((_INDEX,), rows, True)),
        # ``cache[:, pos] = v``: None first; Tensor.index_put_ refused it
        (aten.index_put.default, lambda b: ((None, torch.tensor([1, 5, 9, 12])), rows.t())),
        (aten.index_copy.default, lambda b: (0, torch.tensor([1, 5, 7, 9]), rows)),
        (aten.slice_scatter.default, lambda b: (rows, 0, 8, 12)),
        (aten.select_scatter.default, lambda b: (rows[0], 0, 3)),
        (aten.copy.default, lambda b: (rows[0],)),
    ]


@pytest.mark.parametrize("target, arguments", _cases(), ids=lambda c: str(c)[:30])
def test_writes_the_out_overloads_values_into_the_buffer_without_a_temporary(
    target: object, arguments: Callable[[torch.Tensor], tuple]
) -> None:
    """The ``out=`` overloads computed into a temporary the buffer's size and
    copied it over: a 2 MiB cache updated by ``cache[8:12] = h`` was metered 2 MiB
    over its budget."""
    torch.manual_seed(1)
    buffer = torch.randn(256, 256)
    expected = target(buffer.clone(), *arguments(buffer))  # type: ignore[operator]
    write = WRITTEN_IN_PLACE[target]
    out, measured = measure(lambda: write(buffer, *arguments(buffer), out=buffer), buffer)
    assert out is buffer
    assert torch.equal(buffer, expected)
    assert measured.peak_allocated_bytes < buffer.nbytes // 8, measured


class _SliceWrittenCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)
        self.register_buffer("cache", torch.zeros(4096, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.cache[8:12] = h
        return h + self.cache[:16].sum(0)


def test_a_cache_updated_by_slice_assignment_stays_within_its_budget() -> None:
    torch.manual_seed(0)
    model, x = _SliceWrittenCache().eval(), torch.randn(4, 128)
    reference = _SliceWrittenCache().eval()
    reference.load_state_dict(model.state_dict())
    pm = planner.plan(model, "50%", (x,), profile="cpu", time_limit=5)
    assert any(d.name == "cache" and d.home != "device" for d in pm.plan.tensors), (
        "the cache stays on the device: the test proves nothing"
    )

    def call() -> torch.Tensor:
        with torch.no_grad():
            return pm(x)

    out, measured = measure(call, pm, (x,))
    assert measured.peak_bytes <= pm.plan.budget_bytes, measured
    with torch.no_grad():
        assert torch.equal(out, reference(x))
    assert torch.equal(pm.state_tensor("cache"), reference.cache)
    pm.close()
