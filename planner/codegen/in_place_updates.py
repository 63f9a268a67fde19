"""A buffer's update written into the buffer runs as an in-place op.

``UPDATE_IN_PLACE`` lets the executor write an update (``index_put``, a slice or
select scatter, a ``copy``: what functionalization makes of ``buf[idx] = v``) into
the buffer it updates, and the plan counts no new bytes for it. Their ``out=``
overloads do not work in place: they compute into a temporary the buffer's size and
copy it over (measured on the CPU: 262,656 bytes more for ``index_put.out`` into a
262,144-byte buffer, the same for the scatters and ``copy.out``; ``index_copy.out``
512). A buffer updated by ``buf[8:12] = h`` in a 2 MiB cache was metered 2 MiB over
its budget (found by the adversarial sweep). Each function here takes the ``out=``
overload's arguments and, where ``out`` is the op's first argument (the buffer),
writes only what the op changes; otherwise it runs the ``out=`` overload.
"""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten


def index_put(
    self: torch.Tensor,
    indices: Any,
    values: torch.Tensor,
    accumulate: bool = False,
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    if out is not self:
        return aten.index_put.out(self, indices, values, accumulate, out=out)
    # ATen's, not Tensor.index_put_: ``cache[:, pos] = v`` indexes with None first
    return aten.index_put_.default(self, indices, values, accumulate)


def index_copy(
    self: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *, out: torch.Tensor
) -> torch.Tensor:
    if out is not self:
        return aten.index_copy.out(self, dim, index, source, out=out)
    return self.index_copy_(dim, index, source)


def slice_scatter(
    self: torch.Tensor,
    src: torch.Tensor,
    dim: int = 0,
    start: int | None = None,
    end: int | None = None,
    step: int = 1,
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    if out is not self:
        return aten.slice_scatter.out(self, src, dim, start, end, step, out=out)
    aten.slice.Tensor(self, dim, start, end, step).copy_(src)
    return self


def select_scatter(
    self: torch.Tensor, src: torch.Tensor, dim: int, index: int, *, out: torch.Tensor
) -> torch.Tensor:
    if out is not self:
        return aten.select_scatter.out(self, src, dim, index, out=out)
    self.select(dim, index).copy_(src)
    return self


def copy(
    self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False, *, out: torch.Tensor
) -> torch.Tensor:
    if out is not self:
        return aten.copy.out(self, src, non_blocking, out=out)
    return self.copy_(src, non_blocking)


#: an ``UPDATE_IN_PLACE`` op -> how the executor writes its result into ``out=``
WRITTEN_IN_PLACE: dict[Any, Any] = {
    aten.index_put.default: index_put,
    aten.index_copy.default: index_copy,
    aten.slice_scatter.default: slice_scatter,
    aten.select_scatter.default: select_scatter,
    aten.copy.default: copy,
}
