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


@pytest.mark.parametrize("convert", ["float", "contiguous"])
def test_a_converted_copy_of_an_input_written_in_place_is_not_the_input(convert: str) -> None:
    """``h = x.float(); h /= 255`` writes a copy (``to`` may alias by its schema, but
    converting a uint8 tensor copies it): it was refused as a write into ``x``."""

    class Normalize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if convert == "float":
                h = x.float()
                h /= 255
            else:
                h = x.t().contiguous()
                h.mul_(2)
                h = h.t()
            return self.lin(h)

    image = torch.randint(0, 255, (4, 8), dtype=torch.uint8)
    x = image if convert == "float" else torch.randn(4, 8)
    capture(Normalize(), (x,), "infer")


def test_an_input_written_through_a_view_is_still_refused() -> None:
    class WritesView(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x.view(-1)
            v.add_(1)
            return x * 2

    with pytest.raises(CaptureError, match="writes in place into its input"):
        capture(WritesView(), (torch.randn(4, 8),), "infer")


def test_an_input_in_the_storage_of_a_buffer_but_apart_from_it_is_planned() -> None:
    """A buffer and the example input are slices of one arena that do not
    overlap: refused as "shares memory with the model's 'ref'"; eager and the
    plan agree."""
    arena = torch.randn(40, 8)

    class ReadsRef(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("ref", arena[:4])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.ref

    model = ReadsRef()
    x = arena[20:24]
    expected = model(x.clone())
    pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu", time_limit=5)
    assert torch.equal(pm(x), expected)
    with pytest.raises(CaptureError, match=r"shares memory with the model's 'ref'"):
        planner.plan(ReadsRef(), "100%", (arena[2:6],), mode="infer", profile="cpu")
