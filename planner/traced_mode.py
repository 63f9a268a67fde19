"""The model's train/eval mode is part of what a plan traced.

A model in training mode traces dropout as random ops and BatchNorm as batch
statistics that update the running ones; in eval mode, neither. A planned module
runs what was traced whatever ``pm.train()``/``pm.eval()`` says afterwards, so a
validation pass after ``pm.eval()`` would still draw dropout, silently. Calling a
training plan in the other mode is therefore an error that says what to do, where
the mode matters: the traced graph draws dropout or updates buffers, or the model
has modules whose behaviour depends on the mode: dropout with p > 0, batch and
instance norm with running statistics, and modules of the user's own whose code
reads ``self.training`` (``if self.training: h = h + noise``: the graph shows only
the branch traced); torch's and transformers' modules, which read it mostly for
dropout (which the graph shows), only where the graph draws random numbers. An
inference plan is never checked: it is for inference, and as a frozen part of a
larger model it is called whatever mode that model is in. And planning for
inference a model left in training mode (a model built from a config is) gets a
warning when its graph draws dropout or updates statistics because of it.
"""

from __future__ import annotations

import dis
import inspect
import types
import warnings
import weakref
from typing import Any

from torch import nn

from planner.errors import PlannerError, PlannerWarning
from planner.ir.meta import BUFFER_UPDATES
from planner.ir.program import Program

_MODE_DEPENDENT_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


#: modules of these packages read ``self.training`` mostly for dropout (in the
#: graph when it draws) and gradient checkpointing (no effect on what is
#: computed): held to their mode only where the graph draws random numbers
#: (transformers' DropPath draws with torch.rand: ConvNext after pm.eval() ran
#: its training-mode drop path, 0.02 from eager's evaluation)
_LIBRARIES = ("torch", "transformers")


def behaves_by_mode(module: nn.Module, draws_random: bool = False) -> bool:
    """Whether ``module`` computes something else in the other mode, by its own
    code (not its submodules'): dropout with p > 0, a norm with running
    statistics, a class of the user's whose methods read ``training``, and, in a
    graph that draws random numbers, one of torch's or transformers' that
    does."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.track_running_stats  # else batch statistics in both modes
    return _reads_training(type(module), draws_random)  # type: ignore[arg-type]


#: ``_reads_training``'s answers per class, for either ``libraries_too``: weakly keyed,
#: so planning does not keep a class alive, nor what it reaches (a class defined in
#: a factory, closing over the model's layers, held their weights after the plan
#: and the model were dropped: 8 MiB per training plan of a 4 MiB model)
_READS_TRAINING: dict[bool, weakref.WeakKeyDictionary[type, bool]] = {
    False: weakref.WeakKeyDictionary(),
    True: weakref.WeakKeyDictionary(),
}


def _reads_training(cls: type, libraries_too: bool) -> bool:
    cache = _READS_TRAINING[libraries_too]
    found = cache.get(cls)
    if found is None:
        found = cache[cls] = _scan_reads_training(cls, libraries_too)
    return found


def _scan_reads_training(cls: type, libraries_too: bool) -> bool:
    for klass in cls.__mro__:
        package = klass.__module__.partition(".")[0]
        if package == "builtins" or (package in _LIBRARIES and not libraries_too):
            continue
        if klass is nn.Module:
            continue
        for attr in vars(klass).values():
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            attr = inspect.unwrap(attr) if callable(attr) else attr  # @torch.no_grad()
            if _function_reads_training(attr, libraries_too, set(), depth=3):
                return True
    return False


def _function_reads_training(fn: Any, libraries_too: bool, seen: set[int], depth: int) -> bool:
    """Whether the function ``fn`` reads an attribute named ``training``, in its
    own code or in a module-level function of the user's it calls by name, up to
    ``depth`` calls deep: ``def noisy(module, h): return h + noise if
    module.training else h`` called from forward was missed, so a plan held the
    training branch after ``pm.eval()``."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or id(code) in seen:
        return False
    seen.add(id(code))
    if _names_training(code):
        return True
    if depth == 0:
        return False
    scope = getattr(fn, "__globals__", {})
    for name in _globals_called(code):
        called = scope.get(name)
        if not isinstance(called, types.FunctionType):
            continue
        package = (called.__module__ or "").partition(".")[0]
        if package in _LIBRARIES and not libraries_too:
            continue
        if _function_reads_training(inspect.unwrap(called), libraries_too, seen, depth - 1):
            return True
    return False


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names ``code`` and the code inside it use."""
    names = set(code.co_names)
    for inner in code.co_consts:
        if isinstance(inner, types.CodeType):
            names |= _names(inner)
    return names


def _globals_called(code: types.CodeType) -> set[str]:
    """The global names ``code`` and the code inside it load (not attribute names:
    ``self.scaled(...)`` does not lead to a module-level ``scaled``)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for inner in code.co_consts:
        if isinstance(inner, types.CodeType):
            names |= _globals_called(inner)
    return names


def _names_training(code: types.CodeType) -> bool:
    """Whether ``code`` (or a function, lambda or comprehension inside it) reads
    an attribute named ``training``."""
    return "training" in _names(code)


def draws_random(program: Program) -> bool:
    return any(op.draws_random for op in program.ops)


def _draws_dropout(program: Program) -> bool:
    """Dropout's ops (``native_dropout``, or ``bernoulli`` as some models draw its
    mask; other random ops, a VAE's or a diffusion model's noise, draw in either
    mode)."""
    return any(
        op.draws_random and ("dropout" in op.target or "bernoulli" in op.target)
        for op in program.ops
    )


def _updates_norm_statistics(model: nn.Module, program: Program) -> bool:
    """Whether a buffer the graph updates is a batch or instance norm's running
    statistic: those update because the norm is in training mode. Other updated
    buffers (a static key/value cache written at each decoding step) are what the
    model does in either mode."""
    for name in program.meta.get(BUFFER_UPDATES, ()):
        owner, _, _ = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, _MODE_DEPENDENT_MODULES):
            return True
    return False


def depends_on_mode(model: nn.Module, program: Program) -> bool:
    """Whether ``model`` would compute something else in the other mode: it draws
    dropout, updates buffers (any: a training step that writes a buffer is not
    assumed to write it in eval mode too), or has modules that behave by mode."""
    if _draws_dropout(program) or program.meta.get(BUFFER_UPDATES):
        return True
    draws = draws_random(program)
    return any(behaves_by_mode(m, draws) for m in model.modules())


def _name(training: bool) -> str:
    return "training" if training else "eval"


def check_call_mode(traced_training: bool, training: bool, switched: str = "pm") -> None:
    """Raise if a module traced in one mode is called in the other: ``training``
    is the mode of ``switched``, the planned module or the model it was planned
    from (``model.eval()`` switches the model's modules, not the planned one's
    flag; it went unnoticed, and the step drew dropout)."""
    if training == traced_training:
        return
    if training:
        todo = "to train in training mode, plan the model again after model.train()"
    else:
        todo = (
            "to evaluate, plan a copy for inference, planner.plan(copy.deepcopy(model)"
            ".eval(), budget, example_inputs, mode='infer') (an inference plan takes the "
            "weights it keeps off the device out of the model it is given), or run the "
            "model itself under torch.no_grad() after model.eval() if it fits"
        )
    what = "the model" if switched in ("pm", "model") else switched
    raise PlannerError(
        f"this module was planned with {what} in {_name(traced_training)} mode and is "
        f"now in {_name(training)} mode; a plan runs what it traced (dropout, batch "
        f"statistics), so {switched}.{'train' if training else 'eval'}() cannot change it: "
        f"{todo}; or call {switched}.{'eval' if training else 'train'}() to use this one"
    )


class ModeWatch:
    """The train/eval flag, as traced, of the model itself and of each of its
    modules that behave by mode (``behaves_by_mode``); ``check()``
    raises if one was switched since: ``model.eval()``, or one submodule's
    (``model.encoder.dropout.eval()``), which the model's own flag does not show.
    A model planned with some of them in another mode than the rest (batch norms
    frozen in eval mode while the rest trains) is checked against that."""

    def __init__(self, model: nn.Module, draws_random: bool = False) -> None:
        self._flags = [("model", model, model.training)] + [
            (f"model.{name}", m, m.training)
            for name, m in model.named_modules()
            if name and behaves_by_mode(m, draws_random)
        ]

    def check(self) -> None:
        for name, module, traced in self._flags:
            if module.training != traced:
                check_call_mode(traced, module.training, name)


def warn_if_inference_traced_in_training(model: nn.Module, program: Program) -> None:
    """Planning for inference a model in training mode whose graph draws dropout or
    updates norm statistics because of it."""
    if not model.training:
        return
    effects = []
    if _draws_dropout(program):
        effects.append("draws dropout")
    if _updates_norm_statistics(model, program):
        effects.append("updates BatchNorm statistics")
    if not effects:
        return
    effect = " and ".join(effects)
    warnings.warn(
        f"{type(model).__name__} is in training mode, so its inference plan {effect}; "
        f"call model.eval() before planner.plan(..., mode='infer') if you meant evaluation",
        PlannerWarning,
        stacklevel=3,
    )
