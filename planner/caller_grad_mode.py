"""Planning for training whatever grad mode the caller is in.

``mode="train"`` traces the backward and runs steps to measure them, which needs
grad mode. A caller inside ``torch.no_grad()`` (a set-up function decorated with
it, a ``torch.set_grad_enabled(False)`` earlier) got an error that blamed the
model's forward for cutting the graph. The mode asked for is plain, so training
is planned with grad mode on, and out of ``torch.inference_mode``. What cannot be
planned that way is named instead: example inputs or weights made under
inference mode, which autograd refuses to save for a backward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils import _pytree as pytree

from planner.errors import PlannerError, listed

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def grad_mode_for(mode: str, model: Any, example_inputs: Any) -> Iterator[None]:
    """Grad mode on (and inference mode off) while planning ``mode="train"``;
    the caller's modes otherwise."""
    if mode != "train":
        yield
        return
    _check_no_inference_tensors(model, example_inputs)
    with torch.inference_mode(False), torch.enable_grad():
        yield


def planning_training_in_grad_mode(fn: F) -> F:
    """``fn`` (an entry point taking ``model``, ``example_inputs`` and ``mode``)
    run under ``grad_mode_for``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        with grad_mode_for(given["mode"], given["model"], given["example_inputs"]):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_no_inference_tensors(model: Any, example_inputs: Any) -> None:
    leaves = pytree.tree_leaves(example_inputs)
    inputs = [
        f"example input {i}"
        for i, t in enumerate(leaves)
        if isinstance(t, torch.Tensor) and t.is_inference()
    ]
    weights: list[str] = []
    if isinstance(model, torch.nn.Module):
        named = [*model.named_parameters(), *model.named_buffers()]
        weights = [name for name, t in named if t.is_inference()]
    if inputs or weights:
        raise PlannerError(
            f"{listed(inputs + weights)} {'was' if len(inputs + weights) == 1 else 'were'} "
            f"made under torch.inference_mode(), and autograd cannot save such tensors for "
            f"a backward: planning mode='train' needs them made outside it (or cloned "
            f"outside it: x.clone())"
        )
