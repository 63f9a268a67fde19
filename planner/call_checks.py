"""What a call of a training plan must still match from when it was planned.

The planned step is one autograd node over the model's parameter objects and the
inputs as traced. Three things a caller can change afterwards would make it quietly
compute something else than eager would, so each is an error that says what to do:

- an input that requires grad now but did not when planned: the traced backward
  has no gradient for it, and ``x.grad`` would silently stay ``None``;
- ``create_graph=True``: the planned backward runs outside autograd (its ops write
  into planned buffers), so it cannot itself be differentiated;
- a parameter or buffer of the model replaced by a new object
  (``model.fc.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, a
  swapped submodule): the plan still reads, and hands gradients to, the old one.

(Every plan, inference too, also checks the autocast state: ``planner.ir.autocast``.)

The replaced-object check is watched through ``torch.nn``'s global registration hooks: every
registration anywhere bumps a counter, and a call walks its model only when the
counter moved since it last looked, so a steady training loop pays one integer
comparison per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from planner.errors import PlannerError

#: registrations of a parameter, buffer or submodule anywhere since the hooks went in
_registrations = 0
_hooks_installed = False


def _note_registration(*_args: object) -> None:
    global _registrations
    _registrations += 1


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.nn.modules import module

    module.register_module_parameter_registration_hook(_note_registration)
    module.register_module_buffer_registration_hook(_note_registration)
    module.register_module_module_registration_hook(_note_registration)
    _hooks_installed = True


class StateWatch:
    """The model's parameter and buffer objects a training plan was built over,
    by name; ``check()`` raises if the model now holds another object under one
    of those names."""

    def __init__(self, model: torch.nn.Module, held: dict[str, torch.Tensor]) -> None:
        _install_hooks()
        self.model = model
        self._held = held
        self._seen = _registrations

    def check(self) -> None:
        if self._seen == _registrations:
            return
        now: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        now.update(self.model.named_buffers(remove_duplicate=False))
        replaced = [name for name, tensor in self._held.items() if now.get(name) is not tensor]
        if replaced:
            shown = ", ".join(replaced[:5]) + (
                f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
            )
            raise PlannerError(
                f"model entries replaced since planning: {shown}. Each is no longer the "
                f"tensor this module was planned over (a new object, e.g. by assigning a "
                f"new nn.Parameter, "
                f"load_state_dict(..., assign=True) or a swapped submodule); the plan "
                f"would read, and give gradients to, the old one. Load new values in "
                f"place (load_state_dict without assign, or param.data.copy_(...)), or "
                f"call planner.plan again on the model as it is now"
            )
        self._seen = _registrations


def check_input_grads(
    planned: Sequence[bool], inputs: Sequence[torch.Tensor], names: Sequence[str]
) -> None:
    """Inputs that require grad now but were planned without: their gradient is
    not in the traced backward."""
    if not torch.is_grad_enabled():
        return
    missing = [
        _readable(name)
        for name, was, tensor in zip(names, planned, inputs)
        if tensor.requires_grad and not was
    ]
    if missing:
        raise PlannerError(
            f"input(s) {', '.join(missing)} require grad, but this module was planned with "
            f"example inputs that did not, so its backward computes no gradient for them. "
            f"Plan with example inputs that require grad where yours will "
            f"(x.requires_grad_()), or pass x.detach() if you need no gradient for it"
        )


def _readable(path: str) -> str:
    """``input[0][1]`` (capture's path into ``(args, kwargs)``) as ``args[1]``."""
    for flat, shown in (("input[0]", "args"), ("input[1]", "kwargs")):
        if path.startswith(flat):
            return shown + path[len(flat) :]
    return path


def check_not_create_graph() -> None:
    """Called from the planned backward: autograd enables grad mode there exactly
    when the caller asked for ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise PlannerError(
            "backward(create_graph=True) (higher-order gradients, gradient penalties) "
            "through a planned step is not supported: the planned backward writes into "
            "planned buffers and is not itself differentiable. Compute such terms "
            "with the unplanned model"
        )
