"""Quantized storage: torch reference implementations (the Triton kernels of the
quantization work replace these on CUDA; both must agree).

int8: per-row absmax (rows = all but the last dim), symmetric, codes in [-127, 127].
int4: group-wise asymmetric over groups of 64 consecutive elements (FlexGen's
scheme): per group a min and a scale, codes in [0, 15], two per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 64


@dataclass
class Quantized:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def quantize(x: torch.Tensor, fmt: str) -> Quantized:
    if fmt == "int8":
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 127
        codes = torch.round(rows.float() / scale).clamp_(-127, 127).to(torch.int8)
        return Quantized(codes, scale.to(torch.float16), None, fmt, tuple(x.shape), x.dtype)
    if fmt == "int4":
        flat = x.reshape(-1).float()
        pad = (-flat.numel()) % GROUP
        groups = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, GROUP)
        lo = groups.amin(dim=1, keepdim=True)
        scale = ((groups.amax(dim=1, keepdim=True) - lo) / 15).clamp_min(1e-12)
        codes = torch.round((groups - lo) / scale).clamp_(0, 15).to(torch.uint8).reshape(-1)
        packed = codes[0::2] | (codes[1::2] << 4)
        return Quantized(
            packed, scale.to(torch.float16), lo.to(torch.float16), fmt, tuple(x.shape), x.dtype
        )
    raise ValueError(f"unknown quantized format {fmt!r}: use 'int8' or 'int4'")


def dequantize(q: Quantized) -> torch.Tensor:
    if q.fmt == "int8":
        out = q.codes.float() * q.scale.float()
        return out.to(q.dtype).reshape(q.shape)
    low = q.codes & 0xF
    high = q.codes >> 4
    codes = torch.stack((low, high), dim=1).reshape(-1, GROUP).float()
    values = codes * q.scale.float() + q.zero.float()  # type: ignore[union-attr]
    numel = 1
    for d in q.shape:
        numel *= d
    return values.reshape(-1)[:numel].to(q.dtype).reshape(q.shape)
