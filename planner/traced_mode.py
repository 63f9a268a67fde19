"""The model's train/eval mode is part of what a plan traced.

A model in training mode traces dropout as random ops and BatchNorm as batch
statistics that update the running ones; in eval mode, neither. A planned module
runs what was traced whatever ``pm.train()``/``pm.eval()`` says afterwards, so a
validation pass after ``pm.eval()`` would still draw dropout, silently. Calling it
in the other mode is therefore an error that says to plan again, where the mode
matters: the traced graph draws random numbers or updates buffers, or the model
has modules whose behaviour depends on the mode (dropout, batch and instance norm
with running statistics). And planning for inference a model left in training mode
(a model built from a config is) gets a warning when its graph draws dropout or
updates statistics because of it.
"""

from __future__ import annotations

import warnings

from torch import nn

from planner.errors import PlannerError
from planner.ir.meta import BUFFER_UPDATES
from planner.ir.program import Program

_MODE_DEPENDENT_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def depends_on_mode(model: nn.Module, program: Program) -> bool:
    """Whether ``model`` would compute something else in the other mode."""
    if any(op.draws_random for op in program.ops) or program.meta.get(BUFFER_UPDATES):
        return True
    return any(isinstance(m, _MODE_DEPENDENT_MODULES) for m in model.modules())


def _name(training: bool) -> str:
    return "training" if training else "eval"


def check_call_mode(traced_training: bool, training: bool) -> None:
    """Raise if a module traced in one mode is called in the other."""
    if training == traced_training:
        return
    now = _name(training)
    raise PlannerError(
        f"this module was planned with the model in {_name(traced_training)} mode and is "
        f"now in {now} mode; a plan runs what it traced (dropout, batch statistics), so "
        f"pm.{'train' if training else 'eval'}() cannot change it. For {now} mode, plan "
        f"the model again after model.{'train' if training else 'eval'}() (mode='infer' "
        f"for evaluation; one planned module per mode), or call "
        f"pm.{'eval' if training else 'train'}() to use this one"
    )


def warn_if_inference_traced_in_training(model: nn.Module, program: Program) -> None:
    """Planning for inference a model in training mode whose graph draws random
    numbers or updates buffers because of it."""
    if not model.training:
        return
    what = []
    if any(op.draws_random for op in program.ops):
        what.append("draws dropout")
    if program.meta.get(BUFFER_UPDATES):
        what.append("updates BatchNorm statistics")
    if not what:
        return
    effect = " and ".join(what)
    warnings.warn(
        f"{type(model).__name__} is in training mode, so its inference plan {effect}; "
        f"call model.eval() before planner.plan(..., mode='infer') if you meant evaluation",
        stacklevel=3,
    )
