"""Planning for training whatever grad mode the caller is in.

``mode="train"`` traces the backward and runs steps to measure them, which needs
grad mode. A caller inside ``torch.no_grad()`` (a set-up function decorated with
it, a ``torch.set_grad_enabled(False)`` earlier) got an error that blamed the
model's forward for cutting the graph. The mode asked for is plain, so training
is planned with grad mode on, and out of ``torch.inference_mode``. What cannot be
planned that way is named instead: example inputs or weights made under
inference mode, once the trace has met one that the backward saves, which
autograd refuses (one it does not save, a buffer only added, trains as in eager).
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
    with torch.inference_mode(False), torch.enable_grad():
        try:
            yield
        except Exception as error:
            if not any(said in str(error) for said in _INFERENCE_TENSOR_ERRORS):
                raise
            named = _inference_tensors(model, example_inputs)
            if not named:
                raise
            raise PlannerError(
                f"{listed(named)} {'was' if len(named) == 1 else 'were'} made under "
                f"torch.inference_mode(), and the traced step saves or differentiates "
                f"{'it' if len(named) == 1 else 'one of them'}, which autograd refuses for "
                f"such tensors: planning mode='train' needs them made outside it (or cloned "
                f"outside it: x.clone())"
            ) from error


def planning_training_in_grad_mode(fn: F) -> F:
    """``fn`` (an entry point taking ``model``, ``example_inputs`` and ``mode``)
    run under ``grad_mode_for``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:  # as Python says it: name the function
            raise TypeError(f"{fn.__name__}() {error}") from None
        bound.apply_defaults()
        given = bound.arguments
        with grad_mode_for(given["mode"], given["model"], given["example_inputs"]):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: torch's errors where the trace would save an inference tensor for the backward,
#: or make one (a parameter) require grad
_INFERENCE_TENSOR_ERRORS = (
    "Inference tensors cannot be saved for backward",
    "on inference tensor outside InferenceMode",
)


def _inference_tensors(model: Any, example_inputs: Any) -> list[str]:
    """The example inputs, parameters and buffers made under inference mode (one
    the backward does not save, such as a buffer only added, trains as in eager:
    this names them only once the trace has met one it must save)."""
    leaves = pytree.tree_leaves(example_inputs)
    named = [
        f"example input {i}"
        for i, t in enumerate(leaves)
        if isinstance(t, torch.Tensor) and t.is_inference()
    ]
    if isinstance(model, torch.nn.Module):
        state = [*model.named_parameters(), *model.named_buffers()]
        named += [name for name, t in state if t.is_inference()]
    return named
