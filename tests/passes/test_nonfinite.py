"""Tensors that may hold infinities are never quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner.passes.nonfinite import may_hold_nonfinite
from planner.solver import from_program


class _Masked(nn.Module):
    """An additive causal mask of 0 / -inf, shared by two attention layers (as
    GPT-2's is), kept for their backward."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.ModuleList([nn.Linear(64, 192) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        mask = torch.zeros(n, n).masked_fill(causal, float("-inf")).expand(x.shape[0], n, n)
        for layer in self.qkv:
            q, k, v = layer(x).chunk(3, -1)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask.clone())
        return x.pow(2).mean()


def test_a_mask_of_minus_infinity_is_never_quantized_the_softmax_after_it_may_be() -> None:
    """Stored int8 between forward and backward, GPT-2's mask came back NaN
    (an infinite scale: -inf / inf), and every gradient below it with it."""
    analysis = planner.analyze(_Masked(), (torch.randn(8, 64, 64),), mode="train", profile="cpu")
    program = analysis.program
    nonfinite = may_hold_nonfinite(program)
    filled = [op for op in program.ops if op.takes_nonfinite]
    assert filled, "no op took -inf: the test proves nothing"
    for op in filled:
        assert {program.values[v].storage for v in op.outputs} <= nonfinite
    # training traces attention as ops: the masked scores may hold -inf, their
    # softmax (and all made from it) not
    softmax = [op for op in program.ops if "softmax" in op.target and "backward" not in op.target]
    assert softmax
    for op in softmax:
        assert not {program.values[v].storage for v in op.outputs} & nonfinite
        scores = {program.values[v].storage for v in op.inputs}
        assert scores <= nonfinite
    problem = from_program(program, 10**9, analysis.profile, quantize="int8")
    quantizable = {t.index for t in problem.tensors if t.quantizable}
    assert not quantizable & nonfinite
    assert quantizable, "nothing quantizable at all: the test proves nothing"
