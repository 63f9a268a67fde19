"""Hooks on the model, and what a planned call does with them.

A trace runs the model once. Forward hooks and pre-hooks present then are called
during it: what they compute becomes ops of the plan, but a planned call never calls
them again, so a hook that records activations records nothing. Module backward
hooks (``register_full_backward_hook``) are not in the traced graph at all: a
training plan silently left out a hook that scaled a layer's input gradient. Hooks
registered or removed after planning are not in the plan either.

So: module backward hooks are an error when planning a training step; the caller's
forward hooks present when planning warn that they ran once (not transformers' own
output recorders); and ``HookWatch`` makes a call an error once the model's hooks
differ from those the trace left (a model may install hooks of its own in its
first forward). Tensor hooks on parameters
(``p.register_hook``) are run by autograd when the plan returns a gradient through
it; a gradient the plan delivers straight into ``.grad`` (``Runtime.deliver``)
would pass them by (the hook was called with ``None``), so a hooked parameter's
gradient is never delivered (``hooked_parameters``), and one hooked after planning
whose gradient is delivered is an error at the call.

Every hook handle torch makes takes the next number of one global counter
(``RemovableHandle.next_id``), so a call compares one integer (and the sizes of the
few hook dicts that held hooks when planned, where a removal would show) and walks
the model only when some hook was registered anywhere since it last looked.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from planner.errors import CaptureError, PlannerError, PlannerWarning, listed, user_stacklevel

#: module attribute -> what it is called in messages
_FORWARD_KINDS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook"}
_BACKWARD_KINDS = {
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}

#: (module path, or "all modules" for torch.nn's global hooks; kind) -> hook ids
Hooks = dict[tuple[str, str], frozenset[int]]


def _hook_dicts(model: torch.nn.Module, backward: bool) -> list[tuple[str, str, dict]]:
    """(module path, kind, the dict torch keeps those hooks in) for the model's
    forward hooks (and, if ``backward``, its backward hooks), including torch.nn's
    global ones ("all modules")."""
    kinds = {**_FORWARD_KINDS, **(_BACKWARD_KINDS if backward else {})}
    found = [
        ("all modules", kind, getattr(nn_module, f"_global{attr}")) for attr, kind in kinds.items()
    ]
    for path, submodule in model.named_modules():
        for attr, kind in kinds.items():
            hooks = getattr(submodule, attr, None)
            if hooks is not None:
                found.append((path or type(model).__name__, kind, hooks))
    return found


def module_hooks(model: torch.nn.Module, backward: bool) -> Hooks:
    """The ids of the model's hooks (as ``_hook_dicts``) by module and kind, but
    for torch's module trackers' (``_TRACKING_HOOKS``)."""
    found = {
        (path, kind): frozenset(k for k, h in hooks.items() if not _tracking(h))
        for path, kind, hooks in _hook_dicts(model, backward)
        if hooks
    }
    return {key: ids for key, ids in found.items() if ids}


#: modules of torch's tools whose global module hooks only record which module
#: runs (``torch.utils.flop_counter.FlopCounterMode`` installs
#: ``ModuleTracker``'s): a call inside such a tool was refused as "hooks registered
#: since planning on all modules", which the caller never registered
_TRACKING_HOOKS = ("torch.utils.module_tracker", "torch.distributed._tools.mod_tracker")


def _tracking(hook: object) -> bool:
    function = getattr(hook, "__func__", getattr(hook, "func", hook))
    return (getattr(function, "__module__", "") or "").startswith(_TRACKING_HOOKS)


def hooked_parameters(model: torch.nn.Module) -> frozenset[str]:
    """Names of the parameters with tensor hooks (``p.register_hook``)."""
    return frozenset(
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if p._backward_hooks  # type: ignore[attr-defined]
    )


def check_hooks_at_capture(model: torch.nn.Module, mode: str) -> None:
    """Before tracing: module backward hooks of a training step are an error,
    forward hooks a warning."""
    found = _hook_dicts(model, backward=mode == "train")  # one walk for both
    backward = [
        f"{path} ({kind})"
        for path, kind, hooks in found
        if hooks and kind in _BACKWARD_KINDS.values()
    ]
    if backward:
        raise CaptureError(
            f"{type(model).__name__} has module backward hooks on {listed(backward)}: a "
            f"planned training step does not run them (they are not part of the traced "
            f"graph). Remove them before planning; a tensor hook on a parameter "
            f"(p.register_hook), which autograd runs on its gradient, is supported"
        )
    forward = [
        f"{path} ({kind})"
        for path, kind, hooks in found
        if kind in _FORWARD_KINDS.values() and any(not _models_own(h) for h in hooks.values())
    ]
    if forward:
        warnings.warn(
            f"forward hooks on {listed(forward)} ran once, while tracing: what they "
            f"compute is part of the plan, but a planned call does not call them (a hook "
            f"that records activations records nothing). Return what you need from "
            f"forward instead",
            PlannerWarning,
            stacklevel=user_stacklevel(),
        )


class HookWatch:
    """``check()`` raises once the model's hooks differ from those it was planned
    with, or a parameter whose gradient the plan delivers has a tensor hook."""

    def __init__(
        self,
        model: torch.nn.Module,
        planned: Hooks,
        mode: str,
        delivered: Collection[tuple[str, torch.Tensor]] = (),
    ) -> None:
        self.model = model
        self._planned = planned
        self._backward = mode == "train"
        self._delivered = list(delivered)
        self._seen = RemovableHandle.next_id
        # a removal takes no new handle: the dicts that held hooks when planned are
        # where one can be removed from (usually none: nothing to look at per call)
        self._held = [
            (hooks, len(hooks)) for _, _, hooks in _hook_dicts(model, self._backward) if hooks
        ]

    def check(self) -> None:
        if RemovableHandle.next_id == self._seen and all(len(d) == n for d, n in self._held):
            return
        now = module_hooks(self.model, self._backward)
        if now != self._planned:
            changed = [
                f"{path} ({kind})"
                for path, kind in sorted(set(now) | set(self._planned))
                if now.get((path, kind)) != self._planned.get((path, kind))
            ]
            raise PlannerError(
                f"hooks registered or removed since planning on {listed(changed)}: the "
                f"plan runs the model as traced, which ran the forward hooks present when "
                f"planned (once, while tracing) and no backward hooks. Put the hooks back "
                f"as they were, or call planner.plan again with the hooks in place"
            )
        hooked = [name for name, p in self._delivered if p._backward_hooks]  # type: ignore[attr-defined]
        if hooked:
            raise PlannerError(
                f"tensor hooks registered since planning on {listed(hooked)}, whose "
                f"gradients the plan writes straight into .grad, past any hook: call "
                f"planner.plan again with the hooks in place (their gradients then go "
                f"through autograd, which runs them)"
            )
        self._seen = RemovableHandle.next_id


#: modules whose hooks are a model's own, installed by its forward and recording
#: only on request (transformers' output capturing: every layer of a model called
#: once before planning had one, and the warning listed them all)
_MODELS_OWN_HOOKS = ("transformers.utils.output_capturing",)
#: hooks by (module, name) that change what the trace sees, nothing else:
#: ``gradient_checkpointing_enable()`` (through ``enable_input_require_grads``)
#: makes the input embeddings' output require grad, which the traced step keeps;
#: every plan of such a model warned of it
_TRACED_IN_HOOKS = frozenset({("transformers.modeling_utils", "make_inputs_require_grads")})


def _models_own(hook: object) -> bool:
    function = getattr(hook, "func", hook)  # functools.partial
    module = getattr(function, "__module__", "") or ""
    if (module, getattr(function, "__name__", "")) in _TRACED_IN_HOOKS:
        return True
    return module.startswith(_MODELS_OWN_HOOKS)
