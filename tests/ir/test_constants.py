"""planner/ir/constants.py: tensors a model builds from Python values inside
``forward`` (DeBERTa's ``torch.tensor(scale)``) train under a plan; before, the
joint graph's ``get_attr`` of them failed code generation (KeyError
'_tensor_constant0'). An empty one (transformers' cache) too; a larger constant is a clear
error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner
from planner.errors import CaptureError
from planner.ir.build import build_program
from planner.ir.capture import capture


class _ScaledByConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(torch.tensor(16, dtype=torch.float32))  # DeBERTa's pattern
        shift = torch.tensor(0.1)
        keep = torch.tensor(3)  # an integer one
        return (self.lin(x) / scale + shift).sum() * keep


def test_a_larger_constant_is_a_clear_error() -> None:
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.lin(x) * torch.tensor([1.0, 2.0])).sum()

    with pytest.raises(CaptureError, match=r"shape \(2,\) .* inside forward.*register_buffer"):
        capture(Table(), (torch.randn(3, 2),), "train")


class _GrowsFromEmpty(nn.Module):
    """transformers' key/value cache starts each layer from ``torch.tensor([])``
    and concatenates onto it (GPT-2 builds one in a training forward unless called
    with ``use_cache=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = torch.tensor([])
        keys = torch.cat([cache, self.lin(x).flatten()])
        return keys.pow(2).sum()


@pytest.mark.parametrize(
    ("make", "target", "count"),
    [
        (_ScaledByConstants, "aten.full.default", 3),
        (_GrowsFromEmpty, "aten.empty_strided.default", 1),
    ],
)
def test_constants_become_ops_and_train_exactly(make: type, target: str, count: int) -> None:
    torch.manual_seed(0)
    model, x = make(), torch.randn(4, 16)
    program = build_program(capture(model, (x,), "train"))
    assert sum(op.target == target for op in program.ops) == count

    eager = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    loss, expected = pm(x), eager(x)
    assert torch.equal(loss, expected)
    loss.backward()
    expected.backward()
    assert torch.equal(model.lin.weight.grad, eager.lin.weight.grad)
