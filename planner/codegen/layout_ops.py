"""Ops the executor runs into the layout their trace recorded, not ATen's.

A functional ``copy`` and the ``select``/``slice``/``diagonal`` scatters (what
functionalization makes of an in-place write into a view, ``out[:, i] = y``) clone
the *whole storage* of their first argument in ATen (``clone_preserve_strides``) and
return a view of it at that argument's offset. The trace recorded their outputs as
holding only the argument's span from offset 0 (``empty_strided(self.size(),
self.stride())``), and the IR sizes them so. Where the argument is a view of a larger
tensor the executor held more than its plan: HF RWKV's training step copies rows of
(2, 16, 32) float tensors 124 times, 4,096 bytes each against 2,176 planned, which put
one compiled run's composed peak 1,920 bytes under the meter's
(``planner.codegen.segments.composed_levels`` reads the eager replay as exact) and
the plan 768 bytes over its budget. Run here, each op writes into a tensor of the
traced layout: the same values (copies only), the bytes the plan counts.
"""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten


def _as_traced(self: torch.Tensor) -> torch.Tensor | None:
    """An empty tensor of ``self``'s size and strides from offset 0, as traced; None
    where ATen's kernel does not preserve them either (elements that overlap: it
    clones compact) or for a layout other than strided."""
    if self.layout != torch.strided or torch._debug_has_internal_overlap(self) == 1:
        return None
    return torch.empty_strided(self.size(), self.stride(), dtype=self.dtype, device=self.device)


def copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    out = _as_traced(self)
    if out is None:
        return aten.copy.default(self, src, non_blocking)
    return out.copy_(src, non_blocking)


def select_scatter(self: torch.Tensor, src: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    out = _as_traced(self)
    if out is None:
        return aten.select_scatter.default(self, src, dim, index)
    out.copy_(self)
    out.select(dim, index).copy_(src)
    return out


def slice_scatter(
    self: torch.Tensor,
    src: torch.Tensor,
    dim: int = 0,
    start: int | None = None,
    end: int | None = None,
    step: int = 1,
) -> torch.Tensor:
    out = _as_traced(self)
    if out is None:
        return aten.slice_scatter.default(self, src, dim, start, end, step)
    out.copy_(self)
    aten.slice.Tensor(out, dim, start, end, step).copy_(src)
    return out


def diagonal_scatter(
    self: torch.Tensor, src: torch.Tensor, offset: int = 0, dim1: int = 0, dim2: int = 1
) -> torch.Tensor:
    out = _as_traced(self)
    if out is None:
        return aten.diagonal_scatter.default(self, src, offset, dim1, dim2)
    out.copy_(self)
    out.diagonal(offset, dim1, dim2).copy_(src)
    return out


#: op -> the function the executor calls for it
AS_TRACED: dict[Any, Any] = {
    aten.copy.default: copy,
    aten.select_scatter.default: select_scatter,
    aten.slice_scatter.default: slice_scatter,
    aten.diagonal_scatter.default: diagonal_scatter,
}
