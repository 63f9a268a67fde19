"""A forward that updates a plain tensor attribute in place is refused, and
planning leaves the attribute as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner


class _CountsInAnAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.count = torch.zeros((), dtype=torch.int64)  # not register_buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return (self.fc(x) * self.count).pow(2).mean()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_attribute_updated_in_forward_is_refused_and_left_as_it_was(mode: str) -> None:
    """Training planned it, the trace's update advanced the model's counter and
    fixed it in the plan one ahead: loss 1.170 where eager's was 0.293, every
    gradient off, no error. Inference failed with torch's own RuntimeError."""
    model = _CountsInAnAttribute()
    with pytest.raises(planner.CaptureError, match=r"updates count in place.*register_buffer"):
        planner.plan(model, "100%", (torch.randn(4, 8),), mode=mode, profile="cpu", time_limit=5)
    assert model.count.item() == 0


@pytest.mark.filterwarnings("ignore:The tensor attribute self.last was assigned during export")
def test_an_attribute_only_read_or_replaced_is_planned() -> None:
    class ReadsAndReplaces(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.scale = torch.tensor(2.0)
            self.last = torch.zeros(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x) * self.scale
            self.last = y.detach()  # a new tensor, nothing written into the old one
            return y

    model = ReadsAndReplaces()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    pm = planner.plan(model, "100%", (x,), profile="cpu", time_limit=5)
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
