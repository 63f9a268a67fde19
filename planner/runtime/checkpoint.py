"""Weights from a safetensors checkpoint, memory-mapped, for models larger than RAM.

A model built on the meta device has no weights; ``attach_checkpoint`` gives each
of its parameters and buffers a tensor that views the checkpoint file through one
memory map (``torch.UntypedStorage.from_file``). Nothing is read until it is
touched, so capture and planning cost no RAM for weights; the planner then copies
device-home weights into memory, reads disk-home ones that nothing writes from the
checkpoint in place (``planner.runtime.linked``) and writes the other tier-home
ones into its store, and the meter (which skips file-backed storages) never counts
the map itself. The map is shared (see ``open_safetensors``), so nothing may write
through it: in training, every parameter and buffer the step or an optimizer
writes is copied into memory or the store first (``PlannedModule._place_state``).
A sharded checkpoint (an index and its shard files) is opened shard by shard
(``open_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from planner.errors import PlannerError, PlannerTypeError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


#: the files ``open_safetensors`` mapped: weights read from one may be read from it
#: in place (``is_checkpoint_view``); another file-backed weight may be an offload
#: store's file, which its module rewrites
_CHECKPOINT_FILES: set[str] = set()


def open_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Name -> tensor viewing the file (no copy, nothing read yet)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:  # another file's first bytes: read as a length,
                # they asked for up to 2**64 bytes (a MemoryError, or a long read)
                raise ValueError(f"its header claims {header_len:,} bytes, the file has {size:,}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as exc:
        raise PlannerError(
            f"cannot read safetensors checkpoint {str(path)!r}: {exc}. Pass a file saved "
            f"by safetensors (safetensors.torch.save_file, save_pretrained), a sharded "
            f"checkpoint's index, or their directory"
        ) from exc
    _check_header(path, header, size - 8 - header_len)
    # shared=True is what records the file name on the storage (how the meter and
    # the planner recognize file-backed weights). Nothing writes through this map:
    # the planner copies any weight it keeps in memory before use.
    storage = torch.UntypedStorage.from_file(str(path), True, size)
    _CHECKPOINT_FILES.add(str(path))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise PlannerError(f"checkpoint tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        offset = base + start
        t = torch.empty(0, dtype=dtype)
        shape = tuple(info["shape"])
        if offset % itemsize:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - start,))
            t = raw.clone().view(dtype).reshape(shape)  # unaligned: copy this one
        else:
            t.set_(storage, offset // itemsize, shape)
        tensors[name] = t
    return tensors


def _check_header(path: Path, header: Any, data_bytes: int) -> None:
    """A safetensors header as ``open_safetensors`` reads it: a JSON object of
    ``{"dtype", "shape", "data_offsets"}`` entries whose bytes lie in the file. A
    damaged or foreign file failed with a raw AttributeError, KeyError or torch's
    "Trying to resize storage that is not resizable"."""

    def bad(why: str) -> PlannerError:
        return PlannerError(
            f"safetensors checkpoint {str(path)!r} is damaged or not a safetensors file: "
            f"{why}. Save it again (safetensors.torch.save_file, save_pretrained), or "
            f"pass the intact file"
        )

    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"tensor {name!r} has no dtype, shape and data_offsets")
        if not isinstance(info["dtype"], str):
            raise bad(f"tensor {name!r} has dtype {info['dtype']!r}")
        offsets, shape = info["data_offsets"], info["shape"]
        lists = isinstance(offsets, list) and isinstance(shape, list)
        if (
            not lists
            or len(offsets) != 2
            or not all(type(n) is int and n >= 0 for n in [*offsets, *shape])
        ):
            raise bad(f"tensor {name!r} has shape {shape!r} and data_offsets {offsets!r}")
        start, end = offsets
        dtype = _DTYPES.get(info["dtype"])
        itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else None
        if end > data_bytes or start > end:
            raise bad(
                f"tensor {name!r} lies at bytes {start:,}..{end:,} of a data section of "
                f"{data_bytes:,} bytes (the file was cut short?)"
            )
        if itemsize is not None and end - start != math.prod(shape) * itemsize:
            raise bad(
                f"tensor {name!r} of shape {tuple(shape)} {info['dtype']} needs "
                f"{math.prod(shape) * itemsize:,} bytes, its data_offsets give {end - start:,}"
            )


def open_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Name -> tensor of a checkpoint: one safetensors file, a sharded one's index
    (``model.safetensors.index.json``, whose ``weight_map`` names each tensor's
    file, as Hugging Face saves models over a few GB), or a directory holding
    either (an index, else every ``*.safetensors`` file in it)."""
    if not isinstance(path, (str, os.PathLike)):  # Path()'s bare TypeError before
        raise PlannerTypeError(
            f"checkpoint must be a path (a safetensors file, a sharded checkpoint's index, "
            f"or their directory), got {type(path).__name__}"
        )
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise PlannerError(
                f"checkpoint directory {str(path)!r} has {len(indexes)} indexes "
                f"({', '.join(i.name for i in indexes)}): pass checkpoint= the one to use"
            )
        if indexes:
            return _open_index(indexes[0])
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise PlannerError(
                f"checkpoint directory {str(path)!r} has no *.safetensors file and no "
                f"*.safetensors.index.json: pass checkpoint= a safetensors file, a "
                f"sharded checkpoint's index, or a directory holding them"
            )
        return _merged(shards, {s: None for s in shards})
    if path.name.endswith(".json"):
        return _open_index(path)
    return open_safetensors(path)


def _open_index(index: Path) -> dict[str, torch.Tensor]:
    """The tensors a sharded checkpoint's index maps, each from its shard."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlannerError(
            f"cannot read the sharded checkpoint index {str(index)!r} (a JSON file with "
            f"a 'weight_map' of tensor name -> shard file): {exc!r}"
        ) from exc
    names_in: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        names_in.setdefault(index.parent / shard, set()).add(name)
    return _merged(sorted(names_in), names_in)


def _merged(
    shards: list[Path], names_in: Mapping[Path, set[str] | None]
) -> dict[str, torch.Tensor]:
    """One name -> tensor map over ``shards`` (each limited to ``names_in[shard]``
    when given); a name in two shards is an error."""
    tensors: dict[str, torch.Tensor] = {}
    found_in: dict[str, Path] = {}
    for shard in shards:
        wanted = names_in[shard]
        for name, tensor in open_safetensors(shard).items():
            if wanted is not None and name not in wanted:
                continue
            if name in found_in:
                raise PlannerError(
                    f"checkpoint tensor {name!r} is in two shards, {found_in[name].name} "
                    f"and {shard.name}: pass checkpoint= the index that says which to use"
                )
            found_in[name] = shard
            tensors[name] = tensor
    missing = {
        name for shard, names in names_in.items() if names for name in names
    } - tensors.keys()
    if missing:
        raise PlannerError(
            f"the checkpoint's index names {len(missing)} tensor(s) its shards do not "
            f"have ({', '.join(sorted(missing)[:5])}): the index and the shards do not match"
        )
    return tensors


def attach_checkpoint(model: torch.nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Point every meta parameter/buffer of ``model`` at the checkpoint's tensor of
    the same name (``open_checkpoint``: a safetensors file, a sharded checkpoint's
    index, or their directory); returns the names attached. Names, shapes and
    dtypes must match; all are checked before any is attached, so an error leaves
    the model as it was.

    A tensor the model holds under several names (tied weights: GPT-2's embedding
    and output head) is one tensor in a checkpoint, saved under one of them
    (safetensors refuses to save shared tensors twice; ``save_model`` keeps one
    name): any of its names found attaches it, and every name then holds the same
    new tensor, so it stays tied."""
    weights = open_checkpoint(path)
    # each meta tensor once, with every slot that holds it: (fqn, slots, leaf, module)
    holders: dict[int, tuple[torch.Tensor, bool, list[tuple[str, dict, str, Any]]]] = {}
    for module_name, module, kind, slots, leaf, value in _meta_slots(model):
        fqn = f"{module_name}.{leaf}" if module_name else leaf
        entry = holders.setdefault(id(value), (value, kind == "_parameters", []))
        if all(fqn != seen for seen, *_ in entry[2]):
            entry[2].append((fqn, slots, leaf, module))
    found: list[tuple[list[tuple[str, dict, str, Any]], torch.Tensor, torch.Tensor, bool]] = []
    for value, is_parameter, slots_of in holders.values():
        tensor = next((weights[f] for f, *_ in slots_of if f in weights), None)
        if tensor is None:
            _raise_missing(path, slots_of, "parameter" if is_parameter else "buffer")
        fqn = next(f for f, *_ in slots_of if f in weights)
        if tuple(tensor.shape) != tuple(value.shape) or tensor.dtype != value.dtype:
            raise PlannerError(
                f"checkpoint tensor {fqn!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the model expects {tuple(value.shape)} {value.dtype}"
            )
        found.append((slots_of, value, tensor, is_parameter))
    attached = []
    for slots_of, value, tensor, is_parameter in found:
        new = (
            torch.nn.Parameter(tensor, requires_grad=value.requires_grad)
            if is_parameter
            else tensor
        )
        for fqn, slots, leaf, _ in slots_of:
            slots[leaf] = new
            attached.append(fqn)
    return attached


def _meta_slots(
    model: torch.nn.Module,
) -> Iterator[tuple[str, torch.nn.Module, str, dict, str, torch.Tensor]]:
    """Every slot of ``model``'s modules holding a meta tensor: (module name,
    module, ``"_parameters"`` or ``"_buffers"``, that dict, the key, the tensor)."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for leaf, value in list(slots.items()):
                if value is not None and value.is_meta:
                    yield module_name, module, kind, slots, leaf, value


@contextlib.contextmanager
def checkpoint_attached(
    model: torch.nn.Module, path: str | os.PathLike[str] | None
) -> Iterator[None]:
    """Within the block, ``model``'s meta parameters and buffers are the tensors of
    the checkpoint at ``path`` (``attach_checkpoint``; nothing where ``path`` is
    None). If the block fails (a bad budget, BudgetTooSmall, an untraceable
    forward) they are put back: the model is left as it was given, on the meta
    device, not holding maps of the file."""
    if path is None:
        yield
        return
    held = [(slots, leaf, value) for *_, slots, leaf, value in _meta_slots(model)]
    try:
        attach_checkpoint(model, path)
        yield
    except BaseException:
        # every slot put back, not only those still holding a view of the file: a
        # plan that failed after building its module had given a parameter other
        # data (its offload home: param.data = ...), materialized a weight it keeps
        # (replace_slot) or released one (ReleasedWeight)
        for slots, leaf, value in held:
            if slots.get(leaf) is not value:
                slots[leaf] = value
        raise


def _raise_missing(
    path: str | os.PathLike[str], slots_of: list[tuple[str, dict, str, Any]], kind: str
) -> NoReturn:
    """The error for a meta tensor the checkpoint has under none of its names."""
    fqn, _, leaf, module = slots_of[0]
    if leaf in module._non_persistent_buffers_set:
        module_name = fqn.rpartition(".")[0]
        where = f"model.{module_name}" if module_name else "the model"
        raise PlannerError(
            f"{fqn!r} is a non-persistent buffer of the meta model: no state_dict "
            f"saves one, so no checkpoint has it, and only its module computes "
            f"it. Make that module outside torch.device('meta') and put it in "
            f"the model before planning: {where} = "
            f"{type(module).__name__}(...) (a Hugging Face rotary embedding "
            f"takes config=)"
        )
    names = " or ".join(repr(f) for f, *_ in slots_of)
    raise PlannerError(
        f"checkpoint {str(path)!r} has no tensor {names} for the model's meta {kind}"
    )


def is_file_backed(tensor: torch.Tensor) -> bool:
    return getattr(tensor.untyped_storage(), "filename", None) is not None


def is_checkpoint_view(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` views a safetensors checkpoint's map (``open_safetensors``)."""
    return getattr(tensor.untyped_storage(), "filename", None) in _CHECKPOINT_FILES
