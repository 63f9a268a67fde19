"""Control flow that torch.export keeps as a higher-order op (``torch.cond``,
``torch._higher_order_ops.while_loop``, ``map``, ``scan``) is refused, with the
user's line and what to do.

Each branch or body is a subgraph the plan would have to size and schedule on
its own, and the executor calls only ATen ops: inference got as far as emitting
the executor and failed with ``KeyError: 'true_graph_0'``; training was refused
as if the model applied an ``autograd.Function`` of its own (``CondAutogradOp``),
advice that does not fit (found by the unusual-ops sweep).
"""

from __future__ import annotations

import torch
import torch.fx

from planner.errors import CaptureError
from planner.ir.data_dependent import last_user_line

#: higher-order ops whose subgraphs run data-dependently, by their names
_CONTROL_FLOW = {
    "cond": "torch.cond",
    "while_loop": "torch._higher_order_ops.while_loop",
    "map_impl": "torch._higher_order_ops.map",
    "scan": "torch._higher_order_ops.scan",
    "associative_scan": "torch._higher_order_ops.associative_scan",
}


def refuse_control_flow(graph: torch.fx.Graph, model_name: str) -> None:
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        what = _CONTROL_FLOW.get(node.target.name())
        if what is None:
            continue
        line = last_user_line(node.meta.get("stack_trace"))
        where = f" at {line}" if line else ""
        raise CaptureError(
            f"{model_name} calls {what}{where}: the planner plans one straight-line "
            f"graph, not branches or loop bodies chosen at run time. Compute both "
            f"branches and select with torch.where(pred, a, b), decide in Python on "
            f"something fixed when planning (a shape, a constant), or unroll the loop "
            f"with a Python for over a fixed count"
        )
