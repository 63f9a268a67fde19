"""A model's parameters and buffers reached by qualified name ("layers.0.bias"):
found, replaced, or released (swapped for a stand-in that raises when read) in
the module that owns them; and the checks that a released tensor is really
freed, which is what a plan that moves weights off the device relies on.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch

from planner.errors import PlannerWarning, listed, user_stacklevel
from planner.released import ReleasedWeight, released_like


def still_held(refs: dict[str, weakref.ref]) -> list[str]:
    """The names whose tensor outlives its release (after a collection, when any
    does: a reference cycle only the collector frees)."""
    if not any(ref() is not None for ref in refs.values()):
        return []
    gc.collect()
    return [name for name, ref in refs.items() if ref() is not None]


def warn_if_still_held(full_copies: dict[str, weakref.ref]) -> None:
    """Warn when full copies of frozen weights a training plan stores quantized
    outlive their release: something else holds them (an optimizer built over
    ``model.parameters()`` before planning, a variable of the caller's), so they
    stay in memory beside their codes, where the budget does not count them."""
    held = still_held(full_copies)
    if held:
        warnings.warn(
            f"the full copies of {len(held)} frozen weight(s) this plan stores quantized "
            f"({listed(held)}) are still held outside the model, so they stay in memory "
            f"beside their codes, uncounted by the budget: an optimizer built before "
            f"planning holds every parameter it was given (so does a planner.analyze "
            f"result of the model). Build it after planning, over the trainable "
            f"parameters (p for p in model.parameters() if p.requires_grad)",
            PlannerWarning,
            stacklevel=user_stacklevel(),
        )


def free_if_moved_still_held(moved: dict[str, weakref.ref], updated: set[str]) -> None:
    """Tensors an inference plan took into its tiers that outlive their release from
    the model: something else holds them, so their memory would stay in use beside
    the tier's copy, where the budget does not count it. A buffer each call updates
    (a key/value cache that transformers' cache object holds too) is stale from
    the first call on, since the plan writes its updates to the tier: its memory is
    freed for every holder. For a weight, a warning says what holds it."""
    held = []
    for name in still_held(moved):
        tensor = moved[name]()
        if tensor is not None and name in updated:
            # every holder holds this tensor object: its data, not the storage (which
            # may not be resizable), becomes empty
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        elif tensor is not None:
            held.append(name)
        del tensor
    if held:
        warnings.warn(
            f"{len(held)} weight(s) this plan keeps off the device ({listed(held)}) are "
            f"still held outside the model, so their memory stays in use, uncounted by "
            f"the budget: a variable of yours, or an object beside the model's modules. "
            f"Drop those references to free them",
            PlannerWarning,
            stacklevel=user_stacklevel(),
        )


def slot_tensor(model: torch.nn.Module, fqn: str) -> torch.Tensor | None:
    found = find_slot(model, fqn)
    return None if found is None else found[0][found[1]]


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if it owns its storage, else a copy of just its elements
    (a slice of a memory-mapped checkpoint must not drag the whole file along)."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().clone()
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy


def find_slot(model: torch.nn.Module, fqn: str) -> tuple[dict, str] | None:
    """The parameter or buffer dict holding ``fqn`` in its owner, and the key."""
    owner_name, _, leaf = fqn.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return None
    for slots in (owner._parameters, owner._buffers):
        if slots.get(leaf) is not None:
            return slots, leaf
    return None


def replace_slot(model: torch.nn.Module, fqn: str, tensor: torch.Tensor) -> None:
    found = find_slot(model, fqn)
    if found is not None:
        slots, leaf = found
        slots[leaf] = tensor


def names_by_tensor(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name the model holds each parameter or buffer by, keyed by the
    tensor's ``id`` (a tied weight has two)."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names_of.setdefault(id(tensor), []).append(name)
    return names_of


def release_slots(model: torch.nn.Module, fqns: list[str]) -> None:
    """Replace each parameter or buffer of ``fqns`` in ``model``, under every name
    the model holds it by, by one stand-in that raises when read
    (``planner.released``). A tied weight has two names (GPT-2's ``wte.weight``
    and ``lm_head.weight``) and the trace only one: released by that one, the
    head kept the full copy, in memory the budget did not count (8 MiB beside a
    21 MB budget)."""
    names_of = names_by_tensor(model)
    for fqn in fqns:
        found = find_slot(model, fqn)
        if found is None:
            continue
        slots, leaf = found
        original = slots[leaf]
        if isinstance(original, ReleasedWeight):  # released under a tied name already
            continue
        stand_in = released_like(original, fqn, model)
        for name in names_of.get(id(original), [fqn]):
            replace_slot(model, name, stand_in)
