"""A ``torch.autograd.Function`` with its own backward, met while tracing for
training, is refused.

``torch.export`` traces a Function's forward into ATen ops and keeps no trace of
its backward; AOTAutograd then differentiates those ops. So the planned step's
gradients are the derivative of what the forward computes, not what the
Function's backward returns. For a straight-through estimator or a gradient
reversal layer they were plainly wrong (all zero for the layer below a rounding
step), with no error: found by a sweep over Hugging Face models, where BLOOM's
``GeLUFunction`` was why its gradients were 1.5e-8 from eager's;
RecurrentGemma clips a square root's gradient and PhiMoE routes its experts' so.
A reentrant ``torch.utils.checkpoint`` is one too (its forward runs under
``no_grad``).

Functions whose backward is the derivative of their forward by construction
are listed in ``DIFFERENTIATED_AS_TRACED`` with why: for those the traced
derivative is the same mathematics, rounded as autograd rounds it. A
``torch.library`` custom op's registered backward is not dropped (the op is one
node of the trace, differentiated with it) and is not refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.errors import CaptureError

#: qualified name -> why autograd's derivative of its forward is its backward
DIFFERENTIATED_AS_TRACED = {
    "transformers.models.bloom.modeling_bloom.GeLUFunction": (
        "its backward is the derivative of the tanh-approximated GELU its forward "
        "computes (the gradients are 1.5e-8 of the largest from eager's)"
    ),
}


#: the Functions ``torch.library`` makes for a custom op's registered backward
#: (``register_autograd``): the op stays whole in the trace, one node, and
#: AOTAutograd differentiates it with that backward, so it does run (transformers
#: 5.25 sends Mixtral's experts through one, ``grouped_mm_fallback``; refused,
#: Mixtral could not be trained at all)
_CUSTOM_OP_BACKWARDS = "torch._library.autograd.GeneratedBackwardFor_"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def functions_applied(enabled: bool = True) -> Iterator[list[type]]:
    """The Function classes applied in the block where a gradient could flow
    through them (grad mode on, an argument that requires grad), in order."""
    seen: list[type] = []
    if not enabled:
        yield seen
        return
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in leaves
        ):
            seen.append(cls)
        return original.__func__(cls, *args, **kwargs)

    function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield seen
    finally:
        function.apply = original  # type: ignore[method-assign]


def refuse_custom_backwards(functions: list[type], model_name: str) -> None:
    """Raise if any of ``functions`` has a backward of its own that the trace
    would drop (``DIFFERENTIATED_AS_TRACED`` excepted)."""
    names = list(dict.fromkeys(_qualified(cls) for cls in functions))
    refused = [
        n
        for n in names
        if n not in DIFFERENTIATED_AS_TRACED and not n.startswith(_CUSTOM_OP_BACKWARDS)
    ]
    if not refused:
        return
    checkpoint = any(n.startswith("torch.utils.checkpoint.") for n in refused)
    raise CaptureError(
        f"{model_name} applies torch.autograd.Function{'s' if len(refused) > 1 else ''} "
        f"with a backward of {'their' if len(refused) > 1 else 'its'} own: "
        f"{', '.join(refused)}. A training plan traces what a Function's forward "
        f"computes and differentiates that: the Function's backward would not run, and the "
        f"gradients would differ from eager's (a straight-through estimator's or a "
        f"gradient reversal's would be wrong). Write the backward into the forward "
        f"(a straight-through round: x + (torch.round(x) - x).detach()), or keep the "
        f"Function out of the planned module"
        + (
            "; torch.utils.checkpoint with use_reentrant=True is one: pass "
            "use_reentrant=False (or drop it: the plan recomputes by itself)"
            if checkpoint
            else ""
        )
    )
