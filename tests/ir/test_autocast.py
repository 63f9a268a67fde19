"""planner/ir/autocast.py: a plan traced under autocast runs its ops in the dtypes
the trace fixed (an op the model keeps out of autocast stays float32), bit for bit
as eager under the same autocast; calling it under another autocast state than it
was planned in is an error that says to plan inside that context."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError


class _KeepsOneOpInFloat32(nn.Module):
    """As HF models keep norms and rotary embeddings out of autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        with torch.autocast("cpu", enabled=False):
            return torch.mm(h.float(), self.b.weight.t().float())


def _model_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _KeepsOneOpInFloat32(), torch.randn(64, 32)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_planned_under_autocast_matches_eager_under_it(mode: str) -> None:
    model, x = _model_and_input()
    reference = copy.deepcopy(model)
    # AOTAutograd's graph run unplanned: its bfloat16 backward rounds differently
    # from eager's (gradients 0.2-0.4% of their largest apart), the plan's must not
    captured = copy.deepcopy(model)
    unplanned = torch.compile(captured, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
        expected_unplanned = unplanned(x)
        pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
        out = pm(x)
    # before: the executor's mm was cast again, to bfloat16 (3e-3 away from eager)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)
    if mode == "train":
        expected.pow(2).sum().backward()
        expected_unplanned.pow(2).sum().backward()
        out.pow(2).sum().backward()
        for p, c, r in zip(model.parameters(), captured.parameters(), reference.parameters()):
            assert (p.grad is None) == (c.grad is None) == (r.grad is None)
            if p.grad is not None:
                assert torch.equal(p.grad, c.grad)
                assert (p.grad - r.grad).abs().max() <= 0.01 * r.grad.abs().max()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_call_under_another_autocast_state_is_an_error(mode: str) -> None:
    model, x = _model_and_input()
    plain = planner.plan(copy.deepcopy(model), "100%", (x,), mode=mode, profile="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
        # before: ran, eager ops cast again by autocast, compiled ones not
        expected = r"under no autocast and is called under torch.autocast\('cpu', dtype=torch.bf"
        with pytest.raises(PlannerError, match=expected):
            plain(x)
        under(x)
    with pytest.raises(PlannerError, match=r"planned under torch.autocast\('cpu'.* no autocast"):
        under(x)  # before: bfloat16 outputs where eager gives float32
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(
            PlannerError, match=r"called under torch.autocast\('cpu', dtype=torch.float16"
        ):
            under(x)
    plain(x)


def test_a_backward_under_autocast_of_a_step_planned_without_it_is_an_error() -> None:
    """``out = pm(x)`` then ``loss.backward()`` inside ``torch.autocast``: eager runs
    the backward's matmuls in bfloat16 then, the planned backward ran them in
    float32, so its gradients silently differed from eager's (3e-6 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    eager = copy.deepcopy(model)
    x = torch.randn(16, 32)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    out = pm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager(x).pow(2).mean().backward()
        with pytest.raises(PlannerError, match=r"backward\(\) outside the autocast"):
            out.pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    eager.zero_grad()
    pm(x).pow(2).mean().backward()  # outside autocast: eager's, as before
    eager(x).pow(2).mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))
    # planned under autocast, a backward inside it is eager's too
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    eager = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
        pm(x).float().pow(2).mean().backward()
        eager(x).float().pow(2).mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))


def test_a_backward_under_another_devices_autocast_runs() -> None:
    """Autocast for another device type than the plan's (CUDA's, over a CPU plan's
    backward) leaves eager's backward ops as they were: it is not refused (it
    was, as "backward() through a planned step runs under torch.autocast('cuda'"),
    and the gradients are eager's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    eager = copy.deepcopy(model)
    x = torch.randn(16, 32)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    out, expected = pm(x), eager(x)
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)  # as torch.autocast("cuda") does, CPU-only
    try:
        out.pow(2).mean().backward()
        expected.pow(2).mean().backward()
    finally:
        torch.set_autocast_enabled("cuda", before)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))
