"""Which gradients a backward leaves None when the loss skips some outputs
(planner.ir.unreached_grads)."""

from __future__ import annotations

import torch

from planner.ir.unreached_grads import tangents_of_gradients, unreached


def _gradients(joint: torch.fx.GraphModule) -> list:
    """The joint graph's outputs after its two forward outputs."""
    output = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    return list(output.args[0][2:])


def _joint() -> torch.fx.GraphModule:
    """A joint graph's shape: primals, then tangents; forward outputs, then one
    gradient per primal (w_a's from tangent 0, w_b's from tangent 1, x's from
    both; the last primal has none)."""

    def joint(w_a, w_b, x, frozen, tangents_1, tangents_2):  # type: ignore[no-untyped-def]
        a, b = x * w_a, x * w_b
        g_a = tangents_1 * x
        g_b = tangents_2 * x
        g_x = tangents_1 * w_a + tangents_2 * w_b + frozen
        return a, b, g_a, g_b, g_x, None

    return torch.fx.symbolic_trace(joint)


def test_each_gradient_records_the_tangents_it_is_computed_from() -> None:
    joint = _joint()
    masks = tangents_of_gradients(joint, _gradients(joint))
    assert masks == [0b01, 0b10, 0b11, 0]


def test_a_gradient_is_unreached_only_when_none_of_its_tangents_was_given() -> None:
    joint = _joint()
    masks = tangents_of_gradients(joint, _gradients(joint))
    assert unreached(masks, [True, False]) == {1}  # w_b: only through output b
    assert unreached(masks, [False, True]) == {0}
    assert unreached(masks, [False, False]) == {0, 1, 2}
    assert unreached(masks, [True, True]) == frozenset()
