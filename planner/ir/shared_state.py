"""Model state whose tensors overlap in memory is refused before tracing.

Two buffers where one is a view of the other (``register_buffer("a", base)``,
``register_buffer("b", base[1])``) are valid PyTorch, and eager trains through an
in-place update of one. AOTAutograd merges such inputs into one, so the joint
graph had a primal fewer than the model has state tensors: a training plan was
made, and every call then fed its tensors one place off ("mat1 and mat2 must have
the same dtype"); inference failed inside torch's decompositions with a bare
AssertionError (found by the adversarial sweep). The plan carries each state
tensor as a tensor of its own, so state tensors must not share bytes. The same
tensor under two names (tied weights) is one tensor, and allowed; disjoint slices
of one storage (flat parameter buffers) do not overlap, and are allowed.
"""

from __future__ import annotations

import torch

from planner.errors import CaptureError


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes of ``t``'s storage it can reach."""
    if t.numel() == 0:
        return (0, 0)
    item = t.element_size()
    first = t.storage_offset()
    last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size)
    return int(first) * item, int(last + 1) * item


def check_state_does_not_overlap(model: torch.nn.Module) -> None:
    """Raise a CaptureError naming two state tensors that share bytes."""
    by_storage: dict[int, list[tuple[int, int, str]]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta or t.layout is not torch.strided or t.numel() == 0:
            continue
        lo, hi = _byte_span(t)
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((lo, hi, name))
    for spans in by_storage.values():
        spans.sort()
        for (_, hi, first), (lo, _, second) in zip(spans, spans[1:]):
            if lo < hi:
                raise CaptureError(
                    f"{type(model).__name__}: {first!r} and {second!r} share memory (one is a "
                    f"view of the other, or both of one tensor). The plan carries each "
                    f"parameter and buffer as a tensor of its own, and torch's trace merges "
                    f"these into one, so the planned calls would get them out of place. "
                    f"Register one of them and derive the other in forward (e.g. "
                    f"self.{first.rpartition('.')[2]}[1]), or register a copy (.clone())"
                )
