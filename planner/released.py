"""What a plan leaves in the model for the weights it took.

An inference plan moves the weights it keeps off the device (or stores quantized)
into its own store and releases them from the model, so they are not held twice.
They were replaced by meta tensors, and torch lets a CPU ``linear`` read a meta
weight: the model called after planning returned uninitialized memory, silently (a
user comparing ``pm(x)`` with ``model(x)`` saw the plan "differ"). A
``ReleasedWeight`` keeps the shape, dtype and name, so the model still lists its
parameters and state dict, and raises an error that says what happened on any op
that would read its values (detaching it, as ``nn.Parameter`` and ``state_dict`` do,
is allowed). A training plan takes only the frozen weights it stores quantized; its
step passes their stand-ins in their place (autograd sees inputs that want no
gradient) and reads the codes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.errors import PlannerError

#: how an inference plan takes weights (``ReleasedWeight.taken_by``)
INFERENCE = "by planner.plan(..., mode='infer'), which holds them in its own store"
#: how a training plan takes a frozen weight it stores quantized
FROZEN_QUANTIZED = (
    "by planner.plan(..., mode='train', quantize=...), which stores frozen weights "
    "(requires_grad=False) quantized and holds only their codes"
)

#: ops that make another handle on the tensor without reading it
_HANDLE_OPS = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


class ReleasedWeight(torch.Tensor):
    """A weight of the model whose values a plan took (shape and dtype only, on
    the meta device)."""

    released_name: str
    model_name: str
    #: by what, and where its values are now
    taken_by: str

    @staticmethod
    def __new__(
        cls, like: torch.Tensor, name: str, model_name: str, taken_by: str = INFERENCE
    ) -> ReleasedWeight:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            like.shape,
            strides=like.stride(),
            dtype=like.dtype,
            device=torch.device("meta"),
            requires_grad=like.requires_grad,
        )
        t.released_name = name
        t.model_name = model_name
        t.taken_by = taken_by
        return t

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch's own stub differs
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        # anywhere in the call: torch.cat([w, x]) passes it in a list
        leaves = pytree.tree_leaves((args, kwargs or {}))
        released = next(a for a in leaves if isinstance(a, ReleasedWeight))
        if func in _HANDLE_OPS:
            return ReleasedWeight(
                released, released.released_name, released.model_name, released.taken_by
            )
        raise PlannerError(
            f"{released.released_name!r} of the {released.model_name} was moved into a "
            f"planned module {released.taken_by}; the model no longer holds its values "
            f"({func} would have read them). Call the "
            f"planned module instead, or plan a copy of the model "
            f"(planner.plan(copy.deepcopy(model), ...)) to keep this one usable"
        )

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"ReleasedWeight({self.released_name}, shape={tuple(self.shape)}, dtype={self.dtype})"
        )


def released_like(
    old: torch.Tensor, name: str, model: torch.nn.Module, taken_by: str = INFERENCE
) -> torch.Tensor:
    """The stand-in for weight ``name`` of ``model``: a parameter if it was one."""
    stand_in = ReleasedWeight(old, name, type(model).__name__, taken_by)
    if isinstance(old, torch.nn.Parameter):
        return torch.nn.Parameter(stand_in, requires_grad=old.requires_grad)
    return stand_in
