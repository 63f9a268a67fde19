"""The runtime's quantized storage: torch reference on the CPU, Triton on CUDA,
and the two agree."""

from __future__ import annotations

import pytest
import torch

from planner.runtime.quant import dequantize, quantize
from planner.runtime.runtime import Runtime


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_uses_the_reference(fmt: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(33, 130)
    rt = Runtime(engine=None)  # type: ignore[arg-type]
    q = rt.quantize(x, fmt)
    ref = quantize(x, fmt)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale)
    assert torch.equal(rt.dequantize(q), dequantize(ref))
    step = (x.abs().amax() / 127) if fmt == "int8" else (x.amax() - x.amin()) / 15
    assert (rt.dequantize(q) - x).abs().max() <= step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_triton_path_matches_the_reference(fmt: str) -> None:
    x = torch.randn(257, 1000, device="cuda")
    rt = Runtime(engine=None)  # type: ignore[arg-type]
    q = rt.quantize(x, fmt)
    ref = quantize(x.cpu(), fmt)
    assert torch.equal(q.codes.cpu(), ref.codes)
    assert torch.equal(rt.dequantize(q).cpu(), dequantize(ref))
