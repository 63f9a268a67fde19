"""Translate a :class:`CapturedGraph` (FX) into the planner IR (:class:`Program`).

One op per ATen call in schedule order; ``getitem`` nodes are projections of a
multi-output op, not ops. Storage sharing is read from the fake tensors that
tracing left in ``node.meta["val"]``: two values alias exactly when their fake
storages are the same object, which is how PyTorch itself models views.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from planner.errors import CaptureError
from planner.ir.capture import CapturedGraph
from planner.ir.data_dependent import last_user_line, refuse_data_dependent_shapes
from planner.ir.layout import byte_span
from planner.ir.meta import (
    BUFFER_UPDATES,
    FROZEN_PARAMS,
    FX_NODE_NAMES,
    HOOKED_PARAMS,
    NONFINITE_SOURCES,
    PARAM_GRADS,
    exported_tensor,
    fake_value,
    node_draws_random,
    op_name_parts,
)
from planner.ir.program import Op, Phase, Program, Storage, Value, ValueKind


class _Builder:
    def __init__(self, captured: CapturedGraph) -> None:
        self.captured = captured
        self.values: list[Value] = []
        self.storages: list[Storage] = []
        self.ops: list[Op] = []
        # storage identity -> [(byte span, IR storage)]: one entry per storage
        # normally; several when graph inputs are disjoint slices of one storage
        self.storage_by_key: dict[int, list[tuple[tuple[int, int], int]]] = {}
        # storage identity -> (its bytes, device, IR storages of the model state
        # sliced from it): charged whole (``charge_sliced_state``)
        self.state_slices: dict[int, tuple[int, torch.device, list[int]]] = {}
        # fx node -> value index (tensor nodes) or list of value indices (tuples)
        self.node_values: dict[torch.fx.Node, Any] = {}
        self.op_nodes: list[torch.fx.Node] = []

    def _state_storage_bytes(self, kind: ValueKind, source: str | None) -> int | None:
        """The bytes of the real storage under a parameter or buffer, which its
        fake may not keep (``torch.hann_window(32)``, 32 elements of a storage of
        33, was traced as owning 128 bytes: metered 4 bytes over at its smallest
        budget); 0 for anything else, None for a weight viewing a file (a
        checkpoint's map: not memory the model holds, the meter skips it too)."""
        if kind not in (ValueKind.PARAM, ValueKind.BUFFER) or source is None:
            return 0
        real = exported_tensor(self.captured.extra.get("exported_program"), source)
        if not isinstance(real, torch.Tensor) or real.is_meta or real.layout is not torch.strided:
            return 0
        storage = real.untyped_storage()
        return None if getattr(storage, "filename", None) else int(storage.nbytes())

    def charge_sliced_state(self) -> None:
        """Parameters and buffers that are slices of a larger storage: the model
        holds the whole storage as long as it holds any of them, so they stay on
        the device and the bytes no slice covers are charged to the first one not
        updated in place. Planned as their slices' bytes alone, a buffer made as
        ``torch.randn(4096, 64)[:16]`` was metered 1 MiB over its budget, and four
        Linear weights sliced from one flat tensor, three of them moved to disk,
        freed nothing and were metered twice their budget (found by the model-zoo
        sweep)."""
        updated = {
            r.source.removesuffix(" (updated)")
            for r in self.captured.output_roles
            if r is not None and r.source and r.source.endswith(" (updated)")
        }
        for whole, device, sids in self.state_slices.values():
            charged = sum(self.storages[s].nbytes for s in sids)
            # not to a buffer updated in place: its update would no longer match
            # its size and could not be written into it (a pool's k, planned with
            # v registered first, needed 6% less budget than with k first)
            kept = [s for s in sids if self._source_of(s) not in updated] or sids
            self.storages[kept[0]].nbytes += max(0, allocated_bytes(whole, device) - charged)
            for s in sids:
                self.storages[s].in_larger_storage = True

    def _source_of(self, sid: int) -> str | None:
        return self.values[self.storages[sid].values[0]].source

    def add_value(
        self,
        name: str,
        fake: torch.Tensor,
        kind: ValueKind,
        producer: int | None,
        source: str | None = None,
    ) -> int:
        if fake.layout is not torch.strided:
            raise CaptureError(
                f"the traced graph makes a {str(fake.layout).removeprefix('torch.')} "
                f"tensor ({name}; e.g. the gradient of nn.Embedding(sparse=True)); the "
                f"planner sizes and moves "
                f"dense tensors only: use sparse=False (a dense gradient the plan can "
                f"move off the device), or leave this part out of the planned module"
            )
        storage = fake.untyped_storage()
        key = storage._cdata
        span = byte_span(fake)
        entries = self.storage_by_key.setdefault(key, [])
        sid = next((s for (lo, hi), s in entries if lo <= span[0] and span[1] <= hi), None)
        if kind is ValueKind.TANGENT:
            # Each incoming gradient is its own tensor at run time, even where the
            # trace gave two of them one fake (an output returned twice, as
            # BERT's last_hidden_state is hidden_states[-1]): planned as one, the
            # second went uncounted and the step measured 4 KiB over its budget.
            sid = None
        is_view = sid is not None
        if sid is None:
            real_bytes = self._state_storage_bytes(kind, source)
            whole = (0, max(int(storage.nbytes()), real_bytes or 0))
            # Graph inputs that are disjoint slices of one storage (weights memory-
            # mapped from one checkpoint file, flat parameter buffers) are planned as
            # separate tensors of their own bytes; anything else owns its storage.
            sliced = producer is None and span != whole and not entries
            if producer is None and entries:
                sliced = True
            own = span if sliced else whole
            sid = len(self.storages)
            entries.append((own, sid))
            self.storages.append(Storage(sid, allocated_bytes(own[1] - own[0], fake.device)))
            if sliced and kind in (ValueKind.PARAM, ValueKind.BUFFER) and real_bytes is not None:
                self.state_slices.setdefault(key, (whole[1], fake.device, []))[2].append(sid)
        value = Value(
            index=len(self.values),
            name=name,
            shape=tuple(int(d) for d in fake.shape),
            dtype=str(fake.dtype).removeprefix("torch."),
            itemsize=fake.element_size(),
            kind=kind,
            storage=sid,
            producer=producer,
            is_view=is_view,
            source=source,
            contiguous=bool(fake.is_contiguous()),
        )
        self.values.append(value)
        self.storages[sid].values.append(value.index)
        return value.index


def build_program(captured: CapturedGraph) -> Program:
    """Build the IR. Training graphs are ordered forward-first (see ``_schedule``)."""
    b = _Builder(captured)
    graph = captured.graph_module.graph
    refuse_data_dependent_shapes(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = []
    for node, role in zip(placeholders, captured.input_roles):
        fake = fake_value(node)
        if isinstance(fake, torch.Tensor):
            idx = b.add_value(node.name, fake, role.kind, None, role.source)
            b.node_values[node] = idx
            inputs.append(idx)
    b.charge_sliced_state()
    output_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat_outputs = pytree.tree_leaves(output_node.args[0], is_leaf=lambda x: x is None)
    forward_nodes = _forward_region(flat_outputs[: captured.num_forward_outputs])
    for node in _schedule(graph, captured.mode, forward_nodes):
        _add_op(
            b,
            node,
            Phase.FORWARD if node in forward_nodes or captured.mode == "infer" else Phase.BACKWARD,
        )
    outputs = []
    for node in flat_outputs:
        if isinstance(node, torch.fx.Node) and isinstance(b.node_values.get(node), int):
            outputs.append(b.node_values[node])
    program = Program(
        mode=captured.mode,
        ops=b.ops,
        values=b.values,
        storages=b.storages,
        inputs=inputs,
        outputs=outputs,
        num_forward_outputs=sum(
            1 for n in flat_outputs[: captured.num_forward_outputs] if isinstance(n, torch.fx.Node)
        ),
    )
    _assign_kinds(program, captured)
    program.meta[FX_NODE_NAMES] = [n.name for n in b.op_nodes]
    program.meta[PARAM_GRADS] = _param_grads(captured, flat_outputs, b.node_values)
    program.meta[HOOKED_PARAMS] = captured.extra.get(HOOKED_PARAMS, frozenset())
    program.meta[FROZEN_PARAMS] = captured.extra.get(FROZEN_PARAMS, frozenset())
    program.meta[NONFINITE_SOURCES] = captured.extra.get(NONFINITE_SOURCES, frozenset())
    program.meta[BUFFER_UPDATES] = [
        r.source.removesuffix(" (updated)")
        for r in captured.output_roles
        if r is not None and r.source and r.source.endswith(" (updated)")
    ]
    return program


def _param_grads(captured: CapturedGraph, flat_outputs: list, node_values: dict) -> dict[int, str]:
    """Returned gradient value -> the parameter it belongs to (by qualified name)."""
    params = {r.source for r in captured.input_roles if r.kind is ValueKind.PARAM}
    out: dict[int, str] = {}
    for node, role in zip(flat_outputs, captured.output_roles):
        if role is None or role.kind is not ValueKind.GRAD or not role.source:
            continue
        source = role.source.removeprefix("grad of ")
        if source in params and isinstance(node_values.get(node), int):
            out[node_values[node]] = source
    return out


def _forward_region(forward_outputs: list) -> set[torch.fx.Node]:
    """Every node the forward outputs depend on."""
    region: set[torch.fx.Node] = set()
    stack = [n for n in forward_outputs if isinstance(n, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    return region


def _schedule(graph: torch.fx.Graph, mode: str, forward: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """Ops in execution order. A training step runs the whole forward before the
    user's loss and backward, so forward-region nodes come first (the region is
    closed under inputs, so this stays a topological order)."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    if mode == "infer":
        return calls
    return [n for n in calls if n in forward] + [n for n in calls if n not in forward]


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return ".".join(op_name_parts(t))
    return getattr(t, "__name__", str(t))


def _add_op(b: _Builder, node: torch.fx.Node, phase: Phase) -> None:
    if node.target is operator.getitem:
        source, position = node.args[0], node.args[1]
        parent = b.node_values.get(source) if isinstance(source, torch.fx.Node) else None
        if isinstance(parent, list) and isinstance(position, int):
            element = parent[position]
            b.node_values[node] = element
            if isinstance(element, int):  # keep the user-visible name on the element
                b.values[element].name = node.name
        return
    index = len(b.ops)
    in_values = []
    for arg in node.all_input_nodes:
        v = b.node_values.get(arg)
        for vi in v if isinstance(v, list) else [v]:
            if isinstance(vi, int) and vi not in in_values:
                in_values.append(vi)
    fake = fake_value(node)
    outputs: list[int] = []
    if isinstance(fake, torch.Tensor):
        vi = b.add_value(node.name, fake, ValueKind.ACTIVATION, index)
        b.node_values[node] = vi
        outputs.append(vi)
    elif isinstance(fake, (tuple, list)):
        elems: list[int | None] = []
        for i, f in enumerate(fake):
            if isinstance(f, torch.Tensor):
                vi = b.add_value(f"{node.name}[{i}]", f, ValueKind.ACTIVATION, index)
                outputs.append(vi)
                elems.append(vi)
            else:
                elems.append(None)
        b.node_values[node] = elems
    for vi in in_values:
        b.values[vi].uses.append(index)
    b.ops.append(
        Op(
            index=index,
            name=node.name,
            target=_target_name(node),
            inputs=in_values,
            outputs=outputs,
            phase=phase,
            stack=_source_line(node, phase),
            draws_random=node_draws_random(node),
            takes_nonfinite=_takes_nonfinite(node),
        )
    )
    b.op_nodes.append(node)


def _source_line(node: torch.fx.Node, phase: Phase) -> str | None:
    """``model.py:42 in forward``: the model's line that made ``node``. A backward
    op carries the line of the forward op it differentiates (AOTAutograd records
    it while tracing the backward), so it is marked ``(backward)``: the line's
    gradient, not the line."""
    line = last_user_line(node.meta.get("stack_trace"))
    if line is not None and phase is Phase.BACKWARD:
        return f"{line} (backward)"
    return line


def _takes_nonfinite(node: torch.fx.Node) -> bool:
    """Whether one of ``node``'s non-tensor arguments is infinite or NaN."""
    return any(
        isinstance(a, float) and not math.isfinite(a)
        for a in pytree.tree_leaves((node.args, node.kwargs))
    )


def _assign_kinds(program: Program, captured: CapturedGraph) -> None:
    """Kinds are a property of storage: a view of a parameter is parameter memory.

    Op-produced storages are outputs or gradients when they hold a returned value,
    saved-for-backward when a forward value is read by a backward op, else
    activations.
    """
    out_kind: dict[int, ValueKind] = {}
    for pos, vi in enumerate(program.outputs):
        kind = ValueKind.OUTPUT if pos < program.num_forward_outputs else ValueKind.GRAD
        out_kind.setdefault(program.values[vi].storage, kind)
    for storage in program.storages:
        base = program.values[storage.base]
        if base.producer is None:
            kind = base.kind
        elif storage.index in out_kind:
            kind = out_kind[storage.index]
        elif program.ops[base.producer].phase is Phase.FORWARD and any(
            program.ops[u].phase is Phase.BACKWARD
            for vi in storage.values
            for u in program.values[vi].uses
        ):
            kind = ValueKind.SAVED
        else:
            kind = ValueKind.ACTIVATION
        for vi in storage.values:
            program.values[vi].kind = kind


#: CUDA's caching allocator hands out blocks in multiples of this many bytes, and
#: its counters (the meter's on CUDA) count the blocks
CUDA_BLOCK_BYTES = 512


def allocated_bytes(nbytes: int, device: torch.device) -> int:
    """What a storage of ``nbytes`` holds on ``device``: on CUDA rounded up to the
    allocator's block (a 4-byte scalar holds 512; ResNet's training graph, with 192
    storages not a multiple of it, holds up to 61 KB more at once than its bytes
    add to); elsewhere ``nbytes``."""
    if device.type != "cuda" or nbytes == 0:
        return nbytes
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
