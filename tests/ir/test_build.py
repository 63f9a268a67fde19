"""planner/ir/build.py: ops that draw random numbers are marked as such, by ATen's
own tag, including ones whose names say nothing of randomness."""

from __future__ import annotations

import torch
from torch import nn

from planner.ir.build import build_program
from planner.ir.capture import capture


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc(x))
        noise = torch.empty_like(h).exponential_()  # no "rand" in its name
        return (h * noise).sum()


def test_random_ops_are_marked_by_their_tag() -> None:
    program = build_program(capture(_Noisy(), (torch.randn(4, 8),), "train"))
    marked = {op.target for op in program.ops if op.draws_random}
    assert marked == {"aten.native_dropout.default", "aten.exponential.default"}
    assert any(op.target == "aten.addmm.default" and not op.draws_random for op in program.ops)
