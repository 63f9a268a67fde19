"""Tensor constants of a joint graph become ops that make them.

A model that builds a tensor from Python values inside ``forward``
(``torch.tensor(scale)``, as DeBERTa's attention and ViTMAE's masking do) traces,
in AOTAutograd's joint graph, to a ``get_attr`` of a constant on the graph module
(``_tensor_constant0``), usually copied by ``lift_fresh_copy``. The planner's
program has values made by ops or passed in, not attributes. A real constant of
one element (all of those seen are zero-dimensional) becomes ``aten.full`` of its
shape, value, dtype and device: the same tensor, bit for bit (a bool, integer,
float16, bfloat16, float32 or float64 value survives the trip through a Python
number exactly). An empty one becomes ``aten.empty_strided`` of its layout: it has
no values (transformers' key/value cache starts each layer with
``torch.tensor([])``, which GPT-2 builds in a training forward too unless called
with ``use_cache=False``, and such a step could not be planned). A larger constant
is a clear error that says to
register it as a buffer, which the planner treats as model state. Inference
graphs need none of this: ``torch.export`` lifts constants to inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from planner.errors import CaptureError
from planner.ir.meta import FX_VAL, fake_value


def inline_scalar_constants(gm: torch.fx.GraphModule, model_name: str) -> int:
    """Rewrite ``gm`` in place; returns how many constants were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        constant = getattr(gm, node.target, None)
        if not isinstance(constant, torch.Tensor) or isinstance(constant, torch.nn.Parameter):
            continue
        target: torch._ops.OpOverload
        args: tuple[Any, ...]
        if constant.numel() == 0:
            target = torch.ops.aten.empty_strided.default
            args = ([int(d) for d in constant.shape], [int(s) for s in constant.stride()])
        elif constant.numel() != 1 or constant.is_complex():
            raise CaptureError(
                f"{model_name} makes a tensor constant of shape {tuple(constant.shape)} "
                f"({constant.dtype}) inside forward (torch.tensor(...) of Python values, "
                f"traced as {node.target}); the planner makes real constants of one element "
                f"(or none) only: build it once in __init__ and register it with "
                f"self.register_buffer(name, tensor, persistent=False)"
            )
        else:
            target = torch.ops.aten.full.default
            args = ([int(d) for d in constant.shape], constant.item())
        with gm.graph.inserting_before(node):
            made = gm.graph.call_function(
                target, args, {"dtype": constant.dtype, "device": constant.device}
            )
        made.meta = dict(node.meta)
        if fake_value(made) is None:  # a get_attr may carry no traced value
            made.meta[FX_VAL] = _fake_mode(gm).from_tensor(constant)
        node.replace_all_uses_with(made)
        gm.graph.erase_node(node)
        delattr(gm, node.target)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _fake_mode(gm: torch.fx.GraphModule) -> FakeTensorMode:
    """The fake mode the graph was traced in (its placeholders' values')."""
    for node in gm.graph.nodes:
        value = fake_value(node)
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return FakeTensorMode()
