"""Training: which forward outputs take a gradient, and how an output that aliases
another tensor reaches the caller.

AOTAutograd's joint graph returns every user output, then the *intermediate bases*
(an intermediate that several outputs are views of). Its backward takes a tangent
only for each output that is no alias and needs a gradient, and for each
intermediate base. An output that is a view of another output, of an intermediate
or of an input (CLIP's ``logits_per_image = logits_per_text.t()``; ``z[0], z[1]``;
an input returned as is) gets no tangent of its own: ``torch.compile``'s runtime
makes it again, outside its autograd node, as that view of its base, so that its
gradient flows into the base's through the view's backward. The planned step does
the same, from AOTAutograd's own metadata of the capture (``fw_metadata``), and
marks every other output non-differentiable (a float output that needs no gradient
stays one that does not require grad, as in eager).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardOutputs:
    """The joint graph's forward outputs after the updated buffers: ``num_user``
    user outputs, then intermediate bases."""

    num_user: int
    #: positions (among user outputs and intermediate bases) that take a tangent
    tangents: list[int]
    #: user output position -> (flat inputs, forward outputs, output) -> the output
    #: made again as a view of its base
    rebuilders: dict[int, Callable[[list[Any], list[Any], Any], Any]] = field(default_factory=dict)

    def hand_over(self, flat_inputs: Sequence[Any], outs: list[Any]) -> list[Any]:
        """The user outputs from ``outs`` (user outputs, then intermediate bases):
        aliases made again from their bases. ``flat_inputs``: the step's flat inputs
        in AOTAutograd's order (parameters, buffers, then the call's leaves)."""
        if self.rebuilders:
            outs = list(outs)
            inputs = list(flat_inputs)
            for j, rebuild in self.rebuilders.items():
                outs[j] = rebuild(inputs, outs, outs[j])
        return outs[: self.num_user]


def describe(fw_metadata: Any) -> ForwardOutputs:
    """Read AOTAutograd's ``ViewAndMutationMeta`` of a captured training step."""
    from torch._functorch._aot_autograd.runtime_wrappers import make_output_handler
    from torch._functorch._aot_autograd.schemas import OutputType

    takes_tangent = (
        OutputType.non_alias,
        OutputType.unsafe_view_alias,
        OutputType.custom_function_view,
    )
    infos = fw_metadata.output_info
    tangents = [
        j
        for j, info in enumerate(infos)
        if info.output_type in takes_tangent
        and issubclass(info.raw_type, torch.Tensor)
        and info.requires_grad_for_backward
    ]
    tangents += [len(infos) + b for b in range(fw_metadata.num_intermediate_bases)]
    rebuilders = {
        j: make_output_handler(info, fw_metadata, trace_joint=False)
        for j, info in enumerate(infos)
        if issubclass(info.raw_type, torch.Tensor) and info.output_type not in takes_tangent
    }
    return ForwardOutputs(num_user=len(infos), tangents=tangents, rebuilders=rebuilders)
