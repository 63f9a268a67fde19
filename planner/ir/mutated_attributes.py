"""A forward that updates a plain tensor attribute in place is refused, and the
attribute is put back as it was.

A step counter kept as ``self.count = torch.zeros((), dtype=torch.int64)`` (not
``register_buffer``) and advanced by ``self.count += 1`` in forward: tracing ran
the update on the real tensor, so planning advanced the model's counter, and the
training trace then made the counter a constant of the value it had after that
update. Every planned step read it one ahead of eager's and the loss and every
gradient differed, silently (found by the adversarial sweep). Inference failed
with torch's own "Constant count is mutated in the forward method" from deep
inside its decompositions. A buffer is state the plan carries from call to call;
a plain attribute is not, so the fix is the user's: register it as a buffer. The
same for one held in a list or dict, and for an attribute the forward assigns a
new tensor (``self.count = self.count + 1``): the plan read the planned value at
every call, where eager's grew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.errors import CaptureError

#: attributes up to this size are copied (to the CPU) before the trace, so an
#: update the trace made can be undone (a counter, a scale), up to
#: ``_RESTORED_TOTAL`` in all; a larger one is only reported
_RESTORED_BYTES = 1 << 20
_RESTORED_TOTAL = 64 << 20

#: the dicts nn.Module keeps its parameters, buffers and submodules in
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})


def _plain_attributes(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(qualified name, value) of every plain attribute of ``model``'s modules:
    not the tables nn.Module keeps its parameters, buffers and submodules in (a
    user's ``self._step`` is one)."""
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name not in _MODULE_TABLES:
                yield (f"{prefix}.{name}" if prefix else name), value


def _plain_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors held as plain attributes of ``model``'s modules (neither parameters
    nor buffers), also inside a list, tuple or dict there, by qualified name."""
    found = []
    for qualified, value in _plain_attributes(model):
        if isinstance(value, torch.nn.Parameter):
            continue
        if isinstance(value, torch.Tensor):
            found.append((qualified, value))
        elif isinstance(value, (list, tuple, dict)):
            leaves, _ = pytree.tree_flatten_with_path(value)
            found += [
                (qualified + pytree.keystr(path), leaf)
                for path, leaf in leaves
                if isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter)
            ]
    return found


def _held_in_containers(model: torch.nn.Module) -> list[tuple[str, Any, list[Any], torch.Tensor]]:
    """(qualified name, the list or dict attribute, the keys down to it, tensor)
    for every tensor held in a plain list or dict of ``model``'s modules: a
    forward that puts a new tensor there (``self.hist[0] = self.hist[0] + 1``) is
    seen by the tensor at that place no longer being the same."""
    held = []
    for qualified, value in _plain_attributes(model):
        if not isinstance(value, (list, dict)):
            continue
        leaves, _ = pytree.tree_flatten_with_path(value)
        for path, leaf in leaves:
            keys = [getattr(k, "idx", getattr(k, "key", None)) for k in path]
            if isinstance(leaf, torch.Tensor) and None not in keys:
                held.append((qualified + pytree.keystr(path), value, keys, leaf))
    return held


def _put_back(held: list[tuple[str, Any, list[Any], torch.Tensor]]) -> list[str]:
    """Put each tensor back at its place where another took it; their names."""
    replaced = []
    for name, container, keys, tensor in held:
        inner = container
        try:
            for key in keys[:-1]:
                inner = inner[key]
            if inner[keys[-1]] is not tensor:
                inner[keys[-1]] = tensor
                replaced.append(name)
        except (KeyError, IndexError, TypeError):  # the container changed shape
            replaced.append(name)
    return replaced


@contextlib.contextmanager
def _assignments_recorded(model: torch.nn.Module) -> Iterator[list[str]]:
    """The plain tensor attributes of ``model``'s modules the block assigns a new
    value to (``self.count = self.count + 1``): torch.export puts them back
    afterwards, so only the assignment itself shows it."""
    modules = {id(m): prefix for prefix, m in model.named_modules()}
    assigned: list[str] = []
    original = torch.nn.Module.__setattr__

    def setattr_recorded(module: torch.nn.Module, name: str, value: Any) -> None:
        prefix = modules.get(id(module))
        old = vars(module).get(name)
        # a .to() that moves nothing returns the tensor itself (transformers'
        # longrope frequencies: self.x = self.x.to(device)): nothing changes
        if prefix is not None and isinstance(old, torch.Tensor) and value is not old:
            assigned.append(f"{prefix}.{name}" if prefix else name)
        original(module, name, value)

    torch.nn.Module.__setattr__ = setattr_recorded  # type: ignore[method-assign,assignment]
    try:
        yield assigned
    finally:
        torch.nn.Module.__setattr__ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def plain_attributes_left_alone(model: torch.nn.Module) -> Iterator[list[str]]:
    """Run the block (the trace); if it wrote into a plain tensor attribute, put
    back what can be put back and raise a CaptureError naming it. Yields the plain
    tensor attributes the block assigned anew (``refuse_stale_reads``)."""
    watched = []
    copied = 0
    for name, t in _plain_tensors(model):
        if t.layout is not torch.strided or t.is_meta or t.is_inference():
            continue
        keep = t.nbytes <= _RESTORED_BYTES and copied + t.nbytes <= _RESTORED_TOTAL
        copied += t.nbytes if keep else 0
        watched.append((name, t, t._version, t.detach().to("cpu", copy=True) if keep else None))

    def undo() -> list[str]:
        written = []
        for name, t, version, before in watched:
            if t._version != version:
                written.append(name)
                if before is not None:
                    with torch.no_grad():
                        t.copy_(before)
        return written

    held = _held_in_containers(model)
    try:
        with _assignments_recorded(model) as assigned:
            yield assigned
    except BaseException:
        undo()
        _put_back(held)
        raise
    written = undo()
    replaced = _put_back(held)
    if replaced:
        raise CaptureError(
            f"{type(model).__name__}'s forward puts a new tensor at {', '.join(replaced)}, in "
            f"a plain list or dict: a plan would read the tensor there when planned at every "
            f"call, and never put a new one. Register it as a buffer and update it in place"
        )
    if written:
        listed = ", ".join(written)
        raise CaptureError(
            f"{type(model).__name__}'s forward updates {listed} in place, a plain tensor "
            f"attribute{'s' if len(written) > 1 else ''}, not a registered buffer: a plan "
            f"carries buffers from call to call, but would fix a plain attribute at the value "
            f"it had when planned. Register it as a buffer: "
            f"self.register_buffer({written[0].rpartition('.')[2]!r}, tensor)"
        )


def refuse_stale_reads(model_name: str, assigned: list[str], ep: Any) -> None:
    """Raise if the forward reads a plain tensor attribute it also assigns anew
    (``self.count = self.count + 1``): the trace made the value it read a constant,
    which a plan would read at every call. One only assigned (``self.last = y``, a
    record kept for inspection) is not read by the plan and is left alone."""
    from torch.export.graph_signature import InputKind

    read = {
        spec.target
        for spec in ep.graph_signature.input_specs
        if spec.kind is InputKind.CONSTANT_TENSOR
    }
    stale = [name for name in dict.fromkeys(assigned) if name in read]
    if stale:
        raise CaptureError(
            f"{model_name}'s forward reads {', '.join(stale)} and assigns it a new tensor, a "
            f"plain attribute, not a registered buffer: a plan would read the value it had "
            f"when planned at every call. Register it as a buffer and update it in place "
            f"(self.{stale[0].rpartition('.')[2]}.copy_(new), or +=)"
        )
