"""Cross-entropy's backward as one op, as TorchInductor runs it.

Why: the joint graph differentiates ``cross_entropy`` (``log_softmax`` then
``nll_loss``) in two ATen calls. ``nll_loss_backward`` writes a gradient the
size of the logits that is zero but for one entry per row, and
``_log_softmax_backward_data`` reads it back to write the logits' gradient. For a
language model that is one logits-sized buffer (GPT-2's example: 32 MiB of
8 x 128 x 8192 floats) held only to be read once, and the step that holds it is
the training step's peak: the saved log-softmax, that zero-filled gradient and
the logits' gradient, all at once. Inductor fuses the pair (the one-hot gradient
becomes an index test inside the kernel), so ``torch.compile``'s step never holds
it, while a plan that charges it must make that room at the peak by moving or
remaking something else.

What: ``fuse_cross_entropy_backward`` replaces each such pair by one call of
``planner::log_softmax_nll_backward``. Its eager kernel runs the same two ATen
kernels a block of rows at a time (``CHUNK_BYTES``), writing each block of the
result in place: every row's arithmetic is its own, so the result has the pair's
bits, and the op holds its output plus one block. Inside a compiled run it is
traced back into the pair (``DECOMPOSITIONS``), which Inductor fuses as it does
under ``torch.compile``.

When: only for ``kernels="inductor"`` plans (an eager-kernel plan keeps the graph
as captured), and only for the plain case: a 2-D ``(N, C)`` dense log-softmax
over its class dimension, in a floating dtype, whose zero-filled gradient has no
other reader.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from planner.ir.meta import FX_VAL

_aten = torch.ops.aten
#: the fused op's scratch: rows of the zero-filled gradient made at a time
CHUNK_BYTES = 1 << 20
#: ``nll_loss``'s reduction codes (``torch.nn._reduction``)
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


@torch.library.custom_op("planner::log_softmax_nll_backward", mutates_args=())
def log_softmax_nll_backward(
    grad_output: torch.Tensor,
    output: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
) -> torch.Tensor:
    """The gradient of ``nll_loss(log_softmax(x, 1), target, ...)`` with respect
    to ``x``, given ``output = log_softmax(x, 1)``: what
    ``_log_softmax_backward_data(nll_loss_backward(...), output, 1, dtype)``
    returns, computed by those two kernels a block of rows at a time, so that the
    zero-filled gradient is one block (``CHUNK_BYTES``), not the logits' size."""
    return _fused_out(
        grad_output,
        output,
        target,
        weight,
        reduction,
        ignore_index,
        total_weight,
        out=torch.empty_like(output),
    )


#: The fused op's ``out=`` overload: the executor writes the logits' gradient
#: into the dying log-softmax's buffer (``planner.solver.translate.REUSE_INPUT``),
#: so the training step's peak holds one logits-sized buffer there, not two.
_LIBRARY = torch.library.Library("planner", "FRAGMENT")
_LIBRARY.define(
    "log_softmax_nll_backward.out(Tensor grad_output, Tensor output, Tensor target, "
    "Tensor? weight, SymInt reduction, SymInt ignore_index, Tensor total_weight, *, "
    "Tensor(a!) out) -> Tensor(a!)"
)


def _fused_out(
    grad_output: torch.Tensor,
    output: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    """The fused op's kernel, writing into ``out``, which may be ``output``
    itself: each block's zero-filled gradient is made from ``output``'s shape
    only, and ``_log_softmax_backward_data`` reads an element of ``output`` only
    to write the same element of the result (a row's sum is over the gradient,
    not ``output``), so writing in place gives the same bits."""
    if out.shape != output.shape or out.dtype != output.dtype or not out.is_contiguous():
        raise ValueError(
            f"log_softmax_nll_backward.out: out must be a contiguous {output.dtype} tensor "
            f"of shape {tuple(output.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    rows, row_bytes = output.shape[0], output.shape[1] * output.element_size()
    block = max(1, CHUNK_BYTES // max(1, row_bytes))
    one_hot = torch.empty(
        (min(block, rows), output.shape[1]), dtype=output.dtype, device=output.device
    )
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        part = output[start:stop]
        scratch = one_hot[: stop - start]
        _aten.nll_loss_backward.grad_input(
            grad_output[start:stop] if reduction == REDUCTION_NONE else grad_output,
            part,
            target[start:stop],
            weight,
            reduction,
            ignore_index,
            total_weight,
            grad_input=scratch,
        )
        _aten._log_softmax_backward_data.out(scratch, part, 1, output.dtype, out=out[start:stop])
    return out


_LIBRARY.impl("log_softmax_nll_backward.out", _fused_out, "CompositeExplicitAutograd")


@log_softmax_nll_backward.register_fake
def _(grad_output, output, target, weight, reduction, ignore_index, total_weight):  # type: ignore[no-untyped-def]
    return torch.empty_like(output)


FUSED_OP = torch.ops.planner.log_softmax_nll_backward.default


def _as_pair(grad_output: torch.Tensor, output: torch.Tensor, *nll_args: Any) -> torch.Tensor:
    """The fused op's arguments are ``nll_loss_backward``'s, in its order."""
    one_hot = _aten.nll_loss_backward.default(grad_output, output, *nll_args)
    return _aten._log_softmax_backward_data.default(one_hot, output, 1, output.dtype)


#: what a compiled run traces the fused op into: the pair, which Inductor fuses
DECOMPOSITIONS = {FUSED_OP: _as_pair}


def fuse_cross_entropy_backward(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the module docstring); returns how many pairs
    became one op."""
    fused = 0
    for node in list(gm.graph.nodes):
        pair = _fusable_pair(node)
        if pair is None:
            continue
        nll, softmax_backward = pair
        grad_output, _self, target, weight, reduction, ignore_index, total_weight = nll.args
        output = softmax_backward.args[1]
        with gm.graph.inserting_before(softmax_backward):
            one = gm.graph.call_function(
                FUSED_OP,
                (grad_output, output, target, weight, reduction, ignore_index, total_weight),
            )
        one.meta = dict(softmax_backward.meta)
        softmax_backward.replace_all_uses_with(one)
        gm.graph.erase_node(softmax_backward)
        gm.graph.erase_node(nll)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _fusable_pair(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(``nll_loss_backward``, ``_log_softmax_backward_data``) if ``node`` is the
    former in the plain case the fused op covers, else None."""
    if node.op != "call_function" or node.target is not _aten.nll_loss_backward.default:
        return None
    if len(node.args) != 7 or node.kwargs or len(node.users) != 1:
        return None
    (user,) = node.users
    if user.target is not _aten._log_softmax_backward_data.default or user.kwargs:
        return None
    grad, output, dim, input_dtype = user.args
    if grad is not node or not isinstance(output, torch.fx.Node):
        return None
    out_val, result_val = output.meta.get(FX_VAL), user.meta.get(FX_VAL)
    reduction = node.args[4]
    if not (isinstance(out_val, torch.Tensor) and isinstance(result_val, torch.Tensor)):
        return None
    if (
        out_val.dim() != 2
        or dim not in (1, -1)
        or not out_val.dtype.is_floating_point
        or input_dtype != out_val.dtype
        or result_val.dtype != out_val.dtype
        or not out_val.is_contiguous()
        or not result_val.is_contiguous()
        or reduction not in (REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM)
    ):
        return None
    return node, user
