"""A gradient hook registered on a tensor inside forward, met while tracing for
training, is refused.

``Tensor.register_hook`` in forward (a gradient reversal layer written as
``h.register_hook(lambda g: -g)``, gradient clipping or scaling per layer) hooks
the tensor of that one call. The trace keeps no trace of it: AOTAutograd
differentiates the traced ops, so the planned backward ran without the hook and
the gradients below it were eager's without its effect (4.6 off for a reversal
by -3), with no error. The same for ``register_post_accumulate_grad_hook`` on a
parameter inside forward. Hooks registered outside forward, on the model's
parameters, are handled where the plan delivers gradients (``planner.ir.hooks``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from planner.errors import CaptureError

#: the Tensor methods that hook a gradient
_HOOKS = ("register_hook", "register_post_accumulate_grad_hook")

#: torch's own files
_TORCH = os.path.dirname(torch.__file__) + os.sep


@contextlib.contextmanager
def gradient_hooks_recorded(enabled: bool = True) -> Iterator[list[str]]:
    """Where (``file:line``) code outside torch registers a gradient hook on a
    tensor in the block, in order; the hooks are registered as asked. torch's
    own calls are left to torch (its module hooks go through ``grad_fn``)."""
    where: list[str] = []
    if not enabled:
        yield where
        return
    originals = {name: torch.Tensor.__dict__[name] for name in _HOOKS}
    # the patch is process-wide: another thread's hooks (an eager training loop
    # beside the plan) are not the traced forward's
    tracing_thread = threading.get_ident()

    def recorded(name: str) -> Any:
        original = originals[name]

        def register(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # torch's own call sites are torch's business (decided by the frame
            # that calls); the message names the user's line that led there
            caller = sys._getframe(1).f_code.co_filename
            if _TORCH not in caller and threading.get_ident() == tracing_thread:
                where.append(f"{name} at {_caller()}")
            return original(self, *args, **kwargs)

        return register

    for name in _HOOKS:
        setattr(torch.Tensor, name, recorded(name))
    try:
        yield where
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _caller() -> str:
    """The innermost frame of the stack outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if _TORCH not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "an unknown place"


def refuse_gradient_hooks(where: list[str], model_name: str) -> None:
    """Raise if the traced forward registered a gradient hook (``where``)."""
    if not where:
        return
    places = list(dict.fromkeys(where))
    raise CaptureError(
        f"{model_name}'s forward registers a gradient hook on a tensor it makes or reads "
        f"({'; '.join(places[:3])}{'; ...' if len(places) > 3 else ''}). A training plan "
        f"differentiates the traced ops, where such a hook does not run: the gradients "
        f"would differ from eager's without an error (a gradient reversal's sign). Write "
        f"the hook's effect into the forward's own ops, register it on the model's "
        f"parameters outside forward, or keep the hooked part out of the planned module"
    )
