"""Which of a capture's inputs hold infinities or NaNs when it is planned.

The graph shows where an op is handed ``-inf`` (``Op.takes_nonfinite``), but not a
mask a model keeps as a buffer (``torch.full((n, n), -inf).triu(1)``, as
hand-written transformers register it) or one the caller passes in. Quantized, such
a tensor gets an infinite scale and comes back NaN: an attention model whose four
mask buffers were stored int8 returned a NaN loss, and its report printed "error
nan" beside them. Weights and example inputs are at hand when a model is
captured, so their values are read once, here, and the nonfinite pass
(``planner.passes.nonfinite``) starts from them. Values a later call passes in
cannot be seen: the example inputs stand for them. Nor are the weights of a
mapped checkpoint (``checkpoint=``) read: that would read the whole file at
capture, which a model larger than memory is mapped to avoid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from planner.ir.meta import exported_tensor
from planner.ir.program import ValueKind
from planner.runtime.checkpoint import is_checkpoint_view

if TYPE_CHECKING:
    from planner.ir.capture import CapturedGraph

_STATE = (ValueKind.PARAM, ValueKind.BUFFER)


def nonfinite_sources(
    model: torch.nn.Module, captured: CapturedGraph, args: tuple, kwargs: dict
) -> frozenset[str]:
    """The ``Role.source`` names of ``captured``'s inputs (state and example
    inputs) that hold an infinite or NaN value now."""
    ep = captured.extra.get("exported_program")
    found = set()
    for role in captured.input_roles:
        if role.kind in _STATE and role.source and _nonfinite(_state(model, ep, role.source)):
            found.add(role.source)
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for path, leaf in leaves:
        if _nonfinite(leaf):
            found.add("input" + pytree.keystr(path))
    return frozenset(found)


def _state(model: torch.nn.Module, ep: Any, name: str) -> Any:
    """The tensor the capture named ``name``: the exported program's, else the
    model's attribute at that path (a plain tensor attribute too)."""
    value = exported_tensor(ep, name)
    if value is not None:
        return value
    value = model
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


def _nonfinite(value: Any) -> bool:
    """Whether ``value`` is a floating tensor with a value that is not finite. A
    sum is not finite where any element is not (inf + finite = inf, inf - inf =
    NaN), and takes one pass without a mask as large as the tensor: a
    124M-parameter model's weights are read in well under a second. Half
    precision is summed in float32 (a float16 sum of finite weights passed 65,504
    and took the weight, and what was made from it, for infinite)."""
    if not isinstance(value, torch.Tensor) or value.is_meta or is_checkpoint_view(value):
        return False
    if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
        return False
    # narrower floats sum in float32: a float16 sum passes 65,504 on finite weights,
    # and float8 has no sum of its own
    wide = torch.float32 if value.element_size() < 4 and not value.is_complex() else None
    try:
        with torch.no_grad():
            return not bool(torch.isfinite(value.detach().sum(dtype=wide)).all())
    except (RuntimeError, NotImplementedError):  # a dtype without a sum: never quantized
        return True
