"""Costs: FLOPs, bytes moved and estimated seconds of every op on a DeviceProfile.

Requires: a built Program and the FX graph it came from (for the ops' arguments);
optionally the timing pass (a measured time replaces the estimate).
Ensures: ``Op.cost`` is set for every op.

FLOPs come from PyTorch's own flop formulas (``torch.utils.flop_counter``), read
off the fake tensors tracing recorded, so nothing runs. Ops without a formula are
treated as memory-bound. The time model is a roofline: an op takes the longer of
its compute time and its memory-traffic time, plus a fixed launch overhead; views
move no bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from planner.ir.meta import FX_NODE_NAMES, fake_value
from planner.ir.program import Program
from planner.passes.device_profile import DeviceProfile

log = logging.getLogger(__name__)


def annotate_costs(
    program: Program, graph_module: torch.fx.GraphModule, profile: DeviceProfile
) -> None:
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for op, node_name in zip(program.ops, program.meta[FX_NODE_NAMES]):
        node = nodes[node_name]
        flops = op_flops(node)
        read = sum(program.values[v].nbytes for v in op.inputs)
        written = sum(program.values[v].nbytes for v in op.outputs if not program.values[v].is_view)
        if all(program.values[v].is_view for v in op.outputs):
            read = 0  # a view reads no data, it only makes a new header
        dtype = _compute_dtype(program, op.inputs + op.outputs)
        compute_s = flops / profile.flops_per_second(dtype) if flops else 0.0
        memory_s = (read + written) / profile.memory_bandwidth
        op.cost.flops = float(flops)
        op.cost.bytes_read = read
        op.cost.bytes_written = written
        op.cost.roofline_seconds = max(compute_s, memory_s)
        estimate = profile.op_overhead_seconds + max(compute_s, memory_s)
        measured = op.cost.measured_seconds
        floor = profile.op_overhead_seconds
        op.cost.seconds = estimate if measured is None else max(measured, floor)


def op_flops(node: torch.fx.Node) -> float:
    """FLOPs of one traced ATen call, from torch's formulas; 0 when none applies."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0.0
    args, kwargs = pytree.tree_map_only(torch.fx.Node, fake_value, (node.args, node.kwargs))
    formula = flop_registry.get(target.overloadpacket)
    try:
        if formula is not None:
            return float(formula(*args, out_val=fake_value(node), **kwargs))
        if _is_composite(target):
            return _count_by_running(target, args, kwargs)
    except Exception as exc:  # a formula that cannot read these shapes: no FLOPs
        log.debug("no flop count for %s: %s", node.format_node(), exc)
    return 0.0


def _is_composite(op: torch._ops.OpOverload) -> bool:
    return op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)


def _count_by_running(op: torch._ops.OpOverload, args: Any, kwargs: Any) -> float:
    """Composite ops (``aten.linear``) have no formula of their own: run them on
    fake tensors under the flop counter, which sees what they decompose into."""
    fake_mode = torch._guards.detect_fake_mode(pytree.tree_leaves((args, kwargs)))
    if fake_mode is None:
        return 0.0
    counter = FlopCounterMode(display=False)
    # its ModuleTracker registers torch.nn's global module hooks for the count:
    # a planned module called in another thread meanwhile saw hooks "registered
    # since planning" and was refused. No module runs here: count under "Global"
    counter.mod_tracker = _NoModules()  # type: ignore[assignment]
    with fake_mode, counter:
        op(*args, **kwargs)
    return float(counter.get_total_flops())


class _NoModules:
    """Stands in for FlopCounterMode's ModuleTracker: every count is "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _compute_dtype(program: Program, values: list[int]) -> str:
    """The op's math dtype: its first floating-point tensor's."""
    for v in values:
        dtype = program.values[v].dtype
        if dtype.startswith(("float", "bfloat")):
            return dtype
    return "float32"
