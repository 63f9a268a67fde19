"""Model state whose tensors overlap in memory is refused before tracing.

Two buffers where one is a view of the other (``register_buffer("a", base)``,
``register_buffer("b", base[1])``) are valid PyTorch, and eager trains through an
in-place update of one. Only where one is updated (or trained) does the trace go
wrong; read only, they plan right. AOTAutograd merges such inputs into one, so the joint
graph had a primal fewer than the model has state tensors: a training plan was
made, and every call then fed its tensors one place off ("mat1 and mat2 must have
the same dtype"); inference failed inside torch's decompositions with a bare
AssertionError (found by the adversarial sweep). The plan carries each state
tensor as a tensor of its own, so state tensors must not share elements. The same
tensor under two names (tied weights) is one tensor, and allowed; disjoint or
interleaved slices of one storage (flat parameter buffers, a fused cache's halves)
share none, and are allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from planner.errors import CaptureError
from planner.ir.aliased_state import same_tensor
from planner.ir.layout import byte_span


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one storage, their byte spans overlapping) reach
    a common element. Interleaved views do not (``pe[:, 0::2]`` and ``pe[:, 1::2]``,
    a fused cache's ``big[:, 0]`` and ``big[:, 1]``, a weight's column halves), and
    all of those planned: marked out element by element over the spans' union. Of
    different element sizes: taken to overlap."""
    if a.element_size() != b.element_size():
        return True
    if a.shape == b.shape and a.stride() == b.stride():
        shared = _shifted_copies_share(a, int(b.storage_offset()) - int(a.storage_offset()))
        if shared is not None:
            return shared
    item = a.element_size()
    (a_lo, a_hi), (b_lo, b_hi) = byte_span(a), byte_span(b)
    lo, hi = min(a_lo, b_lo), max(a_hi, b_hi)
    marks = torch.zeros((hi - lo) // item, dtype=torch.uint8)

    def reach(t: torch.Tensor) -> torch.Tensor:
        return marks.as_strided(t.shape, t.stride(), t.storage_offset() - lo // item)

    reach(a).fill_(1)
    return bool(reach(b).any())


def _shifted_copies_share(t: torch.Tensor, delta: int) -> bool | None:
    """Whether ``t`` and the same layout ``delta`` elements further share an
    element, from the strides alone (a fused weight's column halves: no temporary
    the size of the weight, per pair): they do when ``delta`` is a sum of
    ``i * stride`` with ``|i| < size`` per dim. Searched outermost stride first;
    where each stride exceeds what the inner dims reach, at most two multiples of
    it are left to try at each dim. None where they do not (marked out instead)."""
    dims = sorted(((int(st), int(n)) for n, st in zip(t.shape, t.stride()) if n > 1), reverse=True)
    reach = [0] * (len(dims) + 1)  # reach[k]: the largest offset dims k.. reach
    for k in range(len(dims) - 1, -1, -1):
        stride, size = dims[k]
        if stride <= reach[k + 1]:
            return None
        reach[k] = reach[k + 1] + (size - 1) * stride

    def sums_to(rest: int, k: int) -> bool:
        if k == len(dims):
            return rest == 0
        stride, size = dims[k]
        low = -((reach[k + 1] - rest) // stride)  # ceil((rest - reach) / stride)
        high = (rest + reach[k + 1]) // stride
        return any(
            sums_to(rest - i * stride, k + 1)
            for i in range(max(low, 1 - size), min(high, size - 1) + 1)
        )

    return sums_to(delta, 0)


def written_state(ep: torch.export.ExportedProgram) -> set[str]:
    """The parameters, buffers and tensor constants (plain attributes) in whose
    memory the exported graph writes in place: each one whose fake shares a storage
    with an argument an op writes, positional or keyword (``out=``). Decided by
    storage rather than by walking back through view ops, which stopped at the
    ``getitem`` of a ``chunk``, ``split`` or ``unbind`` and read only positional
    arguments: such writes were missed, and the model traced into a bare
    AssertionError (inference) or a plan whose every call failed (training). The
    trace keeps views and aliased state on their base's fake storage. All state on
    a written storage is counted: AOTAutograd merges every overlapping input of a
    storage one of them writes, not only the written one's pairs."""
    signature = ep.graph_signature
    state = {
        **signature.inputs_to_buffers,
        **signature.inputs_to_parameters,
        **signature.inputs_to_lifted_tensor_constants,
    }
    written = set(signature.buffers_to_mutate.values())
    on_storage: dict[StorageWeakRef, set[str]] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in state:
            if (storage := _fake_storage(node)) is not None:
                on_storage.setdefault(storage, set()).add(state[node.name])
    # also in the subgraphs of with-blocks (torch.no_grad(), autocast): export puts
    # their ops in a submodule of the graph module (wrap_with_set_grad_enabled)
    graphs = [m.graph for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    for node in (n for graph in graphs for n in graph.nodes):
        for value in _written_arguments(node):
            if (storage := _fake_storage(value)) is not None:
                written |= on_storage.get(storage, set())
    return written


def _fake_storage(node: torch.fx.Node) -> StorageWeakRef | None:
    """The storage of the fake tensor ``node`` traced to, or None."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.layout is not torch.strided:
        return None
    return StorageWeakRef(value.untyped_storage())


def _written_arguments(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The arguments ``node``'s op writes in place (``Tensor(a!)`` in its schema),
    given positionally or by keyword, one by one where a list is written."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return
    for k, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[k] if k < len(node.args) else node.kwargs.get(argument.name)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.fx.Node):
                yield item


def _refuse_updated_buffer_under_two_names(model: torch.nn.Module, updated: set[str]) -> None:
    """One buffer tensor registered under two names (``register_buffer("a", b)``,
    ``register_buffer("a2", b)``) that the forward updates in place: torch's trace
    carries it once, under one name, and the plan's calls failed (training: a raw
    "mat1 must be a matrix" at the first call; inference: a bare AssertionError
    while planning). Read only, such a pair traces right, as tied weights do."""
    names_of: dict[int, list[str]] = {}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        names_of.setdefault(id(buffer), []).append(name)
    for names in names_of.values():
        if len(names) > 1 and set(names) & updated:
            raise CaptureError(
                f"{type(model).__name__} registers one buffer tensor under several names "
                f"({', '.join(map(repr, names))}) and its forward updates it in place: the "
                f"trace carries it once, under one of them, so a plan cannot write it back "
                f"under both. Register it once and reach it under the other name through a "
                f"property, or register a copy"
            )


def check_state_does_not_overlap(
    model: torch.nn.Module,
    updated: set[str],
    trained: bool,
    constants: Mapping[str, object] | None = None,
) -> None:
    """Raise a CaptureError naming two state tensors that share elements where
    one of them is ``updated`` in place by the forward, or (``trained``) is a
    parameter that takes a gradient. Read only, such pairs trace right (a table
    and a view of its first rows), and are planned. ``constants``: the exported
    program's lifted constants, among them the tensors the model holds as plain
    attributes (``self.row = self.base[1]``), which the trace merges with the
    state they view just the same. One that is a parameter or buffer (the same
    tensor, or the same view of its storage) is that state, as
    ``planner.ir.aliased_state`` makes it."""
    _refuse_updated_buffer_under_two_names(model, updated)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} if trained else set()
    merged = updated | trainable
    tensors = [*model.named_parameters(), *model.named_buffers()]
    state = {id(t) for _, t in tensors}
    seen = set(state)
    for name, t in (constants or {}).items():
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            tensors.append((name, t))
    by_storage: dict[int, list[tuple[int, int, str, torch.Tensor]]] = {}
    for name, t in tensors:
        if t.is_meta or t.layout is not torch.strided or t.numel() == 0:
            continue
        lo, hi = byte_span(t)
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((lo, hi, name, t))
    for spans in by_storage.values():
        spans.sort(key=lambda span: span[:2])
        for k, (_, hi, first, a) in enumerate(spans):
            for lo, _, second, b in spans[k + 1 :]:
                if lo >= hi:
                    break
                if not {first, second} & merged or not _share_elements(a, b):
                    continue
                if (id(a) not in state or id(b) not in state) and same_tensor(a, b):
                    continue  # a constant that is this state: one input once merged
                raise CaptureError(
                    f"{type(model).__name__}: {first!r} and {second!r} share memory (one is a "
                    f"view of the other, or both of one tensor). The plan carries each "
                    f"parameter, buffer and tensor attribute as a tensor of its own, and "
                    f"torch's trace merges these into one, so the planned calls would get "
                    f"them out of place. Register one of them and derive the other in "
                    f"forward (e.g. self.{first.rpartition('.')[2]}[1]), or register a "
                    f"copy (.clone())"
                )
