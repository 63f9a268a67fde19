"""Weights from a safetensors checkpoint, memory-mapped, for models larger than RAM.

A model built on the meta device has no weights; ``attach_checkpoint`` gives each
of its parameters and buffers a tensor that views the checkpoint file through one
private memory map (``torch.UntypedStorage.from_file``). Nothing is read until it is
touched, so capture and planning cost no RAM for weights; the planner then copies
device-home weights into memory and streams tier-home ones into its store, and the
meter (which skips file-backed storages) never counts the map itself. The map is
shared (see ``open_safetensors``), so nothing may write through it: in training,
every parameter and buffer is copied into memory or the store before a step or an
optimizer writes it (``PlannedModule._place_state``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from planner.errors import PlannerError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def open_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Name -> tensor viewing the file (no copy, nothing read yet)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as exc:
        raise PlannerError(f"cannot read safetensors checkpoint {str(path)!r}: {exc}") from exc
    size = path.stat().st_size
    # shared=True is what records the file name on the storage (how the meter and
    # the planner recognize file-backed weights). Nothing writes through this map:
    # the planner copies any weight it keeps in memory before use.
    storage = torch.UntypedStorage.from_file(str(path), True, size)
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


def attach_checkpoint(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Point every meta parameter/buffer of ``model`` at the checkpoint's tensor of
    the same name; returns the names attached. Names, shapes and dtypes must match;
    all are checked before any is attached, so an error leaves the model as it was."""
    weights = open_safetensors(path)
    found: list[tuple[str, dict, str, torch.Tensor, torch.Tensor, bool]] = []
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for leaf, value in list(slots.items()):
                if value is None or not value.is_meta:
                    continue
                fqn = f"{module_name}.{leaf}" if module_name else leaf
                tensor = weights.get(fqn)
                if tensor is None and leaf in module._non_persistent_buffers_set:
                    where = f"model.{module_name}" if module_name else "the model"
                    raise PlannerError(
                        f"{fqn!r} is a non-persistent buffer of the meta model: no state_dict "
                        f"saves one, so no checkpoint has it, and only its module computes "
                        f"it. Make that module outside torch.device('meta') and put it in "
                        f"the model before planning: {where} = "
                        f"{type(module).__name__}(...) (a Hugging Face rotary embedding "
                        f"takes config=)"
                    )
                if tensor is None:
                    raise PlannerError(
                        f"checkpoint {str(path)!r} has no tensor {fqn!r} for the "
                        f"model's meta {kind[1:-1]}"
                    )
                if tuple(tensor.shape) != tuple(value.shape) or tensor.dtype != value.dtype:
                    raise PlannerError(
                        f"checkpoint tensor {fqn!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                        f"the model expects {tuple(value.shape)} {value.dtype}"
                    )
                found.append((fqn, slots, leaf, value, tensor, kind == "_parameters"))
    for _, slots, leaf, value, tensor, is_parameter in found:
        if is_parameter:
            slots[leaf] = torch.nn.Parameter(tensor, requires_grad=value.requires_grad)
        else:
            slots[leaf] = tensor
    return [fqn for fqn, *_ in found]


def is_file_backed(tensor: torch.Tensor) -> bool:
    return getattr(tensor.untyped_storage(), "filename", None) is not None
