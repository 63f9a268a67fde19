"""The one place that names metadata keys the planner reads or writes.

FX's ``node.meta`` is an untyped dict; we read only the keys tracing defines and
keep our own facts in typed IR dataclasses. ``Program.meta`` holds the few
non-serialized side tables, keyed by the constants below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

#: ``node.meta`` key under which tracing stores the fake tensor(s) a node produces.
FX_VAL = "val"
#: ``Program.meta`` key: the FX node name of each op, in schedule order.
FX_NODE_NAMES = "fx_node_names"
#: ``Program.meta`` key (training): {value index of a returned gradient: the
#: qualified name of the parameter it is the gradient of}.
PARAM_GRADS = "param_grads"
#: Program.meta key: names of the buffers each call updates in place (BatchNorm
#: statistics of a module in training mode), in inference as in training.
BUFFER_UPDATES = "buffer_updates"
#: ``Program.meta`` and captured ``extra`` key (training): names of the parameters
#: with tensor hooks when planned, whose gradients go through autograd to run them.
HOOKED_PARAMS = "hooked_params"
#: ``Program.meta`` and captured ``extra`` key (training): names of the parameters
#: that did not require grad when planned (a fine-tune's frozen base): they do not
#: change from step to step, so a lossy plan may store them quantized (QLoRA's idea).
FROZEN_PARAMS = "frozen_params"
#: ``Program.meta`` and captured ``extra`` key: the sources (state names, input
#: paths) of the inputs that held an infinite or NaN value when planned
#: (``planner.ir.nonfinite_sources``): never quantized, nor what is made from them.
NONFINITE_SOURCES = "nonfinite_sources"


def draws_random(target: Any) -> bool:
    """Whether calling ``target`` draws random numbers: ATen tags every such op
    (dropout, ``bernoulli``, ``rand*``, ``normal``, ``exponential``, ...)
    ``nondeterministic_seeded``. The one test of it: the IR's ops (through
    ``node_draws_random``), the solver's replays and the compiled runs all ask here."""
    return (
        isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
    )


def node_draws_random(node: torch.fx.Node) -> bool:
    """``draws_random`` of a traced call: its op's, except an attention op called
    with ``dropout_p`` 0. ATen tags the scaled-dot-product ops
    nondeterministic_seeded for their dropout, but at p = 0 they draw nothing
    (every transformers model using SDPA traces one, which held its library
    modules to training mode, so ``pm.eval()`` on a dropout-free ViT or Llama
    training plan was refused)."""
    target = node.target
    if not draws_random(target):
        return False
    if "scaled_dot_product" in target._schema.name:  # type: ignore[union-attr]
        for i, arg in enumerate(target._schema.arguments):  # type: ignore[union-attr]
            if arg.name == "dropout_p":
                p = (
                    node.args[i]
                    if i < len(node.args)
                    else node.kwargs.get("dropout_p", arg.default_value)
                )
                if isinstance(p, (int, float)) and p == 0:
                    return False
    return True


def op_name_parts(target: torch._ops.OpOverload) -> tuple[str, str, str]:
    """(namespace, name, overload) of an ATen or custom op: ``("aten", "mm",
    "default")``, ``("planner", "log_softmax_nll_backward", "default")``. The IR's
    target names and the generated code's names both read them here."""
    namespace, _, name = target._schema.name.rpartition("::")
    return namespace or "aten", name, target._overloadname


def exported_tensor(ep: Any, name: str) -> Any:
    """The real tensor an exported program holds as parameter, buffer or lifted
    constant ``name`` (a graph input's ``Role.source``); None if it holds none or
    there is no program."""
    if ep is None:
        return None
    for table in (ep.state_dict, ep.constants):
        if name in table:
            return table[name]
    return None


def fake_value(node: torch.fx.Node) -> Any:
    """The fake tensor (or tuple of them) a traced node produced."""
    return node.meta.get(FX_VAL)


def random_inputs(
    node: torch.fx.Node,
    device: str,
    given: Callable[[torch.fx.Node], torch.Tensor | None] | None = None,
    nonnegative: bool = False,
) -> tuple[tuple, dict]:
    """Real tensors with the traced shapes, strides, dtypes and ``requires_grad``:
    random floats, zero integers (valid as indices), so the op takes its usual code
    path (even under no_grad, matmul copies a non-contiguous input or not depending
    on whether the weight requires grad). ``given``: a real tensor to pass for an
    argument node instead, or None (``planner.passes.made_up_inputs``).
    ``nonnegative``: floats drawn from [0, 1) instead, for ops that refuse negative
    values (``multinomial``'s and ``bernoulli``'s probabilities)."""

    def real(x: Any) -> Any:
        if not isinstance(x, torch.fx.Node):
            return x
        if given is not None and (t := given(x)) is not None:
            return t
        v = fake_value(x)
        if not isinstance(v, torch.Tensor):
            return v
        shape, stride = tuple(v.shape), tuple(v.stride())
        # an expanded input (stride 0: an attention mask broadcast over heads)
        # cannot be filled in place; fill its storage, then view it as traced
        # (before, such ops could not run here and were taken to need no workspace:
        # Falcon's attention scratch went unbudgeted, 3 KB over a 84 KB budget)
        overlapping = any(st == 0 and n > 1 for n, st in zip(shape, stride))
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
        size = (extent,) if overlapping else shape
        t = torch.empty_strided(size, (1,) if overlapping else stride, dtype=v.dtype, device=device)
        if v.dtype.is_floating_point or v.dtype.is_complex:
            (t.uniform_() if nonnegative else t.normal_()).requires_grad_(v.requires_grad)
        else:
            t.zero_()
        return t.as_strided(shape, stride) if overlapping else t

    args, kwargs = pytree.tree_map(real, (node.args, node.kwargs))
    return tuple(args), dict(kwargs)
