"""What the generated executor calls: ``rt.prefetch``, ``rt.offload``, ``rt.wait``,
``rt.quantize``, ``rt.dequantize``. A thin layer over a copy engine, kept out of
the generated code so that code stays a readable list of steps."""

from __future__ import annotations

import torch

from planner.runtime.copy_engine import CopyEngine, Pending
from planner.runtime.quant import Quantized, dequantize, quantize


class Runtime:
    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine

    def prefetch(self, key: str, tier: str) -> Pending:
        return self.engine.prefetch(key, tier)

    def offload(self, key: str, tier: str, tensor: torch.Tensor) -> Pending:
        return self.engine.offload(key, tier, tensor)

    def wait(self, pending: Pending) -> torch.Tensor:
        return self.engine.wait(pending)

    def quantize(self, tensor: torch.Tensor, fmt: str) -> Quantized:
        """Triton kernels on CUDA, the torch reference elsewhere (they agree bit
        for bit on the codes; see tests/codegen/test_kernels.py)."""
        if tensor.is_cuda and _triton_ready(tensor.device):
            from planner.codegen import kernels

            return kernels.quantize_int8(tensor) if fmt == "int8" else kernels.quantize_int4(tensor)
        return quantize(tensor, fmt)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        if q.codes.is_cuda and _triton_ready(q.codes.device):
            from planner.codegen import kernels

            return kernels.dequantize_int8(q) if q.fmt == "int8" else kernels.dequantize_int4(q)
        return dequantize(q)


def _triton_ready(device: torch.device) -> bool:
    try:
        from planner.codegen.kernels import use_triton
    except ImportError:
        return False
    return use_triton(device)
