"""Triton kernels for quantized storage, bit-exact with `planner.runtime.quant`.

The torch functions in `planner.runtime.quant` are the reference; these kernels
replace them where Triton can run (`use_triton`) and must produce the same codes
and scales bit for bit:

* scales (and int4 minimums) are computed and stored in fp32, and codes are
  computed by dividing by that scale, exactly like the reference;
* divisions use `tl.math.div_rn` (IEEE round-to-nearest; plain `/` on fp32 may
  lower to an approximate division on GPUs);
* rounding is round-half-to-even like `torch.round`, implemented explicitly in
  `_rint` so that the GPU and the interpreter agree;
* fp32 -> bf16 casts are done by hand (round-to-nearest-even on the bits) because
  the Triton interpreter truncates instead of rounding;
* a row (int8) or group (int4) holding a NaN or an infinity gets a NaN scale
  (and minimum) and zero codes, so it comes back all NaN on both paths (a
  diverging step stays visible); Triton's max and min may skip a NaN;
* int4 dequantization is launched with `enable_fp_fusion=False` so that
  `code * scale + min` is not contracted into an FMA (the reference rounds twice).

The dequant-matmul kernels compute `a @ dequantize(q).T` for an nn.Linear weight
(out_features, in_features) without materializing the full-precision weight: each
program loads tiles of codes, dequantizes them in registers and feeds `tl.dot`.

The module must be imported after `TRITON_INTERPRET` is set when the kernels are
to run on the CPU: `triton.jit` picks the interpreter at decoration time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from planner.runtime.quant import (
    FP32_TINY,
    GROUP,
    MAX_INT8_SCALE,
    MIN_SCALE,
    Quantized,
    dequantize,
    quantize,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "dequant_matmul_int4",
    "dequant_matmul_int8",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "use_triton",
]

_BLOCK_ROWS = 16  # rows per program in the int8 quantizer
_BLOCK_ELEMS = 1024  # elements (int8) or bytes (int4) per program in the dequantizers
_BLOCK_GROUPS = 16  # int4 groups per program in the quantizer
_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on `device`.

    True on CUDA (compiled kernels), and on the CPU only when the Triton interpreter
    is enabled (`TRITON_INTERPRET=1`, which is slow and meant for tests); False
    everywhere when Triton is not installed, so callers fall back to the reference.
    """
    if not HAS_TRITON:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors' device."""
    if not HAS_TRITON:
        raise RuntimeError("planner.codegen.kernels needs Triton, which is not installed")
    for t in tensors:
        if not use_triton(t.device):
            raise RuntimeError(
                f"Triton kernels cannot run on device {t.device}: use a CUDA device, or set "
                "TRITON_INTERPRET=1 before importing triton to run them on the CPU"
            )


if HAS_TRITON:
    # the reference's floors, as constants a kernel may read
    _MIN_SCALE = tl.constexpr(MIN_SCALE)
    _FP32_TINY = tl.constexpr(FP32_TINY)
    _MAX_INT8_SCALE = tl.constexpr(MAX_INT8_SCALE)

    @triton.jit
    def _rint(v):
        """Round half to even (torch.round) on fp32; exact for every finite value."""
        f = tl.floor(v)
        d = v - f  # exact: f and v share the exponent range
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _cast(v, DST: tl.constexpr):
        """fp32 -> DST with round-to-nearest-even, bf16 rounded by hand (see module doc)."""
        if DST == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            # a NaN stays one (torch's 0x7FC0): the GPU's NaN, 0x7FFFFFFF, carried
            # into the sign bit above and came out -0.0
            bits = tl.where(v != v, (bits & 0) | 0x7FC0, rounded)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(DST)

    @triton.jit
    def _dot(a, w, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ w.T; UPCAST computes in fp32 (exact for bf16 products), for the
        interpreter, whose dot multiplies the raw bits of bf16 operands."""
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        return tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)

    @triton.jit
    def _not_finite(x):
        """1 where x is a NaN or an infinity, else 0 (int32): a row or group holding
        one comes back all NaN, as the reference's; Triton's max and min may skip a
        NaN where torch's propagate it."""
        return ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)

    @triton.jit
    def _quant_int8_kernel(
        x_ptr, codes_ptr, scale_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        base = rows.to(tl.int64)[:, None] * n_cols
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        bad = tl.zeros([BLOCK_M], dtype=tl.int32)  # a NaN or an infinity in the row
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = rmask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            bad = bad | tl.max(_not_finite(x), axis=1)
        scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, 127.0), _MIN_SCALE), _MAX_INT8_SCALE)
        scale = tl.where(bad != 0, float("nan"), scale)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = rmask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            c = _rint(tl.math.div_rn(x, scale[:, None]))
            c = tl.minimum(tl.maximum(c, -127.0), 127.0)
            c = tl.where(bad[:, None] != 0, 0.0, c)
            tl.store(codes_ptr + base + cols[None, :], c.to(tl.int8), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rmask)

    @triton.jit
    def _dequant_int8_kernel(codes_ptr, scale_ptr, out_ptr, numel, n_cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
        s = tl.load(scale_ptr + offs // n_cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _cast(c * s, out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_int4_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        numel,
        n_groups,
        BLOCK_G: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
    ):
        HALF: tl.constexpr = GROUP_SIZE // 2
        g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < n_groups
        j = tl.arange(0, HALF)
        even = g.to(tl.int64)[:, None] * GROUP_SIZE + 2 * j[None, :]
        odd = even + 1
        # other=0.0 reproduces the reference's zero padding of the last group
        xe = tl.load(x_ptr + even, mask=gmask[:, None] & (even < numel), other=0.0)
        xo = tl.load(x_ptr + odd, mask=gmask[:, None] & (odd < numel), other=0.0)
        xe = xe.to(tl.float32)
        xo = xo.to(tl.float32)
        # subnormals flushed to zero, as the reference does (a GPU's arithmetic would)
        xe = tl.where(tl.abs(xe) < _FP32_TINY, 0.0, xe)
        xo = tl.where(tl.abs(xo) < _FP32_TINY, 0.0, xo)
        lo = tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1))
        hi = tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1))
        scale = tl.maximum(tl.math.div_rn(hi - lo, 15.0), _MIN_SCALE)
        # a NaN or an infinity in the group
        bad = tl.max(_not_finite(xe), axis=1) | tl.max(_not_finite(xo), axis=1)
        scale = tl.where(bad != 0, float("nan"), scale)
        lo = tl.where(bad != 0, float("nan"), lo)
        ce = _rint(tl.math.div_rn(xe - lo[:, None], scale[:, None]))
        co = _rint(tl.math.div_rn(xo - lo[:, None], scale[:, None]))
        ce = tl.where(bad[:, None] != 0, 0.0, tl.minimum(tl.maximum(ce, 0.0), 15.0))
        co = tl.where(bad[:, None] != 0, 0.0, tl.minimum(tl.maximum(co, 0.0), 15.0))
        ce = ce.to(tl.uint8)
        co = co.to(tl.uint8)
        byte = g.to(tl.int64)[:, None] * HALF + j[None, :]
        tl.store(packed_ptr + byte, ce | (co << 4), mask=gmask[:, None])
        tl.store(scale_ptr + g, scale, mask=gmask)
        tl.store(zero_ptr + g, lo, mask=gmask)

    @triton.jit
    def _dequant_int4_kernel(
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        numel,
        n_bytes,
        BLOCK: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        bmask = b < n_bytes
        byte = tl.load(packed_ptr + b, mask=bmask, other=0)
        g = b // (GROUP_SIZE // 2)
        s = tl.load(scale_ptr + g, mask=bmask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=bmask, other=0.0).to(tl.float32)
        lo = (byte & 0xF).to(tl.float32) * s + z
        hi = (byte >> 4).to(tl.float32) * s + z
        dst = out_ptr.dtype.element_ty
        tl.store(out_ptr + 2 * b, _cast(lo, dst), mask=bmask & (2 * b < numel))
        tl.store(out_ptr + 2 * b + 1, _cast(hi, dst), mask=bmask & (2 * b + 1 < numel))

    @triton.jit
    def _dqmm_int8_kernel(
        a_ptr,
        codes_ptr,
        scale_ptr,
        out_ptr,
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        tiles_n = tl.cdiv(N, BLOCK_N)  # one program per tile, row-major (``_tile_grid``)
        rm = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_rows = rm.to(tl.int64)[:, None] * K
        w_rows = rn.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                a_ptr + a_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0
            )
            c = tl.load(
                codes_ptr + w_rows + kk[None, :],
                mask=(rn < N)[:, None] & (kk < K)[None, :],
                other=0,
            )
            # codes in [-127, 127] are exact in every float type; go through fp32
            # because the interpreter casts int -> bf16 wrongly
            w = c.to(tl.float32).to(a.dtype)
            acc = _dot(a, w, acc, PRECISION, UPCAST)
        # the scale is per output row, so it factors out of the reduction over K
        s = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(
            out, _cast(acc, out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :]
        )

    @triton.jit
    def _dqmm_int4_kernel(
        a_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        HALF: tl.constexpr = GROUP_SIZE // 2
        tiles_n = tl.cdiv(N, BLOCK_N)  # one program per tile, row-major (``_tile_grid``)
        rm = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF)
        mmask = (rm < M)[:, None]
        nmask = rn < N
        a_rows = rm.to(tl.int64)[:, None] * K
        groups_per_row = K // GROUP_SIZE
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for gk in range(0, groups_per_row):
            # K is a multiple of GROUP_SIZE, so a group never straddles two rows
            k_even = gk * GROUP_SIZE + 2 * j[None, :]
            a_even = tl.load(a_ptr + a_rows + k_even, mask=mmask, other=0.0)
            a_odd = tl.load(a_ptr + a_rows + k_even + 1, mask=mmask, other=0.0)
            g = rn.to(tl.int64) * groups_per_row + gk
            byte = tl.load(
                packed_ptr + g[:, None] * HALF + j[None, :], mask=nmask[:, None], other=0
            )
            s = tl.load(scale_ptr + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            w_even = _cast((byte & 0xF).to(tl.float32) * s + z, a_even.dtype)
            w_odd = _cast((byte >> 4).to(tl.float32) * s + z, a_even.dtype)
            acc = _dot(a_even, w_even, acc, PRECISION, UPCAST)
            acc = _dot(a_odd, w_odd, acc, PRECISION, UPCAST)
        out = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(out, _cast(acc, out_ptr.dtype.element_ty), mask=mmask & nmask[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device, not on
    the device of its arguments (a tensor on cuda:1 with cuda:0 current would be
    read from the wrong GPU). Nothing to do under the CPU interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def quantize_int8(x: torch.Tensor) -> Quantized:
    """Per-row absmax int8 quantization; same codes and scales as `quantize(x, "int8")`."""
    _require_triton(x)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    if rows.numel() == 0:
        return quantize(x, "int8")  # nothing to launch; keep the reference's behaviour
    rows = rows.contiguous()
    n_rows, n_cols = rows.shape
    codes = torch.empty((n_rows, n_cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    block_n = max(16, min(256, triton.next_power_of_2(n_cols)))
    with _on(x.device):
        _quant_int8_kernel[(_cdiv(n_rows, _BLOCK_ROWS),)](
            rows, codes, scale, n_rows, n_cols, BLOCK_M=_BLOCK_ROWS, BLOCK_N=block_n
        )
    return Quantized(codes, scale, None, "int8", tuple(x.shape), x.dtype)


def dequantize_int8(q: Quantized) -> torch.Tensor:
    """Inverse of `quantize_int8`; bit-exact with `dequantize(q)`."""
    _require_triton(q.codes)
    codes = q.codes.contiguous()
    out = torch.empty(codes.shape, dtype=q.dtype, device=codes.device)
    if codes.numel():
        with _on(codes.device):
            _dequant_int8_kernel[(_cdiv(codes.numel(), _BLOCK_ELEMS),)](
                codes, q.scale.contiguous(), out, codes.numel(), codes.shape[-1], BLOCK=_BLOCK_ELEMS
            )
    return out.reshape(q.shape)


def quantize_int4(x: torch.Tensor) -> Quantized:
    """Group-wise asymmetric int4 quantization; same bytes as `quantize(x, "int4")`."""
    _require_triton(x)
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    if numel == 0:
        return quantize(x, "int4")
    n_groups = _cdiv(numel, GROUP)
    packed = torch.empty(n_groups * GROUP // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty((n_groups, 1), dtype=torch.float32, device=x.device)
    zero = torch.empty((n_groups, 1), dtype=torch.float32, device=x.device)
    with _on(x.device):
        _quant_int4_kernel[(_cdiv(n_groups, _BLOCK_GROUPS),)](
            flat, packed, scale, zero, numel, n_groups, BLOCK_G=_BLOCK_GROUPS, GROUP_SIZE=GROUP
        )
    return Quantized(packed, scale, zero, "int4", tuple(x.shape), x.dtype)


def dequantize_int4(q: Quantized) -> torch.Tensor:
    """Inverse of `quantize_int4`; bit-exact with `dequantize(q)`."""
    _require_triton(q.codes)
    if q.zero is None:
        raise ValueError("int4 Quantized needs a zero (group minimum) tensor")
    numel = 1
    for d in q.shape:
        numel *= d
    out = torch.empty(numel, dtype=q.dtype, device=q.codes.device)
    n_bytes = q.codes.numel()
    if numel:
        args = (q.codes.contiguous(), q.scale.contiguous(), q.zero.contiguous(), out)
        with _on(out.device):
            _dequant_int4_kernel[(_cdiv(n_bytes, _BLOCK_ELEMS),)](
                *args, numel, n_bytes, BLOCK=_BLOCK_ELEMS, GROUP_SIZE=GROUP, enable_fp_fusion=False
            )
    return out.reshape(q.shape)


def _matmul_args(a: torch.Tensor, q: Quantized, fmt: str) -> tuple[torch.Tensor, int, int]:
    """Validate a dequant-matmul call; return a as a contiguous (M, K) matrix, N, K."""
    if q.fmt != fmt:
        raise ValueError(f"expected a {fmt} Quantized weight, got {q.fmt!r}")
    if len(q.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {q.shape}")
    n, k = q.shape
    if a.shape[-1] != k:
        raise ValueError(f"a has {a.shape[-1]} features, weight expects {k}")
    if a.dtype not in _MATMUL_DTYPES:
        raise TypeError(f"dequant matmul supports fp32/fp16/bf16 activations, got {a.dtype}")
    _require_triton(a, q.codes)
    return a.reshape(-1, k).contiguous(), n, k


def _dot_options(a: torch.Tensor) -> dict[str, object]:
    """tl.dot settings: IEEE fp32 (no TF32) to stay close to torch; bf16 upcast to fp32
    only under the interpreter (CPU), whose bf16 dot is wrong (see `_dot`). IEEE
    for 16-bit inputs too: the precision only changes fp32 inputs, and "tf32" is
    refused where the target has none (Triton's AMD backend before CDNA3)."""
    upcast = a.device.type == "cpu" and a.dtype == torch.bfloat16
    return {"PRECISION": "ieee", "UPCAST": upcast}


def _tile_grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int]:
    """One program per (block_m x block_n) output tile, all on the grid's first
    axis (up to 2**31 - 1 programs; the kernel splits its index into the tile's row
    and column). A (rows, columns) grid failed to launch on CUDA for a layer of
    more than 65,535 column tiles (2,097,120 output features), the limit of the
    second axis."""
    return (_cdiv(m, block_m) * _cdiv(n, block_n),)


def _matmul(
    kernel: Any, a: torch.Tensor, q: Quantized, operands: tuple[torch.Tensor, ...], **opts: Any
) -> torch.Tensor:
    """Launch a dequant-matmul kernel over (16 x 32) output tiles; result in `a.dtype`."""
    a2, n, k = _matmul_args(a, q, q.fmt)
    m = a2.shape[0]
    out = torch.zeros((m, n), dtype=a.dtype, device=a.device)
    if m and n and k:
        grid = _tile_grid(m, n, 16, 32)
        args = (a2, *(t.contiguous() for t in operands), out, m, n, k)
        with _on(a.device):
            kernel[grid](*args, BLOCK_M=16, BLOCK_N=32, **opts, **_dot_options(a))
    return out.reshape(*a.shape[:-1], n)


def dequant_matmul_int8(a: torch.Tensor, q: Quantized) -> torch.Tensor:
    """`a @ dequantize(q).T` for an int8 nn.Linear weight, in `a.dtype`.

    The codes are converted to `a.dtype` in registers and the per-row scale is
    applied to the fp32 accumulator, so the result can differ from the reference in
    the last bits of `a.dtype` (the reference rounds the weight to `q.dtype` first).
    fp32 activations use IEEE dot products (no TF32) to stay close to torch.
    """
    if q.fmt != "int8":
        raise ValueError(f"expected a int8 Quantized weight, got {q.fmt!r}")
    return _matmul(_dqmm_int8_kernel, a, q, (q.codes, q.scale), BLOCK_K=64)


def dequant_matmul_int4(a: torch.Tensor, q: Quantized) -> torch.Tensor:
    """`a @ dequantize(q).T` for an int4 nn.Linear weight, in `a.dtype`.

    When in_features is a multiple of the group size (64) every group lies inside
    one weight row and the kernel dequantizes each group in registers (without FMA
    contraction, so the weight values equal the reference's). Otherwise groups
    straddle rows and this falls back to the torch reference (full dequant then
    matmul), which materializes the weight.
    """
    _, _, k = _matmul_args(a, q, "int4")
    if k % GROUP or q.zero is None:
        return a @ dequantize(q).to(a.dtype).T
    operands = (q.codes, q.scale, q.zero)
    return _matmul(_dqmm_int4_kernel, a, q, operands, GROUP_SIZE=GROUP, enable_fp_fusion=False)
