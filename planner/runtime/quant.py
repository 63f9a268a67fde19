"""Quantized storage: torch reference implementations (the Triton kernels of
``planner.codegen.kernels`` replace these on CUDA; both agree bit for bit).

int8: per-row absmax (rows = all but the last dim), symmetric, codes in [-127, 127].
int4: group-wise asymmetric over groups of 64 consecutive elements (FlexGen's
scheme): per group a min and a scale, codes in [0, 15], two per byte.

Scales and minimums are stored in float32, as they are computed. In float16
(FlexGen's choice, for float16 models) a scale under 6e-8 became 0 and one under
6e-5 kept a few bits: a training step's gradients (1e-6 and less per element) came
back as zeros or a few steps of a coarse grid, and the codes, computed with the
unrounded scale, no longer matched it.

Both work through the tensor a block of ``QUANT_BLOCK_ELEMS`` elements at a time,
so that beyond the result they allocate only a few block-sized temporaries
(``quantize_scratch_bytes``, which plans charge): a quantized copy must save
memory, not spike it. Blocking does not change any element's arithmetic.
"""

from __future__ import annotations

import copy
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from planner.ir.layout import dense_permutation
from planner.solver.problem import QUANT_BLOCK_ELEMS

GROUP = 64
#: fp32's smallest normal number. int4 flushes values below it (subnormals) to
#: zero before taking a group's minimum: a subnormal minimum is 0 in a GPU's
#: subtraction, which would code the group apart
FP32_TINY = torch.finfo(torch.float32).tiny
#: The smallest scale: twice fp32's smallest normal number. A larger floor (1e-12)
#: gave every row (int8) or group (int4) of values below it a coarse grid: at 1e-13
#: per element int8 came back 2% off and int4 2.7x off, outside its group's range.
#: Twice, not once: a subnormal value (or difference) over it is below half a
#: step, so its code is 0 here as on a GPU, whose Triton division flushes
#: subnormals to zero (over the smallest normal it could round to 1 here).
MIN_SCALE = 2 * FP32_TINY
#: The largest int8 scale: one fp32 step under ``FP32_MAX / 127``, which rounds
#: up, so that a row's ``127 * scale`` stays finite (a row [max, -max] came back
#: as +-inf). Any row below fp32's largest values keeps its scale.
MAX_INT8_SCALE = float(
    torch.nextafter(
        torch.tensor(torch.finfo(torch.float32).max / 127, dtype=torch.float32),
        torch.zeros(()),
    )
)


@dataclass
class Quantized:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: a weight's full-precision copy off the device (a map of its file in the
    #: offload directory), if it has one: a lookup (``aten.embedding``) gathers its
    #: rows from there, exactly, instead of dequantizing them. Not a stored part.
    exact_rows: torch.Tensor | None = None
    #: for a tensor that was not contiguous (channels-last, a transpose's base):
    #: the dim order of its memory layout. Its codes follow memory order (``shape``
    #: is the permuted shape) and ``restore`` permutes the values back, so they
    #: have the original strides, which compiled runs assert.
    order: tuple[int, ...] | None = None

    def parts(self) -> dict[str, torch.Tensor]:
        """Its tensors by name (``zero`` only for int4): what is stored or moved."""
        named = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        return {name: t for name, t in named.items() if t is not None}


def memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of ``x`` outermost first in memory, if ``x`` is a non-contiguous
    permutation of a dense layout (so ``x.permute(order)`` is contiguous); None
    for a contiguous tensor or any other layout."""
    if x.is_contiguous():
        return None
    order = dense_permutation(x)
    return None if order is None else tuple(order)


def restore(q: Quantized, values: torch.Tensor) -> torch.Tensor:
    """Dequantized ``values`` (of ``q.shape``) in the layout ``q`` was made from."""
    if q.order is None:
        return values
    return values.permute(tuple(q.order.index(d) for d in range(len(q.order))))


def quantize(x: torch.Tensor, fmt: str) -> Quantized:
    if fmt == "int8":
        return _quantize_int8(x)
    if fmt == "int4":
        return _quantize_int4(x)
    raise ValueError(f"unknown quantized format {fmt!r}: use 'int8' or 'int4'")


def dequantize(q: Quantized) -> torch.Tensor:
    if q.fmt == "int8":
        return _dequantize_int8(q)
    return _dequantize_int4(q)


def round_tripped(
    model: torch.nn.Module,
    names: AbstractSet[str],
    fmt: str,
    exact_lookups: AbstractSet[str] = frozenset(),
) -> torch.nn.Module:
    """A copy of ``model`` whose parameters ``names`` hold their ``fmt`` round trip:
    what a plan that stores those weights quantized computes with. The eager
    reference its results are compared to.

    ``exact_lookups``: those of ``names`` whose lookups read exact rows (the
    report's ``exact_lookups``). An ``nn.Embedding`` holding one keeps the exact
    weight and every other module holding it gets the round trip in a parameter of
    its own, as the plan computes: a tied head (GPT-2's) reads the codes while the
    embedding beside it reads exact rows. Untying is harmless here: a weight the
    plan stores quantized is frozen (or the run is inference)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in list(twin.named_parameters()):
            if name not in names:
                continue
            trip = dequantize(quantize(p, fmt))
            if name not in exact_lookups:
                p.copy_(trip)
                continue
            for module in twin.modules():
                for attr, held in list(module._parameters.items()):
                    if held is p and not isinstance(module, torch.nn.Embedding):
                        module._parameters[attr] = torch.nn.Parameter(trip, p.requires_grad)
    return twin


def _blocks(total: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, total)) for i in range(0, total, max(step, 1))]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, last dim), a view whenever the layout allows."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])


def _quantize_int8(x: torch.Tensor) -> Quantized:
    rows = _rows(x)
    n, c = rows.shape
    codes = torch.empty((n, c), dtype=torch.int8, device=x.device)
    scales = torch.empty((n, 1), dtype=torch.float32, device=x.device)
    row_step = max(1, QUANT_BLOCK_ELEMS // max(c, 1))
    col_step = min(c, QUANT_BLOCK_ELEMS) or 1
    for r0, r1 in _blocks(n, row_step):
        amax = torch.zeros((r1 - r0, 1), dtype=torch.float32, device=x.device)
        for c0, c1 in _blocks(c, col_step):  # a max is exact in any order
            amax = torch.maximum(amax, rows[r0:r1, c0:c1].abs().amax(dim=1, keepdim=True).float())
        scale = (amax / 127).clamp_(MIN_SCALE, MAX_INT8_SCALE)
        bad = ~torch.isfinite(amax)  # a NaN or an infinity in the row
        scale[bad] = torch.nan
        for c0, c1 in _blocks(c, col_step):
            block = torch.round(rows[r0:r1, c0:c1].float() / scale).clamp_(-127, 127)
            codes[r0:r1, c0:c1] = block.masked_fill_(bad, 0).to(torch.int8)
        scales[r0:r1] = scale
    return Quantized(codes, scales, None, "int8", tuple(x.shape), x.dtype)


def _dequantize_int8(q: Quantized) -> torch.Tensor:
    n, c = q.codes.shape
    out = torch.empty((n, c), dtype=q.dtype, device=q.codes.device)
    row_step = max(1, QUANT_BLOCK_ELEMS // max(c, 1))
    col_step = min(c, QUANT_BLOCK_ELEMS) or 1
    for r0, r1 in _blocks(n, row_step):
        scale = q.scale[r0:r1].float()
        for c0, c1 in _blocks(c, col_step):
            out[r0:r1, c0:c1] = (q.codes[r0:r1, c0:c1].float() * scale).to(q.dtype)
    return out.reshape(q.shape)


def _quantize_int4(x: torch.Tensor) -> Quantized:
    flat = x.reshape(-1)
    numel = flat.numel()
    groups = (numel + GROUP - 1) // GROUP
    packed = torch.empty(groups * GROUP // 2, dtype=torch.uint8, device=x.device)
    lows = torch.empty((groups, 1), dtype=torch.float32, device=x.device)
    scales = torch.empty((groups, 1), dtype=torch.float32, device=x.device)
    step = max(GROUP, QUANT_BLOCK_ELEMS // GROUP * GROUP)
    for e0, e1 in _blocks(numel, step):
        chunk = flat[e0:e1].float()
        pad = (-chunk.numel()) % GROUP
        g = torch.nn.functional.pad(chunk, (0, pad)).reshape(-1, GROUP)
        g = g.masked_fill(g.abs() < FP32_TINY, 0.0)  # subnormals flushed, as on a GPU
        lo = g.amin(dim=1, keepdim=True)
        hi = g.amax(dim=1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(MIN_SCALE)
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))  # a NaN or an infinity in the group
        scale[bad] = torch.nan
        lo = lo.masked_fill(bad, torch.nan)
        codes = torch.round((g - lo) / scale).clamp_(0, 15).masked_fill_(bad, 0)
        codes = codes.to(torch.uint8).reshape(-1)
        g0, g1 = e0 // GROUP, e0 // GROUP + g.shape[0]
        packed[g0 * GROUP // 2 : g1 * GROUP // 2] = codes[0::2] | (codes[1::2] << 4)
        lows[g0:g1] = lo
        scales[g0:g1] = scale
    return Quantized(packed, scales, lows, "int4", tuple(x.shape), x.dtype)


def _dequantize_int4(q: Quantized) -> torch.Tensor:
    numel = 1
    for d in q.shape:
        numel *= d
    out = torch.empty(numel, dtype=q.dtype, device=q.codes.device)
    step = max(GROUP, QUANT_BLOCK_ELEMS // GROUP * GROUP)
    assert q.zero is not None
    for e0, e1 in _blocks(numel, step):
        g0, g1 = e0 // GROUP, (e1 + GROUP - 1) // GROUP
        packed = q.codes[g0 * GROUP // 2 : g1 * GROUP // 2]
        codes = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1, GROUP).float()
        values = codes * q.scale[g0:g1].float() + q.zero[g0:g1].float()
        out[e0:e1] = values.reshape(-1)[: e1 - e0].to(q.dtype)
    return out.reshape(q.shape)
