"""Planning for training from inside torch.no_grad() or torch.inference_mode()."""

from __future__ import annotations

import copy

import pytest
import torch

import planner
from planner.errors import PlannerError


def _model_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.randn(32, 64)


@pytest.mark.parametrize("caller_mode", [torch.no_grad, torch.inference_mode])
def test_training_planned_in_a_no_grad_block_trains_exactly(caller_mode) -> None:  # type: ignore[no-untyped-def]
    model, x = _model_and_input()
    eager = copy.deepcopy(model)
    with caller_mode():  # a set-up function under @torch.no_grad(), say
        analysis = planner.analyze(model, (x,), mode="train")
        assert analysis.program.num_forward_outputs < len(analysis.program.outputs)  # has grads
        pm = planner.plan(model, "100%", example_inputs=(x,), mode="train", time_limit=5)
    pm(x).sum().backward()
    eager(x).sum().backward()
    for planned, reference in zip(model.parameters(), eager.parameters()):
        assert planned.grad is not None
        assert torch.equal(planned.grad, reference.grad)
    assert torch.is_grad_enabled()  # the caller's modes are left as they were


def test_an_example_input_made_under_inference_mode_is_named() -> None:
    model, _ = _model_and_input()
    with torch.inference_mode():
        x = torch.randn(32, 64)
    with pytest.raises(PlannerError, match=r"example input 0 was made under torch.inference_mode"):
        planner.plan(model, "100%", example_inputs=(x,), mode="train", time_limit=5)
    with pytest.raises(PlannerError, match=r"weight, bias were made under"):
        with torch.inference_mode():
            built_here = torch.nn.Linear(64, 1)
        planner.plan(built_here, "100%", example_inputs=(x.clone(),), mode="train")


class _Offset(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        with torch.inference_mode():  # a table filled during an earlier evaluation
            self.register_buffer("offset", torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) + self.offset).relu()  # the add saves nothing for backward


def test_an_inference_buffer_the_backward_does_not_save_trains_as_in_eager() -> None:
    torch.manual_seed(0)
    model = _Offset()
    eager = copy.deepcopy(model)
    x = torch.randn(32, 64)
    pm = planner.plan(model, "100%", example_inputs=(x,), mode="train", time_limit=5)
    pm(x).sum().backward()
    eager(x).sum().backward()
    for planned, reference in zip(model.parameters(), eager.parameters()):
        assert torch.equal(planned.grad, reference.grad)
