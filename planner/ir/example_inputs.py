"""Checks of the example inputs against the model and the trace: an input that
is one of the model's own tensors, an input the forward writes in place (found
in the exported graph before functionalizing, where torch's own decompositions
failed with a bare AssertionError on inputs that alias each other), and a hint
where ``(list, dict)`` example inputs were read as ``(args, kwargs)``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.errors import CaptureError
from planner.ir.layout import byte_span


def hint_args_kwargs_reading(error: CaptureError, example_inputs: Any) -> None:
    """``example_inputs=(xs, d)`` for ``forward(self, xs: list, d: dict)`` is read as
    ``(args, kwargs)``; the call then failed to bind with no word about why."""
    cause = error.__cause__
    if (
        isinstance(example_inputs, (tuple, list))
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], dict)
        and isinstance(cause, TypeError)
    ):
        error.args = (
            f"{error.args[0]}\nNote: example_inputs of two items, a tuple or list then a "
            f"dict, are read as (args, kwargs). If forward takes them as two positional "
            f"arguments (a list and a dict), pass ((xs, d), {{}}).",
            *error.args[1:],
        )


def check_inputs_are_not_state(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """An example input that shares memory with one of the model's parameters or
    buffers (``pm(model.l.weight)``) is one storage the plan would both own as
    state and take as the caller's input: planning failed with a raw
    ``KeyError: 'input[0][0]'``."""
    state: dict[tuple[torch.device, int], list[tuple[int, int, str]]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr())
            state.setdefault(key, []).append((*byte_span(t), name))
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for path, x in leaves:
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            continue
        storage = x.untyped_storage()
        start, end = byte_span(x)
        # one storage may hold both where they do not overlap (slices of one arena)
        held = state.get((storage.device, storage.data_ptr()), []) if storage.nbytes() else []
        owner = next((name for first, last, name in held if start < last and first < end), None)
        if owner is not None:
            raise CaptureError(
                f"example input input{pytree.keystr(path)} shares memory with the "
                f"model's {owner!r}: a plan owns the model's parameters and buffers and "
                f"cannot also take one as an input. Read it inside forward "
                f"(self.{owner}), or pass a copy "
                f"(x.detach().clone()) if you want its value only"
            )


def user_input_names(ep: torch.export.ExportedProgram) -> list[str]:
    """The exported program's user inputs, in flattening order (as its signature
    names them: the forward's argument names)."""
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]


def _copied(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether the trace's values say ``node`` holds storage of its own, not
    ``source``'s (False where either has no traced tensor to tell by)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    new, old = node.meta.get("val"), source.meta.get("val")
    if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor):
        return False
    try:
        return StorageWeakRef(new.untyped_storage()) != StorageWeakRef(old.untyped_storage())
    except Exception:  # noqa: BLE001 - a tensor without a storage to compare: a view
        return False


def inputs_written_in_place(ep: torch.export.ExportedProgram) -> list[str]:
    """The user inputs an op of the exported (not yet functionalized) graph writes
    in place, directly or through a view of them."""
    base_of = {name: name for name in user_input_names(ep)}
    written: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        returns = schema.returns
        for i, arg in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if not isinstance(value, torch.fx.Node) or value.name not in base_of:
                continue
            if arg.alias_info is not None and arg.alias_info.is_write:
                if base_of[value.name] not in written:
                    written.append(base_of[value.name])
        # a view of an input is the input for what writes through it; an op whose
        # schema may alias but that copied here (``x.float()`` of a uint8 ``x``,
        # ``contiguous`` of a transposed one) made a tensor of its own
        if (
            len(returns) == 1
            and returns[0].alias_info is not None
            and not returns[0].alias_info.is_write
            and node.args
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].name in base_of
            and not _copied(node, node.args[0])
        ):
            base_of[node.name] = base_of[node.args[0].name]
    return written
