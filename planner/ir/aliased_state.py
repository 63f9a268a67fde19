"""Module state that a non-strict export also lifted as a constant: give it one input.

A tensor the model registers as a buffer (or parameter) but forward reaches through
another object is traced twice by ``torch.export(strict=False)``: once as the
buffer, which export swaps for a fake while tracing, and once as a lifted constant,
because the other object still holds the real tensor. transformers' exportable
static cache is the case in point (``TorchExportableModuleWithStaticCache``): the
wrapper registers each layer's key and value cache as buffers, and attention writes
the new token's keys into them through the cache object (``index_copy_``).

The program then takes one tensor as two inputs, one of them written in place.
AOTAutograd refuses that inside ``run_decompositions`` ("expected compiled_fn to be
GraphModule") and would treat the two as unrelated when planning. Routing every use
of such a constant to the state's own placeholder makes the write a write of the
buffer, which the functionalized program returns as its update (as BatchNorm's
running statistics): a plan writes it into the buffer where it can
(``planner.solver.translate.UPDATE_IN_PLACE``), else the planned module copies it
back after the call.
"""

from __future__ import annotations

import warnings

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor, or two views of one storage with the same geometry."""
    if a is b:
        return True
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _state_tensor(ep: torch.export.ExportedProgram, target: str) -> torch.Tensor | None:
    """The value of a parameter or buffer input: persistent ones are in the state
    dict, non-persistent buffers among the constants."""
    value = ep.state_dict.get(target, ep.constants.get(target))
    return value if isinstance(value, torch.Tensor) else None


def merge_constants_that_are_state(
    ep: torch.export.ExportedProgram,
) -> torch.export.ExportedProgram:
    """``ep`` with each lifted constant that is one of its parameters or buffers
    replaced by that state's placeholder (unchanged when there is none)."""
    specs = ep.graph_signature.input_specs
    state = [
        (spec.arg.name, tensor)
        for spec in specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
        and spec.target is not None
        and (tensor := _state_tensor(ep, spec.target)) is not None
    ]
    merged: dict[str, str] = {}  # constant's placeholder -> state's placeholder
    for spec in specs:
        if spec.kind is not InputKind.CONSTANT_TENSOR or spec.target is None:
            continue
        value = ep.constants.get(spec.target)
        if not isinstance(value, torch.Tensor):
            continue
        owner = next((name for name, tensor in state if same_tensor(value, tensor)), None)
        if owner is not None:
            merged[spec.arg.name] = owner
    if not merged:
        return ep
    gm = ep.graph_module
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for constant, owner in merged.items():
        node = placeholders[constant]
        node.replace_all_uses_with(placeholders[owner])
        gm.graph.erase_node(node)
    gm.recompile()
    dropped = {s.target for s in specs if s.arg.name in merged}
    signature = ExportGraphSignature(
        input_specs=[s for s in specs if s.arg.name not in merged],
        output_specs=list(ep.graph_signature.output_specs),
    )
    constants = {k: v for k, v in ep.constants.items() if k not in dropped}
    with warnings.catch_warnings():
        # torch 2.13's deep copy of the call graph warns of its own deprecated
        # LeafSpec check, as in capture's run_decompositions
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
        return ep._update(gm, signature, constants=constants)
