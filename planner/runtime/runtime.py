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
        return quantize(tensor, fmt)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        return dequantize(q)
