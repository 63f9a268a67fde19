"""Ops that read a weight stored quantized without materializing it in full.

A weight the plan stores quantized (``home == "device:int8"``) is dequantized
before each use, unless that use is one of the ops below, which take the
quantized weight directly and dequantize only a block of it at a time:

- ``aten.linear(x, W, b)``: W is (out, in); blocks of output rows of W;
- ``aten.mm(x, W)`` / ``aten.addmm(b, x, W)``: W is (in, out); blocks of columns;
- ``aten.embedding(W, ids)``: only the gathered rows are dequantized.

So the full-precision weight never exists: at most one block of it (``BLOCK``
columns or rows) plus the block's slice of the product. ``temp_bytes`` states
that bound; the solver charges it to the step and the validator replays it, so
the meter's peak and the plan's agree.

On CUDA with Triton, ``linear`` runs the fused dequant-matmul kernel of
``planner.codegen.kernels``; everything else (and the CPU) uses the blocked torch
code here. The result is lossy by design: it equals the op applied to the
dequantized weight up to floating-point reassociation.
"""

from __future__ import annotations

import torch

from planner.runtime.quant import GROUP, Quantized, dequantize, restore

#: Columns (mm/addmm) or rows (linear) of the weight dequantized at a time; a
#: multiple of the int4 group so a block never splits a group.
BLOCK = 64

#: The lookup: reads only the rows its ids select (see ``reads_exact_rows``).
LOOKUP = "aten.embedding.default"

#: Op target -> position of the weight among the op's positional arguments.
WEIGHT_POSITION = {
    "aten.linear.default": 1,
    "aten.mm.default": 1,
    "aten.addmm.default": 2,
    "aten.embedding.default": 0,
}


def fusable(target: str, weight_shape: tuple[int, ...], fmt: str) -> bool:
    """Whether op ``target`` can read a ``fmt`` weight of this shape quantized.
    int4 groups of 64 run along the last dim, so it must be a multiple of 64 for a
    row or a column block to hold whole groups."""
    if target not in WEIGHT_POSITION or len(weight_shape) != 2:
        return False
    return fmt == "int8" or weight_shape[1] % GROUP == 0


def temp_bytes(
    target: str, weight_shape: tuple[int, ...], rows: int, itemsize: int, fmt: str
) -> int:
    """Upper bound of the scratch bytes a fused call allocates beyond its output
    (``rows`` = the activation's rows, or the number of ids looked up): one block's
    codes unpacked and converted through fp32, its slice of the product, and the
    gathered scales. The op's own workspace, measured unfused, is charged besides."""
    r, c = weight_shape
    # an fp32 copy, a cast to the activation dtype, the int4 codes unpacked
    per_elem = 4 + (itemsize if itemsize != 4 else 0) + (2 if fmt == "int4" else 0)
    if target == "aten.embedding.default":
        return rows * c * per_elem + rows * (c // GROUP + 1) * 8 + 4096
    if target == "aten.linear.default":
        block = min(BLOCK, r)
        return block * c * per_elem + rows * block * itemsize + 4096
    block = min(BLOCK, c)
    return r * block * per_elem + rows * block * itemsize + 4096


def _rows_view(q: Quantized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes, scales and minimums of a 2-D quantized weight as per-row tables:
    int8 (rows, cols) codes and (rows, 1) scales; int4 (rows, cols/2) packed codes
    and (rows, cols/64) scales and minimums."""
    r, c = q.shape
    if q.fmt == "int8":
        return q.codes.view(r, c), q.scale.view(r, 1), None
    return q.codes.view(r, c // 2), q.scale.view(r, c // GROUP), q.zero.view(r, c // GROUP)  # type: ignore[union-attr]


def _dequant_block(
    q: Quantized, rows: slice | torch.Tensor, cols: slice, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize ``W[rows, cols]`` (``cols`` aligned to the int4 group)."""
    codes, scale, zero = _rows_view(q)
    if q.fmt == "int8":
        out = codes[rows, cols].to(torch.float32)
        out.mul_(scale[rows].float())
        return out.to(dtype)
    start, stop = cols.start or 0, cols.stop if cols.stop is not None else q.shape[1]
    packed = codes[rows, start // 2 : stop // 2]
    pair = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    groups = pair.reshape(*pair.shape[:-1], -1, GROUP).to(torch.float32)
    g = slice(start // GROUP, stop // GROUP)
    groups.mul_(scale[rows, g].float().unsqueeze(-1)).add_(zero[rows, g].float().unsqueeze(-1))  # type: ignore[index]
    return groups.reshape(*pair.shape).to(dtype)


def linear(x: torch.Tensor, q: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for W (out, in) stored quantized."""
    if x.is_cuda and bias is None:
        from planner.runtime.runtime import _triton_ready

        if _triton_ready(x.device):
            from planner.codegen import kernels

            fn = kernels.dequant_matmul_int8 if q.fmt == "int8" else kernels.dequant_matmul_int4
            return fn(x, q)
    n = q.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    for j in range(0, n, BLOCK):
        rows = slice(j, min(j + BLOCK, n))
        w = _dequant_block(q, rows, slice(None), x.dtype)
        part = x @ w.T
        if bias is not None:
            part.add_(bias[rows])
        out[..., rows] = part
        del w, part
    return out


def addmm(
    bias: torch.Tensor, x: torch.Tensor, q: Quantized, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    """``beta * bias + alpha * (x @ W)`` for W (in, out) stored quantized."""
    out = mm(x, q)
    if alpha != 1:
        out.mul_(alpha)
    return out.add_(bias, alpha=beta) if beta != 0 else out


def mm(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """``x @ W`` for W (in, out) stored quantized."""
    r, n = q.shape
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for j in range(0, n, BLOCK):
        cols = slice(j, min(j + BLOCK, n))
        w = _dequant_block(q, slice(None), cols, x.dtype)
        out[:, cols] = x @ w
        del w
    return out


def embedding(q: Quantized, ids: torch.Tensor, *args: object) -> torch.Tensor:
    """``W[ids]``: only the looked-up rows are read (padding_idx and the other
    arguments only matter for the backward). From the weight's full-precision copy
    off the device when it has one (``exact_rows``): the rows bit-identical to the
    unquantized lookup, for the bytes of the rows alone; else dequantized."""
    flat = ids.reshape(-1)
    if q.exact_rows is not None:
        source = q.exact_rows
        rows = source.index_select(0, flat.to(source.device)).to(ids.device)
    else:
        rows = _dequant_block(q, flat, slice(None), q.dtype)
    return rows.view(*ids.shape, q.shape[1])


def reads_exact_rows(target: str, tiers: tuple[str, ...]) -> bool:
    """Whether a fused use by op ``target`` of a weight stored quantized reads
    full-precision values: a lookup does when the plan may use the disk, where the
    weight's full copy is then written at plan time (a lookup touches a few rows, so
    a quantized table would lose precision for no memory: the rows are the output)."""
    return target == LOOKUP and "disk" in tiers


#: Op target -> the fused implementation, called with the op's own arguments.
FUSED = {
    "aten.linear.default": linear,
    "aten.mm.default": mm,
    "aten.addmm.default": addmm,
    "aten.embedding.default": embedding,
}


def call(target: str, *args: object, **kwargs: object) -> torch.Tensor:
    position = WEIGHT_POSITION[target]
    q = args[position]
    if isinstance(q, Quantized) and q.order is not None:
        # a weight quantized from a permuted layout (a transposed parameter): its
        # codes are in memory order, not the (rows, cols) these blocks walk; the op
        # takes the dequantized weight instead
        weight = restore(q, dequantize(q))
        args = (*args[:position], weight, *args[position + 1 :])
        return getattr(torch.ops.aten, target.split(".")[1]).default(*args, **kwargs)
    return FUSED[target](*args, **kwargs)  # type: ignore[operator]
