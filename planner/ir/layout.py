"""Make a captured graph's fake strides true at run time where a kernel disagrees.

Tracing records every op against fake tensors, and later ops are chosen by those
fake strides: a ``view`` is recorded where the fake layout allows one. Some CPU
kernels do not return the layout their fake kernel promises: BatchNorm's
(``_native_batch_norm_legit_functional`` and its backward) return a contiguous
output for a transposed input, where the fake kernel keeps the input's strides.
A ``transpose(...).view(...)`` recorded after it then fails at run time.

``fix_layouts`` rewrites such an output ``y`` (fake strides a permutation of a
dense layout) into ``permute(clone(permute(y, p), contiguous), p^-1)``: the same
values, and in both worlds the strides the fake tensor promised. It costs one copy
of ``y``, which the IR sees as an ordinary op and plans like any other.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from planner.ir.meta import FX_VAL

#: op -> positions of its tensor outputs whose real layout may differ from the fake
UNSTABLE_LAYOUT_OUTPUTS = {
    torch.ops.aten._native_batch_norm_legit_functional.default: (0,),
    torch.ops.aten.native_batch_norm_backward.default: (0,),
}


def fix_layouts(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the module docstring); returns how many
    outputs were rewritten."""
    graph = gm.graph
    fixed, mode = 0, None
    for node in list(graph.nodes):
        positions = UNSTABLE_LAYOUT_OUTPUTS.get(node.target)  # type: ignore[arg-type]
        if node.op != "call_function" or positions is None:
            continue
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] not in positions:
                continue
            fake = user.meta.get(FX_VAL)
            perm = dense_permutation(fake)
            if perm is None or list(perm) == sorted(perm):
                continue  # contiguous (or not a permuted dense layout): nothing to fix
            _restride(graph, user, perm)
            fixed, mode = fixed + 1, fake.fake_mode  # type: ignore[union-attr]
    if fixed:
        graph.lint()
        # the ops after a rewritten output were traced as views of the old storage:
        # propagate fake values again so that aliasing (which the IR reads) is right
        propagate_fake_values(gm, mode)
    return fixed


def propagate_fake_values(gm: torch.fx.GraphModule, mode: Any) -> None:
    """Recompile ``gm`` after a rewrite and run its fake values through it again
    (in fake mode ``mode``, from its placeholders' own), so every node's recorded
    value, layout and aliasing match the rewritten graph."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm.recompile()
    inputs = [n.meta[FX_VAL] for n in gm.graph.nodes if n.op == "placeholder"]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def dense_permutation(fake: object) -> list[int] | None:
    """The dim order (outermost first) in which tensor ``fake`` (fake or real) is
    dense, or None."""
    if not isinstance(fake, torch.Tensor) or fake.dim() < 2:
        return None
    sizes, strides = fake.shape, fake.stride()
    order = sorted(range(fake.dim()), key=lambda d: (-strides[d], d))
    expected = 1
    for d in reversed(order):
        if sizes[d] != 1 and strides[d] != expected:
            return None
        expected *= sizes[d]
    return order


def _restride(graph: torch.fx.Graph, node: torch.fx.Node, perm: list[int]) -> None:
    inverse = [perm.index(d) for d in range(len(perm))]
    aten = torch.ops.aten
    with graph.inserting_after(node):
        outer = graph.call_function(aten.permute.default, (node, perm))
    with graph.inserting_after(outer):
        copy = graph.call_function(
            aten.clone.default, (outer,), {"memory_format": torch.contiguous_format}
        )
    with graph.inserting_after(copy):
        back = graph.call_function(aten.permute.default, (copy, inverse))
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not outer)
    for new in (outer, copy, back):
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
