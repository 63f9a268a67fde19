"""An in-place copy_ into a buffer that broadcasts or converts its source is
refused; into a tensor made in forward it is planned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner


class _CopiesIntoItsBuffer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(64, 64)
        self.register_buffer("buf", torch.zeros(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "broadcast":
            self.buf.copy_(h[0])
        else:
            self.buf.copy_(h[:1].expand(64, 64).double())
        return (h.sum(0) + self.buf.sum(0)).pow(2).mean()


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("how", ["broadcast", "convert"])
def test_a_broadcasting_or_converting_copy_into_a_buffer_is_refused(how: str, mode: str) -> None:
    """torch's functionalization kept the source as the buffer's new value: the
    planned output read a row where eager read the matrix, wrong with no error."""
    with pytest.raises(planner.CaptureError, match=r"copies a .* in place at test_converting"):
        planner.plan(
            _CopiesIntoItsBuffer(how), "100%", (torch.randn(8, 64),), mode=mode, profile="cpu"
        )


def test_such_copies_into_a_tensor_made_in_forward_are_planned() -> None:
    class IntoLocals(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            row = torch.zeros(64, 64)
            row.copy_(h[0])
            wide = torch.zeros(8, 64, dtype=torch.float64)
            wide.copy_(h)
            return h.sum(0) + row.sum(0) + wide.sum(0)

    torch.manual_seed(0)
    model, x = IntoLocals().eval(), torch.randn(8, 64)
    with torch.no_grad():
        expected = model(x)
    pm = planner.plan(model, "100%", (x,), profile="cpu", time_limit=5)
    with torch.no_grad():
        assert torch.equal(pm(x), expected)


def test_converting_copies_into_views_of_a_buffer_are_planned() -> None:
    """A half-precision cache written by float32 keys, a row reset from a 0-dim
    value: these trace right (only whole-tensor copies lose their conversion), and
    were refused when every copy_ into a view of state was."""

    class WritesViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.register_buffer("cache", torch.zeros(4, 16, dtype=torch.bfloat16))
            self.register_buffer("acc", torch.zeros(3, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            self.cache[:, 2].copy_(h[:, 0])
            self.acc[0].copy_(h.sum())
            return h + self.cache.float().sum(1, keepdim=True) + self.acc.sum()

    torch.manual_seed(0)
    model, x = WritesViews().eval(), torch.randn(4, 16)
    reference = WritesViews().eval()
    reference.load_state_dict(model.state_dict())
    pm = planner.plan(model, "100%", (x,), profile="cpu", time_limit=5)
    with torch.no_grad():
        for k in (1.0, 2.0):
            assert torch.equal(pm(x * k), reference(x * k))
