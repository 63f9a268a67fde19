"""Inputs that hold infinities when planned (a -inf mask buffer, an example
input) are never quantized, nor what is made from them up to a softmax."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner
from planner.ir.meta import NONFINITE_SOURCES
from planner.passes.nonfinite import may_hold_nonfinite
from planner.solver import from_program

_T = 32


class _MaskedAttention(nn.Module):
    """A causal mask kept as a buffer of 0 / -inf (as hand-written transformers
    register it) and an unused plain tensor attribute with a NaN, beside finite
    weights and a finite buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.ModuleList([nn.Linear(64, 192) for _ in range(3)])
        self.register_buffer("mask", torch.full((_T, _T), float("-inf")).triu(1))
        self.register_buffer("finite", torch.ones(_T))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.qkv:
            q, k, v = layer(x).chunk(3, -1)
            scores = q @ k.transpose(-1, -2) / 8 + self.mask + bias
            x = x + scores.softmax(-1) @ v * self.finite[:, None]
        return x


def _inputs(bias_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    bias = torch.zeros(_T, _T)
    bias[0, -1] = bias_value
    return torch.randn(4, _T, 64), bias


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_the_state_and_inputs_holding_infinities_are_named(mode: str) -> None:
    analysis = planner.analyze(_MaskedAttention(), _inputs(float("-inf")), mode=mode, profile="cpu")
    held = analysis.program.meta[NONFINITE_SOURCES]
    assert held == {"mask", "input[0][1]"}, held
    finite = planner.analyze(_MaskedAttention(), _inputs(0.0), mode=mode, profile="cpu")
    assert finite.program.meta[NONFINITE_SOURCES] == {"mask"}


def test_what_reads_an_infinite_buffer_is_never_quantized_the_softmax_after_it_may_be() -> None:
    analysis = planner.analyze(_MaskedAttention(), _inputs(0.0), mode="infer", profile="cpu")
    program = analysis.program
    nonfinite = may_hold_nonfinite(program)
    mask = next(v for v in program.inputs if program.values[v].source == "mask")
    assert program.values[mask].storage in nonfinite
    for op in program.ops:
        if "softmax" in op.target:
            assert not {program.values[v].storage for v in op.outputs} & nonfinite
    problem = from_program(program, 10**9, analysis.profile, quantize="int8")
    by_name = {t.name: t for t in problem.tensors}
    assert not by_name["mask"].quantizable
    assert by_name["qkv.0.weight"].quantizable, "nothing quantizable: the test proves nothing"


def test_an_int8_plan_of_a_model_with_a_minus_infinity_mask_buffer_stays_finite() -> None:
    """At 60% the solver chose to store the mask buffer int8 (its cheapest saving):
    the output was NaN, with "error nan" beside the mask in the report."""
    model = _MaskedAttention()
    inputs = _inputs(0.0)
    with torch.no_grad():
        expected = model(*inputs)
    pm = planner.plan(model, "60%", inputs, quantize="int8", profile="cpu", time_limit=5)
    assert pm.report.planned_peak_bytes < pm.report.unplanned_peak_bytes
    assert all(row["tensor"] != "mask" for row in pm.report.quantized), pm.report
    out = pm(*inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.1)


def test_half_precision_weights_whose_sum_passes_the_float16_range_are_finite() -> None:
    """Summed in float16, a finite 512 x 512 weight's sum passed 65,504 and the
    weight, and what was made from it, were taken for infinite."""
    model = nn.Linear(512, 512, bias=False).half()
    with torch.no_grad():
        model.weight.uniform_(0, 0.5)
    assert not torch.isfinite(model.weight.sum()), "the float16 sum fits: proves nothing"
    analysis = planner.analyze(model, (torch.randn(4, 512).half(),), profile="cpu")
    assert analysis.program.meta[NONFINITE_SOURCES] == frozenset()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_state_is_read_in_float32(dtype: torch.dtype) -> None:
    """float8 has no sum of its own: capture failed on a float8 buffer with a raw
    NotImplementedError. Summed in float32, finite float8 weights are finite."""

    class Float8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.randn(64, 64).to(dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.to(torch.float32).t()

    model, x = Float8Linear(), torch.randn(8, 64)
    analysis = planner.analyze(model, (x,), profile="cpu")
    assert analysis.program.meta[NONFINITE_SOURCES] == frozenset()


def test_a_mapped_checkpoint_is_not_read_at_capture(tmp_path) -> None:
    """The weights of a model mapped to its checkpoint are not read: that read the
    whole file at capture, which a model larger than memory is mapped to avoid.
    Seen here by a NaN in the file going unnamed (the price: such a weight could
    be quantized)."""
    from safetensors.torch import save_file

    weights = nn.Linear(64, 64).state_dict()
    weights["weight"][3, 5] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with torch.device("meta"):
        model = nn.Linear(64, 64)
    planner.attach_checkpoint(model, str(path))
    analysis = planner.analyze(model, (torch.randn(2, 64),), profile="cpu")
    assert analysis.program.meta[NONFINITE_SOURCES] == frozenset()
    # the same weights held in memory are read
    model = nn.Linear(64, 64)
    model.load_state_dict(weights)
    analysis = planner.analyze(model, (torch.randn(2, 64),), profile="cpu")
    assert analysis.program.meta[NONFINITE_SOURCES] == frozenset({"weight"})
