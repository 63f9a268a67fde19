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

import torch

from planner.errors import CaptureError
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
    """The parameters and buffers the exported graph writes in place, through
    views too (``b.add_(...)`` where ``b`` is a view of another buffer: torch's
    signature then lists no mutation at all)."""
    signature = ep.graph_signature
    state = {**signature.inputs_to_buffers, **signature.inputs_to_parameters}
    written = set(signature.buffers_to_mutate.values())
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for argument, value in zip(schema.arguments, node.args):
            info = argument.alias_info
            if info is None or not info.is_write or not isinstance(value, torch.fx.Node):
                continue
            while value.op == "call_function" and value.args:  # back through views
                first = value.args[0]
                returns = getattr(value.target, "_schema", None)
                if not isinstance(first, torch.fx.Node) or returns is None:
                    break
                if not (returns.returns and returns.returns[0].alias_info is not None):
                    break
                value = first
            if value.op == "placeholder" and value.name in state:
                written.add(state[value.name])
    return written


def check_state_does_not_overlap(model: torch.nn.Module, updated: set[str], trained: bool) -> None:
    """Raise a CaptureError naming two state tensors that share elements where
    one of them is ``updated`` in place by the forward, or (``trained``) is a
    parameter that takes a gradient. Read only, such pairs trace right (a table
    and a view of its first rows), and are planned."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} if trained else set()
    merged = updated | trainable
    by_storage: dict[int, list[tuple[int, int, str, torch.Tensor]]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
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
                raise CaptureError(
                    f"{type(model).__name__}: {first!r} and {second!r} share memory (one is a "
                    f"view of the other, or both of one tensor). The plan carries each "
                    f"parameter and buffer as a tensor of its own, and torch's trace merges "
                    f"these into one, so the planned calls would get them out of place. "
                    f"Register one of them and derive the other in forward (e.g. "
                    f"self.{first.rpartition('.')[2]}[1]), or register a copy (.clone())"
                )
