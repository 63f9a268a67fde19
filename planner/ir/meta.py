"""The one place that names metadata keys the planner reads or writes.

FX's ``node.meta`` is an untyped dict; we read only the keys tracing defines and
keep our own facts in typed IR dataclasses. ``Program.meta`` holds the few
non-serialized side tables, keyed by the constants below.
"""

from __future__ import annotations

from typing import Any

import torch.fx

#: ``node.meta`` key under which tracing stores the fake tensor(s) a node produces.
FX_VAL = "val"
#: ``Program.meta`` key: the FX node name of each op, in schedule order.
FX_NODE_NAMES = "fx_node_names"
#: ``Program.meta`` key (training): {value index of a returned gradient: the
#: qualified name of the parameter it is the gradient of}.
PARAM_GRADS = "param_grads"


def fake_value(node: torch.fx.Node) -> Any:
    """The fake tensor (or tuple of them) a traced node produced."""
    return node.meta.get(FX_VAL)
