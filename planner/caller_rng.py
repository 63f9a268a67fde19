"""Planning leaves the caller's random number generators as it found them.

Planning runs the model's ops on made-up inputs (``planner.passes.made_up_inputs``
fills them with ``normal_()``), runs dropout while profiling, and runs the plan
while measuring it: each draw advanced the global generator, so ``seed; plan;
train`` drew other dropout masks than ``seed; train`` (a first-step loss of 0.0120
against eager's 0.0149), even for a model without dropout of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def caller_rng_kept(fn: F) -> F:
    """``fn`` run with the CPU generator, and those of CUDA devices already in use,
    put back afterwards (an uninitialized CUDA is not started to save its state: a
    plan that starts it runs on CPU tensors and draws no CUDA numbers)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
