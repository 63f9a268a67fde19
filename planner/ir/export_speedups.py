"""Two of torch.export's bookkeeping helpers, made linear while planner captures.

In torch 2.13 both scale with the square of the model's parameter count, and on
a model of many small layers they were a third of ``analyze`` (an 800-layer MLP,
1,600 parameter tensors, inference: 15 s of 45 s):

- ``_populate_param_buffer_metadata_to_new_gm`` (``run_decompositions``) reads
  ``ExportGraphSignature.inputs_to_parameters`` / ``inputs_to_buffers`` for every
  placeholder, and each read builds the whole dict again from ``input_specs``.
  Here the two dicts are built once per call; the loop is the same.
- ``torch.export.unflatten._is_call_name`` (``ExportedProgram.module()``, run by
  ``run_decompositions`` and by the training capture) compiles a fresh regular
  expression per call, and is called once per child of a module for every
  attribute assigned under it: past ``re``'s 512-pattern cache each call parses
  its pattern again. Here a plain string test with the same answers.

Both replace the helpers only inside ``faster_export_bookkeeping()`` (captures
run one at a time), and only where torch still has them; what they compute is
unchanged (tested: the same graph, node metadata and IR).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch.export  # noqa: F401  # the modules below, loaded
import torch.export.exported_program  # noqa: F401
import torch.export.unflatten  # noqa: F401


def _populate_linear(params_buffers_to_node_meta: dict[str, Any], gm: Any, new_sig: Any) -> None:
    """torch's ``_populate_param_buffer_metadata_to_new_gm``, the signature's two
    name maps built once instead of once per placeholder."""
    for metadata in params_buffers_to_node_meta.values():
        metadata.pop("nn_module_stack", None)
        metadata.pop("stack_trace", None)
    inputs_to_parameters = new_sig.inputs_to_parameters
    inputs_to_buffers = new_sig.inputs_to_buffers
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target in inputs_to_parameters:
                param_name = inputs_to_parameters[node.target]
                if param_name in params_buffers_to_node_meta:
                    for k, v in params_buffers_to_node_meta[param_name].items():
                        node.meta[k] = v
            if node.target in inputs_to_buffers:
                buffer_name = inputs_to_buffers[node.target]
                if buffer_name in params_buffers_to_node_meta:
                    for k, v in params_buffers_to_node_meta[buffer_name].items():
                        node.meta[k] = v


def _is_call_name(call_name: str, base: str) -> bool:
    """``re.match(re.escape(base) + r"(@\\d+)?$", call_name) is not None`` without
    the regular expression: ``base`` or ``base@<digits>`` (``$`` also matches
    before one trailing newline; ``\\d`` is any Unicode decimal digit)."""
    if call_name.endswith("\n"):
        call_name = call_name[:-1]
    if call_name == base:
        return True
    n = len(base)
    return (
        call_name.startswith(base)
        and call_name[n : n + 1] == "@"
        and call_name[n + 1 :].isdecimal()
    )


_REPLACEMENTS = (
    (
        "torch.export.exported_program",
        "_populate_param_buffer_metadata_to_new_gm",
        _populate_linear,
    ),
    ("torch.export.unflatten", "_is_call_name", _is_call_name),
)


@contextlib.contextmanager
def faster_export_bookkeeping() -> Iterator[None]:
    """Within: torch's two quadratic export helpers replaced by the linear ones
    above (each only if torch still defines it)."""
    saved = []
    for module_name, attr, replacement in _REPLACEMENTS:
        module = sys.modules.get(module_name)
        if module is not None and callable(getattr(module, attr, None)):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, original in reversed(saved):
            setattr(module, attr, original)
