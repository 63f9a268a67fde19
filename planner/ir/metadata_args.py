"""View ops that read a second tensor only for its metadata take that metadata
instead: ``type_as(x, o)`` becomes ``x.to(dtype=o.dtype, layout=o.layout,
device=o.device)`` (ATen's ``type_as`` is ``self.to(other.options())``: the device
too), ``view_as``, ``expand_as`` and ``reshape_as`` the same op with ``o``'s shape.

Why: an op that only makes views reads no data, so the plan does not count it as
a use of its inputs (``solver/translate._view_steps``), and the executor makes the
view when it is first read if its storage is away at the op. A second tensor
argument of such an op is an input all the same: the plan could free it before
the view was made, and making the view then failed (Gemma's RMSNorm,
``(x * w).type_as(residual)`` in inference at its smallest budget: "add_18 is not
resident"). torch.export keeps these composite ops whole (``run_decompositions({})``);
with their metadata as constants the view has one input, its base. The ops do
what the originals do: ``to`` returns ``x`` itself when dtype, layout and device
are already ``o``'s, a converted copy otherwise, as ``type_as``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from planner.ir.meta import fake_value

_aten = torch.ops.aten

#: op -> (replacement, which metadata of the second argument it takes)
_EXPLICIT = {
    _aten.type_as.default: (_aten.to.dtype_layout, "options"),
    _aten.view_as.default: (_aten.view.default, "shape"),
    _aten.expand_as.default: (_aten.expand.default, "shape"),
    _aten.reshape_as.default: (_aten.reshape.default, "shape"),
}


def explicit_metadata_args(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; returns how many ops were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _EXPLICIT or len(node.args) != 2:
            continue
        source, other = node.args
        fake = fake_value(other) if isinstance(other, torch.fx.Node) else None
        if not isinstance(fake, torch.Tensor):
            continue
        target, what = _EXPLICIT[node.target]
        kwargs: dict[str, Any]
        if what == "options":
            args: tuple = (source,)
            kwargs = {"dtype": fake.dtype, "layout": fake.layout, "device": fake.device}
        else:
            args, kwargs = (source, [int(d) for d in fake.shape]), {}
        with gm.graph.inserting_before(node):
            explicit = gm.graph.call_function(target, args, kwargs)
        explicit.meta = dict(node.meta)
        node.replace_all_uses_with(explicit)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten
