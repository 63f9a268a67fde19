"""planner/ir/gradient_hooks.py: a gradient hook registered inside forward is
refused for training (the planned backward ran without it, silently), and
inference plans of the same model are unaffected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner
from planner.ir.gradient_hooks import gradient_hooks_recorded


class _ReversesGradient(nn.Module):
    """A gradient reversal layer written as a hook on an activation."""

    def __init__(self, on_parameter: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.on_parameter = on_parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.on_parameter:
            self.a.weight.register_post_accumulate_grad_hook(lambda p: None)
        elif h.requires_grad:
            h.register_hook(lambda g: g * -3)
        return self.b(torch.relu(h))


@pytest.mark.parametrize("on_parameter", [False, True], ids=["activation", "parameter"])
def test_a_gradient_hook_registered_in_forward_is_refused_for_training(on_parameter: bool) -> None:
    """Planned before, the reversal's layer got gradients 4.6 off eager's, silently."""
    torch.manual_seed(0)
    model = _ReversesGradient(on_parameter)
    with pytest.raises(
        planner.CaptureError, match=r"registers a gradient hook.*test_gradient_hooks"
    ):
        planner.plan(model, "100%", (torch.randn(4, 8),), mode="train", profile="cpu")


def test_an_inference_plan_of_a_model_hooking_gradients_is_unaffected() -> None:
    torch.manual_seed(0)
    model, x = _ReversesGradient(), torch.randn(4, 8)
    expected = model(x)
    pm = planner.plan(model, "100%", (x,), profile="cpu")
    assert torch.equal(pm(x), expected)


def test_torchs_own_hooks_and_the_methods_themselves_are_left_alone() -> None:
    """Only calls from outside torch are recorded, and the Tensor methods are put
    back after the block, also when it raises."""
    before = {
        n: torch.Tensor.__dict__[n] for n in ("register_hook", "register_post_accumulate_grad_hook")
    }
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"):
        with gradient_hooks_recorded() as where:
            x.register_hook(lambda g: g)
            raise RuntimeError("inside")
    assert len(where) == 1 and "test_gradient_hooks.py" in where[0]
    assert {n: torch.Tensor.__dict__[n] for n in before} == before


def test_a_hook_another_thread_registers_meanwhile_is_not_recorded() -> None:
    """The patch of ``Tensor.register_hook`` is process-wide: an eager loop in
    another thread registering hooks while a training plan captured had the plan
    refused at that thread's line."""
    import threading

    def elsewhere() -> None:
        t = torch.zeros(2, requires_grad=True)
        (t * 2).register_hook(lambda g: g)

    with gradient_hooks_recorded() as where:
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        h = torch.zeros(2, requires_grad=True) * 3
        h.register_hook(lambda g: g)
    assert len(where) == 1 and "test_gradient_hooks.py" in where[0]
