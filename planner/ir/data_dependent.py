"""A graph with a shape that depends on the input's values, or a value read into
Python, cannot be planned ahead of time: refused with the user's line.

Inference and training both check the exported graph, before anything else is
traced from it: training's AOTAutograd trace failed first, with torch's own
DynamicOutputShapeException pointing at generated code (``<eval_with_key>``) and
a hint about Python side effects (found by the adversarial sweep).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.fx

from planner.errors import CaptureError

_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def refuse_data_dependent_shapes(graph: torch.fx.Graph) -> None:
    """A tensor whose shape depends on the input's values (``x[x > 0]``,
    ``nonzero``, ``unique``), or a value read into Python (``.item()``), traces
    with a symbol for it but cannot be planned ahead of time: say which line
    makes it and what to do (sizing it raised torch's own data-dependent guard
    error from deep inside the builder; an ``.item()``, a KeyError)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in graph.nodes:
        value = node.meta.get("val")
        try:
            if not free_unbacked_symbols(value):
                continue
        except AssertionError:  # a dtype, device or script object: no sizes to read
            continue
        line = last_user_line(node.meta.get("stack_trace"))
        where = f" at {line}" if line else ""
        if not isinstance(value, (torch.Tensor, list, tuple)):  # a SymInt, SymFloat
            raise CaptureError(
                f"the traced graph reads a tensor's value into Python ({node.name}, "
                f"{node.target}: .item(), .tolist(), int(t)){where}: the plan is made "
                f"ahead of time, for any values. Keep it a tensor (x * t, not "
                f"x * t.item()), or compute it outside forward() and pass it in"
            )
        raise CaptureError(
            f"the traced graph makes a tensor whose shape depends on the input's "
            f"values ({node.name}, {node.target}){where}: the planner sizes every "
            f"tensor ahead of time. Boolean-mask indexing (x[x > 0]), nonzero, unique "
            f"and masked_select do this: keep the shape fixed instead (torch.where(m, "
            f"x, 0), x * m), or move that step out of forward() and pass its result in"
        )


#: frames that are never the model's line: torch itself, and the dispatch wrapper
#: of Hugging Face's ``kernels`` package, through which transformers calls a layer
#: or function that a hub kernel may replace (``return func(*args, **kwargs)``:
#: Llama's rotary embedding, Mamba's whole mixer were named ``layer.py:856 in
#: forward``; the stack torch records ends there, so the caller's line is named)
_LIBRARY_PATHS = ("/torch/", "/kernels/_internals/")


def _in_a_library(path: str) -> bool:
    """torch, the ``kernels`` wrapper, and transformers outside its models: its
    shared building blocks (``pytorch_utils.py``'s Conv1D, ``activations.py``, the
    attention, MoE and loss helpers) are a modeling file's ``nn.Linear``: GPT-2's
    every projection was named ``pytorch_utils.py:119 in forward``."""
    if any(p in path for p in _LIBRARY_PATHS):
        return True
    _, sep, rest = path.rpartition("/transformers/")
    return bool(sep) and not rest.startswith("models/")


def last_user_line(stack: str | None) -> str | None:
    """``model.py:42 in forward``: the innermost frame of an FX stack trace outside
    the libraries of ``_in_a_library`` (the model's own code, not
    ``nn.Linear.forward``) and outside the code torch generates
    (``<eval_with_key>.5``, where export traces the branches of a ``torch.cond``)."""
    if not stack:
        return None
    frames = [m for m in _FRAME.finditer(stack)]
    if not frames:
        return None
    written = [m for m in frames if not m["path"].startswith("<")]
    outside = [m for m in written if not _in_a_library(m["path"])]
    m = (outside or written or frames)[-1]
    return f"{Path(m['path']).name}:{m['line']} in {m['func']}"
