"""planner/ir/example_inputs.py: example inputs that are the model's own tensors,
or a (list, dict) pair read as (args, kwargs), are told so. Inputs written in
place that alias each other: tests/runtime/test_output_aliases.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner
from planner.errors import CaptureError
from planner.ir.capture import capture


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_example_input_that_is_a_parameter_of_the_model_is_a_clear_error(mode: str) -> None:
    """Planning ``nn.Linear`` on its own weight failed with ``KeyError: 'input[0][0]'``."""
    model = nn.Linear(8, 8)
    with pytest.raises(CaptureError, match=r"shares memory with the model's 'weight'"):
        planner.plan(model, "100%", (model.weight,), mode=mode, profile="cpu", time_limit=5)
    with pytest.raises(CaptureError, match=r"shares memory with the model's 'bias'"):
        planner.plan(
            model, "100%", ((torch.randn(2, 8), model.bias[:2]),), mode=mode, profile="cpu"
        )


def test_a_list_and_a_dict_read_as_args_and_kwargs_says_so() -> None:
    """``forward(self, xs, d)`` planned with ``(xs, d)``: the pair is read as
    ``(args, kwargs)`` and binding failed with only "missing a required argument"."""

    class ListAndDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, xs: list, d: dict) -> torch.Tensor:
            return self.lin(xs[0]) + d["m"]

    xs, d = [torch.randn(4, 8)], {"m": torch.randn(4, 8)}
    with pytest.raises(CaptureError, match=r"read as \(args, kwargs\).*\(\(xs, d\), \{\}\)"):
        capture(ListAndDict(), (xs, d), "infer")
    capture(ListAndDict(), ((xs, d), {}), "infer")
