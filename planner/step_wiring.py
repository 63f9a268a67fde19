"""How a planned training step meets autograd: which forward outputs take a
tangent, what the planned backward is given for each, and which of its outputs
is the gradient of which primal.

The planned step is one autograd node (``PlannedModule``'s ``_PlannedStep``).
Autograd hands its backward one gradient per forward output, or None where the
loss did not reach that output; the captured backward wants a tangent per
differentiable output, laid out as traced, and returns the gradients of every
primal in placeholder order (None where the graph has none). This module turns
one into the other, once per step, from what it read off the capture once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from planner.errors import PlannerError
from planner.ir.layout import strides_that_matter
from planner.ir.meta import fake_value
from planner.ir.unreached_grads import tangents_of_gradients, unreached
from planner.passes.pipeline import Analysis
from planner.runtime.output_aliases import ForwardOutputs
from planner.runtime.output_aliases import describe as describe_forward_outputs


@dataclass(frozen=True)
class StepWiring:
    #: the forward's user outputs and intermediate bases, and which take a tangent
    forward_outputs: ForwardOutputs
    #: positions among all forward outputs (updated buffers first) with a tangent
    tangent_positions: list[int]
    #: the same, as a set (outputs outside it are marked non-differentiable)
    with_tangent: frozenset[int]
    #: per tangent: the strides it was traced with (a compiled run that reads one
    #: checks them: SegFormer's logits, channels-last, met a contiguous gradient)
    tangent_strides: list[tuple[int, ...]]
    #: per tangent: its output's shape and dtype, for a zero tangent
    tangent_values: list[tuple[tuple[int, ...], torch.dtype] | None]
    #: per gradient position (primals in placeholder order), its index among the
    #: backward's returned gradients, or None where the graph has no gradient
    grad_slots: list[int | None]
    #: per gradient position, a bit mask of the tangents it is computed from
    #: (``unreached_grads``: eager leaves one none of them reached as None)
    tangents_of_grads: list[int]

    @classmethod
    def of(
        cls,
        analysis: Analysis,
        num_buffer_updates: int,
        forward_value_at: dict[int, int],
        num_tangents: int,
    ) -> StepWiring:
        """Read off the captured step. ``forward_value_at``: the program value of
        each tensor forward output, by position among all; ``num_tangents``: how
        many tangents its planned backward takes (the two must agree)."""
        program = analysis.program
        captured = analysis.captured
        fw_metadata = captured.extra.get("fw_metadata")
        if fw_metadata is not None:
            forward_outputs = describe_forward_outputs(fw_metadata)
        else:  # no metadata: every floating-point output takes a tangent
            forward_values = program.outputs[num_buffer_updates : program.num_forward_outputs]
            forward_outputs = ForwardOutputs(
                num_user=program.num_forward_outputs - num_buffer_updates,
                tangents=[
                    j
                    for j, v in enumerate(forward_values)
                    if program.values[v].dtype.startswith(("float", "bfloat", "complex"))
                ],
            )
        positions = [num_buffer_updates + j for j in forward_outputs.tangents]
        if len(positions) != num_tangents:
            raise PlannerError(
                f"internal: the captured step has {len(positions)} outputs that take a "
                f"gradient, and its backward {num_tangents} tangents; please report this "
                f"with the model"
            )
        graph = captured.graph_module.graph
        strides = [
            tuple(fake_value(n).stride())
            for n in graph.nodes
            if n.op == "placeholder" and n.name.startswith("tangents")
        ]
        values: list[tuple[tuple[int, ...], torch.dtype] | None] = []
        for i in positions:
            value = program.values[forward_value_at[i]] if i in forward_value_at else None
            values.append(None if value is None else (value.shape, getattr(torch, value.dtype)))
        out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
        flat = pytree.tree_leaves(out_node.args[0], is_leaf=lambda x: x is None)
        gradients = flat[captured.num_forward_outputs :]
        slots: list[int | None] = []
        k = 0
        for node in gradients:
            if isinstance(node, torch.fx.Node):
                slots.append(k)
                k += 1
            else:
                slots.append(None)
        return cls(
            forward_outputs=forward_outputs,
            tangent_positions=positions,
            with_tangent=frozenset(positions),
            tangent_strides=strides,
            tangent_values=values,
            grad_slots=slots,
            tangents_of_grads=tangents_of_gradients(captured.graph_module, gradients),
        )

    def unreached(self, grad_outputs: Sequence[torch.Tensor | None]) -> frozenset[int]:
        """The gradient positions none of whose tangents the loss gave: eager
        leaves those gradients None."""
        given = [grad_outputs[i] is not None for i in self.tangent_positions]
        return unreached(self.tangents_of_grads, given)

    def tangents(
        self, grad_outputs: Sequence[torch.Tensor | None], device: torch.device
    ) -> list[torch.Tensor]:
        """The backward's tangents from autograd's gradients of the outputs: each
        laid out as traced, zeros where the loss did not reach the output."""
        tangents = []
        for i, stride, value in zip(
            self.tangent_positions, self.tangent_strides, self.tangent_values
        ):
            incoming = grad_outputs[i]
            if incoming is None:
                assert value is not None, f"forward output {i} takes a tangent"
                shape, dtype = value
                incoming = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
            tangents.append(with_strides(incoming, stride))
        return tangents

    def gradients(
        self,
        grads: Sequence[torch.Tensor],
        left_none: frozenset[int],
        devices: Sequence[torch.device] | None,
    ) -> list[torch.Tensor | None]:
        """Per primal, its gradient from the backward's ``grads``, on the device
        the primal was on (a parameter whose home is the host, on CUDA, gets its
        gradient there); None where the graph has none or it is in ``left_none``.
        ``devices`` None: every primal with a gradient is on the device the
        backward ran on (``PlannedModule``'s ``_gradients_move`` decides it once per
        plan), so no gradient moves and none is compared (77 device comparisons
        per step took 12.5 us)."""
        if devices is None:
            return [
                None if k is None or p in left_none else grads[k]
                for p, k in enumerate(self.grad_slots)
            ]
        out: list[torch.Tensor | None] = []
        for p, (k, device) in enumerate(zip(self.grad_slots, devices)):
            g = None if k is None or p in left_none else grads[k]
            out.append(g if g is None or g.device == device else g.to(device))
        return out


def with_strides(tensor: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` itself if laid out with ``stride`` (``strides_that_matter``),
    else a copy that is."""
    if tensor.numel() <= 1 or tensor.stride() == stride:
        return tensor
    if strides_that_matter(tensor.shape, tensor.stride()) == strides_that_matter(
        tensor.shape, stride
    ):
        return tensor
    out = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)
