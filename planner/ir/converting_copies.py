"""An in-place ``copy_`` that broadcasts or converts its source is refused.

``buf.copy_(h[0])`` (a row broadcast over a matrix buffer) or ``buf.copy_(x.double())``
(a float64 value into a float32 buffer) are ordinary PyTorch. torch 2.13's
functionalization records the *source* as the buffer's new value, unbroadcast and
unconverted, so the planned step read a row where eager reads the matrix, and its
output was wrong, silently, or it failed on a shape or dtype mismatch (found by the
desk review). Said where, with the rewrite that traces right.
"""

from __future__ import annotations

import torch
import torch.fx

from planner.errors import CaptureError
from planner.ir.data_dependent import last_user_line
from planner.ir.meta import fake_value

#: ops whose result is their argument under another name: a copy_ into one is
#: into the state itself
_SAME_TENSOR = (torch.ops.aten.alias.default, torch.ops.aten.detach.default)


def _is_state(node: torch.fx.Node, state: set[str]) -> bool:
    """Whether ``node`` is a state input itself (or an alias or detach of one).
    A copy_ into a view of one (``buf[:, pos]``, ``buf[1:]``) traces right, even
    broadcasting or converting: only whole-tensor copies lost their conversion."""
    while node.op == "call_function" and node.target in _SAME_TENSOR:
        first = node.args[0]
        if not isinstance(first, torch.fx.Node):
            return False
        node = first
    return node.op == "placeholder" and node.name in state


def refuse_converting_copies(ep: torch.export.ExportedProgram, model_name: str) -> None:
    """Raise a CaptureError at the first ``copy_`` into a buffer or parameter whose
    source differs from it in shape or dtype. Into a view of one, or a tensor made
    in forward, such copies trace right and are left alone."""
    signature = ep.graph_signature
    state = set(signature.inputs_to_buffers) | set(signature.inputs_to_parameters)
    for node in ep.graph.nodes:
        if node.target is not torch.ops.aten.copy_.default:
            continue
        if not isinstance(node.args[0], torch.fx.Node) or not _is_state(node.args[0], state):
            continue
        into, source = (fake_value(a) if isinstance(a, torch.fx.Node) else a for a in node.args[:2])
        if not isinstance(into, torch.Tensor) or not isinstance(source, torch.Tensor):
            continue
        if into.shape == source.shape and into.dtype == source.dtype:
            continue
        line = last_user_line(node.meta.get("stack_trace"))
        where = f" at {line}" if line else ""
        raise CaptureError(
            f"{model_name}'s forward copies a {str(source.dtype).removeprefix('torch.')} "
            f"tensor of shape {tuple(source.shape)} into one of "
            f"{str(into.dtype).removeprefix('torch.')} {tuple(into.shape)} in place{where} "
            f"(copy_ broadcasting or converting it): torch's trace keeps the source as the "
            f"result, unbroadcast and unconverted, so a plan would compute something else. "
            f"Give copy_ a source of the destination's shape and dtype: "
            f"dst.copy_(src.expand_as(dst).to(dst.dtype))"
        )
