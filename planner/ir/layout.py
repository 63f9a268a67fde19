"""Make a captured graph's fake strides true at run time where a kernel disagrees.

Tracing records every op against fake tensors, and later ops are chosen by those
fake strides: a ``view`` is recorded where the fake layout allows one. Some CPU
kernels do not return the layout their fake kernel promises: BatchNorm's (the
training, evaluation and no-statistics forms, and its backward) return the layout
``suggest_memory_format`` picks for their input (contiguous for a transposed
input), where the fake kernel keeps the input's strides. A
``transpose(...).view(...)`` recorded after it then fails at run time, and the
passes measure the ops after it on a layout they do not run on: in an inference
plan of HF PatchTST (BatchNorm over the transposed sequence, then the attention
projections) each ``linear``, whose input the fake values called contiguous,
copied it to fold the batch dims (matmul does when the weight requires grad),
3,072 bytes more than planned: the meter read 47,872 bytes against a 44,996-byte
budget.

``fix_layouts`` (training with Inductor kernels, whose BatchNorm returns the fake
layout, and where a view needs it) rewrites such an output ``y`` (fake strides a
permutation of a dense layout) into ``permute(clone(permute(y, p), contiguous),
p^-1)``: the same values, and in both worlds the strides the fake tensor promised.
It costs one copy of ``y``, which the IR sees as an ordinary op and plans like any
other.

``true_layouts`` (inference, and training with eager kernels) leaves the graph as
traced and records the layout the kernel returns instead, propagating fake values
again from there: the ops run on the layouts eager runs them on (outputs and
gradients stay bit-identical to eager), and the passes measure those. Where an op
traced after it needs the fake layout (a ``view`` the real one does not allow), it
restrides as ``fix_layouts`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from planner.ir.meta import FX_VAL

#: op -> positions of its tensor outputs whose real layout may differ from the fake
UNSTABLE_LAYOUT_OUTPUTS = {
    torch.ops.aten._native_batch_norm_legit_functional.default: (0,),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (0,),
    torch.ops.aten._native_batch_norm_legit.no_stats: (0,),
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


def true_layouts(gm: torch.fx.GraphModule, fixed_outputs: int = 0) -> int:
    """Record in ``gm``'s fake values the layouts its ``UNSTABLE_LAYOUT_OUTPUTS``
    have at run time (see the module docstring); where the ops traced after them
    cannot run on those, restride (``fix_layouts``) instead. ``fixed_outputs``:
    the graph's first outputs keep their traced layouts, restrided where theirs
    would change (a joint graph's forward outputs: their gradients come in as
    tangents traced in those layouts, and a gradient laid out as the output is
    copied into the tangent's, an output's bytes more each step). Returns how
    many outputs changed layout."""
    changed = [
        n
        for n in gm.graph.nodes
        if _is_unstable_output(n)
        and _real_layout(n.meta.get(FX_VAL), _layout_source(n.args[0].target, n.args[0].args))
        is not None
    ]
    if not changed:
        return 0
    saved = {n: n.meta[FX_VAL] for n in gm.graph.nodes if FX_VAL in n.meta}
    mode = changed[0].meta[FX_VAL].fake_mode
    try:
        propagate_fake_values(gm, mode, kernel_layouts=True)
        if _outputs_relaid(gm, saved, fixed_outputs):
            raise _KeepOutputs
    except Exception:  # a view (or other op) traced for the fake layout
        for node in gm.graph.nodes:
            node.meta.pop(FX_VAL, None)
            if node in saved:
                node.meta[FX_VAL] = saved[node]
        return fix_layouts(gm)
    return len(changed)


class _KeepOutputs(Exception):
    """An output ``true_layouts`` must keep as traced would change layout."""


def _outputs_relaid(gm: torch.fx.GraphModule, traced: dict[Any, Any], count: int) -> bool:
    """Whether one of ``gm``'s first ``count`` outputs now has other strides (in
    its dimensions longer than 1) than ``traced`` recorded."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for node in list(output.args[0])[:count]:  # type: ignore[arg-type]
        before = traced.get(node)
        now = node.meta.get(FX_VAL) if isinstance(node, torch.fx.Node) else None
        if isinstance(before, torch.Tensor) and isinstance(now, torch.Tensor):
            if strides_that_matter(before.shape, before.stride()) != strides_that_matter(
                now.shape, now.stride()
            ):
                return True
    return False


def _is_unstable_output(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, position = node.args
    positions = UNSTABLE_LAYOUT_OUTPUTS.get(getattr(source, "target", None))  # type: ignore[arg-type]
    return positions is not None and position in positions


#: the argument whose layout an unstable kernel's output takes, where its fake
#: output takes another's: BatchNorm's backward returns grad_input in its saved
#: input's memory format (``empty_like(input, input.suggest_memory_format())``),
#: where the fake one follows grad_output (channels-last grad_output over an NCHW
#: input: fake channels-last, real NCHW)
_LAYOUT_FROM_ARG = {torch.ops.aten.native_batch_norm_backward.default: 1}


def _layout_source(target: object, args: Sequence[Any]) -> object:
    """The (fake) argument whose layout ``target``'s kernel returns, or None where
    its fake output has it (``_LAYOUT_FROM_ARG``)."""
    position = _LAYOUT_FROM_ARG.get(target)  # type: ignore[call-overload]
    if position is None or position >= len(args):
        return None
    arg = args[position]
    return arg.meta.get(FX_VAL) if isinstance(arg, torch.fx.Node) else arg


def _real_layout(fake: object, source: object = None) -> torch.memory_format | None:
    """The memory format an unstable kernel returns where its fake output is
    ``fake`` (its input's strides; ``source``'s, where given:
    ``_layout_source``): ``suggest_memory_format``'s, or None where ``fake``
    already has that layout."""
    from torch._prims_common import suggest_memory_format

    if not isinstance(fake, torch.Tensor):
        return None
    fmt = suggest_memory_format(source if isinstance(source, torch.Tensor) else fake)
    return None if fake.is_contiguous(memory_format=fmt) else fmt


def propagate_fake_values(
    gm: torch.fx.GraphModule, mode: Any, kernel_layouts: bool = False
) -> None:
    """Recompile ``gm`` after a rewrite and run its fake values through it again
    (in fake mode ``mode``, from its placeholders' own), so every node's recorded
    value, layout and aliasing match the rewritten graph. The placeholders keep
    their own values: the propagation records detached copies, and a parameter's
    ``requires_grad`` decides what the workspace pass measures (matmul copies a
    non-contiguous input when its weight requires grad, even under no_grad).
    ``kernel_layouts``: the outputs of ``UNSTABLE_LAYOUT_OUTPUTS`` take the layout
    their kernel returns (``true_layouts``)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class KernelLayouts(FakeTensorProp):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_function(target, args, kwargs)
            positions = UNSTABLE_LAYOUT_OUTPUTS.get(target)
            if positions is None or not isinstance(out, (tuple, list)):
                return out
            outs = list(out)
            source = _layout_source(target, args)
            for i in positions:
                fmt = _real_layout(outs[i], source)
                if fmt is not None:
                    outs[i] = outs[i].clone(memory_format=fmt)
            return type(out)(outs)

    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta[FX_VAL] for n in placeholders]
    propagator = KernelLayouts if kernel_layouts else FakeTensorProp
    propagator(gm, mode).propagate_dont_convert_inputs(*inputs)
    for node, value in zip(placeholders, inputs):
        node.meta[FX_VAL] = value


def byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last+1) bytes of its storage a tensor (real or fake) can touch: the
    IR sizes graph inputs by it, and the overlap check of model state compares it."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return (start, start)
    extent = sum((int(d) - 1) * abs(int(s)) for d, s in zip(tensor.shape, tensor.stride()))
    return (start, start + (extent + 1) * size)


def strides_that_matter(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """The strides of the dimensions longer than 1: a dimension of size 1 may have
    any stride without changing where an element lies (Inductor's own check of its
    inputs, ``assert_size_stride``, skips them too)."""
    return tuple(s for s, n in zip(stride, shape) if n > 1)


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
