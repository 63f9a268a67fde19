"""Which gradients a backward leaves as None, as eager does, when the loss does not
use every forward output.

Eager autograd never reaches a parameter whose only paths to the loss go through
outputs the loss did not use: its ``.grad`` stays None. The captured joint graph
computes every gradient from every tangent, and a tangent the loss did not give
is fed as zeros, so the same parameter would get a zero ``.grad`` (as
``torch.compile`` gives it). The two are not the same to an optimizer: AdamW
decays and moves a parameter with a zero gradient and skips one with None (an
unused pooler beside a masked-LM head, a second head trained on alternate steps).

So each gradient output records the tangents it is computed from; a backward in
which none of those was given returns None for it instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tangents_of_gradients(
    graph_module: torch.fx.GraphModule, gradients: Sequence[torch.fx.Node | None]
) -> list[int]:
    """For each of the joint graph's ``gradients`` (its outputs after the
    forward's, flattened, in order), a bit mask of the tangents (``tangents_*``
    placeholders, in order) it depends on; 0 where it is None or depends on none."""
    reached: dict[torch.fx.Node, int] = {}
    tangent = 0
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                reached[node] = 1 << tangent
                tangent += 1
            else:
                reached[node] = 0
            continue
        mask = 0
        for source in node.all_input_nodes:
            mask |= reached[source]
        reached[node] = mask
    return [reached[node] if isinstance(node, torch.fx.Node) else 0 for node in gradients]


def unreached(tangents_of: list[int], given: list[bool]) -> frozenset[int]:
    """Positions of the gradients that none of the ``given`` tangents reaches
    (eager: None); empty when every tangent was given."""
    if all(given):
        return frozenset()
    given_mask = sum(1 << j for j, g in enumerate(given) if g)
    return frozenset(p for p, mask in enumerate(tangents_of) if mask and not mask & given_mask)
