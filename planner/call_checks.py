"""What a call of a plan must still match from when it was planned.

The planned step is one autograd node over the model's parameter objects and the
inputs as traced. Things a caller can change afterwards would make it quietly
compute something else than eager would, so each is an error that says what to do:

- any plan: arguments other than those traced (``PlannedCall``): other shapes or
  dtypes, another Python value of a non-tensor argument (the trace took it as a
  constant), and, with grad enabled, an input that requires grad where the example
  did not (the traced backward has no gradient for it: ``x.grad`` stayed ``None``);
- training, ``create_graph=True``: the planned backward runs outside autograd (its
  ops write into planned buffers), so it cannot itself be differentiated; nor can
  it take gradients batched by ``is_grads_batched=True`` (``check_not_batched``), or
  run under a ``torch.func`` transform (``check_not_functorch_transform``);
- training, ``torch.autograd.grad`` or ``backward(inputs=...)`` leaving out a
  parameter whose gradient the plan writes into ``.grad`` itself
  (``check_deliveries_wanted``);
- training, a parameter or buffer of the model replaced by a new object
  (``model.fc.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, a
  swapped submodule): the plan still reads, and hands gradients to, the old one
  (``StateWatch``);
- any plan, its own parameters or buffers swapped for other tensors for a call
  (``torch.func.functional_call(pm, {...}, x)``, ``torch.nn.utils.stateless``),
  or set as attributes where it holds no such name (``SwapWatch``): the plan
  computes with the tensors it was planned over, so it silently ignored the
  tensors given (a planned ``nn.Linear`` returned its own weights' output);
- training, a tensor the backward reads written in place between forward and
  backward (``BackwardReads``, eager autograd's version check);
- training, a parameter the plan homes in a tier whose data is no longer the map
  of its file there (``TierParams``): another training plan of the same model took
  it over, or ``param.data = ...``; the plan would read the file's stale values;
- training, a parameter frozen when planned and unfrozen since
  (``check_not_unfrozen``): the traced backward computes no gradient for it, so it
  silently stopped training (freezing one after planning is fine: autograd drops the
  gradient the plan still computes);
- any plan, the model converted after planning (``model.half()``, ``.to(...)``):
  this swaps a parameter's data, not the object, and the planned ops then fail on
  mixed dtypes or devices. Nothing is checked per call for it: after a failed run,
  ``StateTypes`` says whether this is why.

(Every plan also checks the autocast state: ``planner.ir.autocast``.)

``StateWatch`` listens to ``torch.nn``'s global registration hooks: every
registration anywhere bumps a counter, and a call walks its model only when the
counter moved since it last looked, so a steady training loop pays one integer
comparison per step.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch._prims_common import suggest_memory_format
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree

from planner.errors import PlannerError, PlannerWarning, listed, user_stacklevel
from planner.ir.layout import strides_that_matter
from planner.ir.program import Phase, Program, ValueKind
from planner.model_slots import find_slot
from planner.released import ReleasedWeight

if TYPE_CHECKING:  # capture imports this module, and the solver imports capture
    from planner.solver.plan import Plan
    from planner.solver.problem import Problem

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
    """The model's parameter and buffer objects a plan reads in place, by name (a
    training plan: all of them; an inference plan: those it keeps on the device,
    the rest leave the model); ``check()`` raises if the model now holds another
    object under one of those names. An inference plan given a new
    ``nn.Parameter`` went on with the old one, silently (a README audit)."""

    def __init__(self, model: torch.nn.Module, held: dict[str, torch.Tensor]) -> None:
        _install_hooks()
        self.model = model
        self.held: dict[str, torch.Tensor] = {}
        self._seen = _registrations
        #: each held tensor's dtype, shape and device when planned: whether the run
        #: will fail on a conversion in place (``check``)
        self._planned: dict[str, tuple] = {}
        # Each held tensor's slot (its owner's _parameters or _buffers, the key):
        # nn.Module._apply (model.half().float(), .double().float(), .cuda().cpu())
        # puts a new object in each buffer's slot by assigning the dict, which
        # fires no registration hook, so the counter alone missed it and the plan
        # went on reading the old buffers, silently
        # With it, each held tensor's dtype when planned: model.double() converts
        # parameters in place (same objects), and where nothing else changed (no
        # buffer, every weight kept) the run went on in float64, over the budget,
        # silently
        self._slots: dict[str, tuple[dict, str, torch.Tensor, torch.dtype]] = {}
        for name, tensor in held.items():
            self.expect(name, tensor)

    def expect(self, name: str, tensor: torch.Tensor) -> None:
        """Watch ``name`` as holding ``tensor`` from now on (at planning, and where
        the plan itself puts another tensor there: a frozen weight's quantized
        stand-in; set behind the watch's back, every call took the slow path and
        the planned placement was missing)."""
        self.held[name] = tensor
        self._planned[name] = _placed(tensor)
        found = find_slot(self.model, name)
        if found is not None and found[0][found[1]] is tensor:
            self._slots[name] = (*found, tensor, tensor.dtype)
        else:
            self._slots.pop(name, None)

    def check(self) -> None:
        registered = self._seen != _registrations
        if not registered:
            for slots, key, tensor, dtype in self._slots.values():  # no frame
                if slots.get(key) is not tensor or tensor.dtype is not dtype:
                    break
            else:
                return
        now: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        now.update(self.model.named_buffers(remove_duplicate=False))
        replaced = [name for name, tensor in self.held.items() if now.get(name) is not tensor]
        placed = {name: _placed(tensor) for name, tensor in self.held.items()}
        retyped = [
            (name, self._planned[name], now_placed)
            for name, now_placed in placed.items()
            if now_placed[1] != self._planned[name][1]
        ]
        if retyped:  # the run may fail on mixed dtypes, or go on over the budget
            raise PlannerError(_changed_since_planning(retyped))
        if any(placed[name] != was for name, was in self._planned.items()):
            # nn.Module._apply moved the held tensors in place (another device: a
            # change of dtype is refused above). That is left to the run, which
            # fails on the mixed devices and names what changed (StateTypes); a
            # buffer moved and back is a new object planned as the old one:
            # replaced. Where no held tensor changed in place, the run reads only the
            # old tensors and does not fail: whatever its dtype, shape or device a new
            # object is a replacement, never left out (model.fc.weight =
            # nn.Parameter(...), load_state_dict(assign=True) of a bfloat16
            # checkpoint, a slot written directly, or model.double() under torch.
            # __future__.set_overwrite_module_params_on_conversion(True), which makes
            # new parameters too: the plan ran on with the old weights, silently, and
            # a training step gave them, not the model's, the gradients). Not keyed
            # on the registration counter: any module built anywhere moves it (a
            # model.double() after building a loss head was called "replaced")
            replaced = [
                n
                for n in replaced
                if not isinstance(t := now.get(n), torch.Tensor)
                or isinstance(t, ReleasedWeight)
                or _placed(t) == placed[n]
            ]
        taken = [(n, t) for n in replaced if isinstance(t := now.get(n), ReleasedWeight)]
        if taken:  # not replaced by the user: a later inference plan took them
            raise PlannerError(
                f"{listed([n for n, _ in taken])}: a later planner.plan of this model took "
                f"{'it' if len(taken) == 1 else 'them'} "
                f"({taken[0][1].taken_by}), and this module reads "
                f"{'it' if len(taken) == 1 else 'them'} from the model. One model's weights "
                f"serve one planned module: plan a copy of the model for each module "
                f"(planner.plan(copy.deepcopy(model), ...) before the first plan), or use "
                f"the later module"
            )
        if replaced:
            raise PlannerError(
                f"model entries replaced since planning: {listed(replaced)}. Each is no longer the "
                f"tensor this module was planned over (a new object, e.g. by assigning a "
                f"new nn.Parameter, load_state_dict(..., assign=True), a swapped "
                f"submodule, or converting the model and back, model.half().float(), "
                f"which makes new buffers); the plan would read, and give gradients to, "
                f"the old one. "
                f"Load new values in "
                f"place (load_state_dict without assign, or param.data.copy_(...)), or "
                f"call planner.plan again on the model as it is now"
            )
        self._seen = _registrations


class SwapWatch:
    """The tensors a planned module holds in its own ``_parameters`` and
    ``_buffers`` (training: the model's, under the model's names), and the model's
    top-level state names it does not hold; ``check()`` raises if one of the held
    is now another object or one of those names is set on the module.

    ``torch.func.functional_call`` (``torch.nn.utils.stateless``) swaps a module's
    tensors by writing those dicts directly (no registration hook sees it), or sets
    an attribute where the module holds no such name, for the length of one call.
    The plan computes with the tensors it was planned over, so such a call
    silently returned what the module's own weights give, and no gradient for the
    tensors passed (dotted names fail earlier, in ``PlannedModule.__getattr__``).
    A steady loop pays one C-level identity pass over the held tensors."""

    def __init__(self, module: torch.nn.Module, model_own_names: Sequence[str]) -> None:
        """``model_own_names``: the names of the model's own parameters and
        buffers (not its submodules': a swap of those fails at the dotted name)."""
        self._module = module
        # as planned: the module's own dicts, copied (those dicts are what a swap writes)
        self._params = dict(module._parameters)
        self._buffers = dict(module._buffers)
        own = self._params.keys() | self._buffers.keys()
        self._top = frozenset(model_own_names) - own

    def check(self) -> None:
        module = self._module
        if (
            len(module._parameters) == len(self._params)
            and len(module._buffers) == len(self._buffers)
            and all(map(operator.is_, module._parameters.values(), self._params.values()))
            and all(map(operator.is_, module._buffers.values(), self._buffers.values()))
            and self._top.isdisjoint(module.__dict__)
        ):
            return
        pairs = ((self._params, module._parameters), (self._buffers, module._buffers))
        swapped = [
            name
            for planned, now in pairs
            for name, tensor in planned.items()
            if now.get(name) is not tensor
        ]
        swapped += sorted(  # the module's own attributes (plan, measured) are no tensors
            n
            for n in self._top.intersection(module.__dict__)
            if isinstance(module.__dict__[n], torch.Tensor)
        )
        if not swapped:  # entries added, none of ours replaced: not a swap
            return
        raise PlannerError(
            f"this planned module's {listed(swapped)} "
            f"{'is' if len(swapped) == 1 else 'are'} not the tensor"
            f"{'' if len(swapped) == 1 else 's'} it was planned over: swapped for this "
            f"call, as torch.func.functional_call(pm, ...) (torch.nn.utils.stateless) "
            f"does. The plan computes with the tensors it was planned over, so it would "
            f"ignore those given (return its own weights' result, and no gradient for "
            f"them). Call functional_call (or torch.func.grad over it) on "
            f"the model itself, unplanned; or load the values in place "
            f"(pm.load_state_dict(...), p.data.copy_(...)) and call the planned module"
        )


class TierParams:
    """The parameters a training plan homes in a tier, each with the address of its
    data then: a map of its file in the plan's store, which the optimizer updates in
    place and each step reads. ``check()`` raises if one's data is now elsewhere.

    A second ``planner.plan`` of the same model for training (another batch size)
    takes the same parameter objects and points their data at its own copy (its own
    file, or memory), so the first module would train on values the optimizer no
    longer updates, its losses drifting from eager's with no error: found by a
    two-shape training loop. Comparing a few addresses per step is cheap."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._params = [(name, p, p.data_ptr()) for name, p in params]

    def check(self) -> None:
        moved = [name for name, p, address in self._params if p.data_ptr() != address]
        if moved:
            raise PlannerError(
                f"{listed(moved)}: this plan keeps {'it' if len(moved) == 1 else 'them'} in "
                f"its offload store and reads each step's values from there, but the "
                f"parameter's data was pointed elsewhere since, so the plan would train on "
                f"values it no longer holds. Causes: model.half(), model.to(...) or "
                f"param.data = ... (converting back does not return the data to the store: "
                f"convert, then call planner.plan again); or another planner.plan of this "
                f"model for training, which takes over the same parameters (to train on "
                f"several input shapes, plan them in one call: planner.plan(..., "
                f"mode='train', extra_example_inputs=[...]))"
            )


class StateTypes:
    """The dtype, device and shape each model tensor a plan reads in place had when
    planned, to explain a failed run: converting the model afterwards
    (``model.half()``) surfaced as torch's "self and mat2 must have the same dtype"
    from inside the executor, naming nothing the caller wrote."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._named = list(named)
        self._planned = [_placed(t) for _, t in self._named]

    def changed(self) -> str | None:
        """A message naming the tensors now of another dtype, device or shape than
        planned, or ``None`` where all are as planned."""
        moved = [
            (name, was, now)
            for (name, t), was in zip(self._named, self._planned)
            if (now := _placed(t)) != was
        ]
        return _changed_since_planning(moved) if moved else None


def _changed_since_planning(moved: Sequence[tuple[str, tuple, tuple]]) -> str:
    """The message for model tensors (name, placement when planned, now) that
    changed dtype, device or shape since planning."""
    shown = [f"{name} ({_shown(was)} when planned, now {_shown(now)})" for name, was, now in moved]
    return (
        f"the model's tensors changed dtype, device or shape since planning: "
        f"{listed(shown, 3, '; ')} (model.half(), model.to(...) or "
        f"param.data = ... after planning). The plan is sized and traced for them "
        f"as they were: convert the model before calling planner.plan, or convert "
        f"it back (a model with buffers: plan again, since converting makes new "
        f"buffer objects)"
    )


def _placed(tensor: torch.Tensor) -> tuple[tuple[int, ...], str, str]:
    return (*_meta(tensor), str(tensor.device))


def _shown(placed: tuple[tuple[int, ...], str, str]) -> str:
    shape, dtype, device = placed
    return f"{dtype} {list(shape)} on {device}"


def _readable(path: str) -> str:
    """``[0][1]`` (a path into ``(args, kwargs)``) as ``args[1]``."""
    for flat, shown in (("[0]", "args"), ("[1]", "kwargs")):
        if path.startswith(flat):
            return shown + path[len(flat) :]
    return path


def _kind(value: Any) -> str:
    """ "Tensor", "None", or the value's type name ("float", "ndarray")."""
    if isinstance(value, torch.Tensor):
        return "Tensor"
    return "None" if value is None else type(value).__name__


def _a(kind: str) -> str:
    """``kind`` in a sentence: "None", "a Tensor", "an ndarray"."""
    if kind == "None":
        return kind
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _signature(spec: pytree.TreeSpec, kinds: list[str]) -> str:
    """The call's arguments as their nesting and kinds: ``(Tensor, mask=[Tensor])``."""
    args, kwargs = pytree.tree_unflatten([_Kind(k) for k in kinds], spec)
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"({', '.join(shown)})"


class _Kind(str):
    """A leaf's kind, shown unquoted inside a nesting's repr."""

    def __repr__(self) -> str:
        return str(self)


class PlannedCall:
    """The arguments a plan was traced with, as a call must give them again.

    Tensors: the same shapes and dtypes (a plan is sized for them), and no input
    that requires grad where the example did not (the traced backward has no
    gradient for it). Everything else (``use_cache=False``, ``scale=2.0``) the trace
    took as a constant of the graph, so it must be equal: another value silently ran
    the planned one (``flag=True`` gave what ``flag=False`` computes)."""

    def __init__(self, args: tuple, kwargs: dict, mode: str, formats_matter: bool = True) -> None:
        """``formats_matter``: an op of the plan computes by its inputs' memory
        format (``reads_memory_format``), so a call's inputs must have theirs."""
        leaves, self.spec = pytree.tree_flatten_with_path((args, kwargs))
        #: planned as plain positional tensors (``pm(x)``, ``pm(x, y)``): a call of
        #: that shape skips pytree, which took 12 of a 4-layer MLP's 40 us per call
        self.positional = (
            len(args)
            if not kwargs
            and all(type(a) is torch.Tensor or isinstance(a, torch.nn.Parameter) for a in args)
            else None
        )
        self.mode = mode
        self.keywords = list(kwargs)
        #: the shape and dtype of each tensor passed directly (not nested), by
        #: position or keyword: ``ruled_out`` tells a call of another shape by them
        self.direct_tensors = {
            key: (value.shape, value.dtype)
            for key, value in [*enumerate(args), *kwargs.items()]
            if isinstance(value, torch.Tensor)
        }
        tensors = [(pytree.keystr(path), x) for path, x in leaves if isinstance(x, torch.Tensor)]
        self.tensor_names = [_readable(name) for name, _ in tensors]
        self.meta = [_meta(t) for _, t in tensors]
        self.strides = [_layout(t) for _, t in tensors]
        self.formats = [_memory_format(t) if formats_matter else None for _, t in tensors]
        self.devices = [t.device for _, t in tensors]
        #: each example tensor's exact shape, dtype, device and strides: a call whose
        #: tensors have these passes the shape, dtype, device and layout checks
        #: without working each out (``_checked``'s fast path)
        self.exact = [_exact(t) for _, t in tensors]
        self.requires_grad = [t.requires_grad for _, t in tensors]
        #: positions of example tensors that were one tensor (``attention(x, x, x)``)
        self.same = _same_tensors([t for _, t in tensors])
        self.constant_names = [
            _readable(pytree.keystr(path)) for path, x in leaves if not isinstance(x, torch.Tensor)
        ]
        self.constants = [_constant(x) for _, x in leaves if not isinstance(x, torch.Tensor)]
        #: every leaf's name and kind ("Tensor", "float", "None"), for messages
        self.leaf_names = [_readable(pytree.keystr(path)) for path, _ in leaves]
        self.kinds = [_kind(x) for _, x in leaves]

    def ruled_out(self, args: tuple, kwargs: dict) -> bool:
        """Whether a tensor passed directly has another shape or dtype than planned:
        a quick test that skips ``flatten``'s message for each shape a
        several-shape module does not serve (5 us each)."""
        for key, (shape, dtype) in self.direct_tensors.items():
            value = args[key] if isinstance(key, int) and key < len(args) else kwargs.get(key)
            if isinstance(value, torch.Tensor) and (value.shape != shape or value.dtype != dtype):
                return True
        return False

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The call's tensors, in the traced order, once they match the plan: the
        same shapes, dtypes and layouts as traced."""
        if (
            self.positional is not None
            and not kwargs
            and len(args) == self.positional
            and all(type(a) is torch.Tensor for a in args)
        ):
            return self._checked(list(args))
        if list(kwargs) != self.keywords and set(kwargs) == set(self.keywords):
            kwargs = {k: kwargs[k] for k in self.keywords}  # keyword order is the caller's
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            raise PlannerError(
                f"this module was planned as pm{_signature(self.spec, self.kinds)}, and is "
                f"called as pm{_signature(spec, [_kind(x) for x in leaves])}. A plan is "
                f"specific to the arguments it was planned with: call it as planned, or "
                f"call planner.plan again with example inputs like these"
            )
        for name, planned, leaf in zip(self.leaf_names, self.kinds, leaves):
            if (planned == "Tensor") != isinstance(leaf, torch.Tensor):
                convert = " (torch.as_tensor(...) for an array)" if planned == "Tensor" else ""
                raise PlannerError(
                    f"{name} is {_a(_kind(leaf))} here and was {_a(planned)} when planned "
                    f"(the trace takes tensors as inputs and everything else as a "
                    f"constant): pass {_a(planned)} as planned{convert}, or call "
                    f"planner.plan again with example inputs like these"
                )
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        constants = [_constant(x) for x in leaves if not isinstance(x, torch.Tensor)]
        if constants != self.constants:
            name, planned, now = next(
                (name, a[1], b[1])
                for name, a, b in zip(self.constant_names, self.constants, constants)
                if a != b
            )
            if type(now) is not type(planned):  # 2 for 2.0: equal values, other code
                now_shown = f"{now!r} ({_a(type(now).__name__)})"
                planned_shown = f"{planned!r} ({_a(type(planned).__name__)})"
            else:
                now_shown, planned_shown = repr(now), repr(planned)
            number = type(now) in (int, float) and type(now) is type(planned)
            as_tensor = (
                f"; or, where forward only computes with it (a loss's num_items_in_batch, a "
                f"scale; not a shape or a branch), pass it as a tensor, torch.tensor({now!r}), "
                f"when planning and at every call: the trace then reads it as an input"
                if number
                else ""
            )
            raise PlannerError(
                f"{name} is {now_shown} here and was {planned_shown} when planned: the trace took "
                f"it as a constant, so this plan computes what {planned!r} gives. Call "
                f"planner.plan again with example inputs where {name} is {now!r} (one "
                f"planned module per value){as_tensor}"
            )
        return self._checked(tensors)

    def _checked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` (the call's, in traced order) once they match the plan."""
        if [_exact(t) for t in tensors] == self.exact:  # as traced: shapes to layouts
            if self.same:
                self._check_same(tensors)
            if torch.is_grad_enabled():
                self._check_grads(tensors)
            return tensors
        got = [_meta(t) for t in tensors]
        if got != self.meta:
            raise PlannerError(
                f"this module was planned for inputs {self.meta} (shape, dtype); got "
                f"{got}. A plan is specific to its input shapes and dtypes: plan every "
                f"shape the module must serve in one call (planner.plan(..., "
                f"extra_example_inputs=[...])), or call planner.plan again with example "
                f"inputs like these"
            )
        for name, planned, tensor in zip(self.tensor_names, self.devices, tensors):
            if tensor.device != planned:
                raise PlannerError(
                    f"input {name} is on {tensor.device} and was planned on {planned}: "
                    f"pass it there ({name}.to('{planned}')), or plan with example inputs "
                    f"on its device"
                )
        if self.same:
            self._check_same(tensors)
        self._check_strides(tensors)
        if torch.is_grad_enabled():
            self._check_grads(tensors)
        return tensors

    def _check_same(self, tensors: list[torch.Tensor]) -> None:
        """The trace took example arguments that were one tensor for one input, so
        the plan reads one of them for all: ``model(x, x)`` planned, then called as
        ``model(x, y)``, computed ``model(y, y)``."""
        for group in self.same:
            first = _identity(tensors[group[0]])
            differ = [i for i in group[1:] if _identity(tensors[i]) != first]
            if differ:
                names = [self.tensor_names[i] for i in (group[0], *differ)]
                raise PlannerError(
                    f"{' and '.join(names)} were one tensor in the example inputs, so the "
                    f"trace made them one input, and here they differ: this plan would read "
                    f"one of them for all. Plan with distinct example tensors where "
                    f"yours will differ (e.g. labels=ids.clone())"
                )

    def _check_strides(self, tensors: list[torch.Tensor]) -> None:
        """The inputs laid out as traced. Compiled (Inductor) runs are specialized
        to the layout; and eager kernels may copy an input laid out otherwise (a
        matmul given a strided view makes it contiguous), memory the plan never
        counted: a 2048x256 input to a Linear, given as a stride-2 view, put the
        step 1.6 MB over its 3.3 MB budget."""
        for name, planned, tensor in zip(self.tensor_names, self.strides, tensors):
            if tensor.layout != torch.strided:  # its "strides" are no layout to match:
                # ".contiguous()" was the advice, which leaves a sparse tensor sparse
                raise PlannerError(
                    f"input {name} is a {tensor.layout} tensor, and the plan was made for a "
                    f"dense one: pass {name}.to_dense()"
                )
            if _layout(tensor) != planned:
                contiguous = planned == _layout(torch.empty(tensor.shape, device="meta"))
                hint = f" (here: {name}.contiguous())" if contiguous else ""
                raise PlannerError(
                    f"input {name} has strides {tensor.stride()} and was planned with others "
                    f"({planned} in its dims longer than 1): a plan is made for the layout "
                    f"traced (its ops may copy an input laid out otherwise, in memory the "
                    f"budget does not count, and compiled runs are specialized to it). Pass "
                    f"it laid out as planned{hint}, or plan with example inputs laid out "
                    f"like yours"
                )
        for name, planned_format, tensor in zip(self.tensor_names, self.formats, tensors):
            if planned_format is not None and _memory_format(tensor) != planned_format:
                raise PlannerError(
                    f"input {name} has strides {tensor.stride()}, which torch's kernels "
                    f"read as {_memory_format(tensor)}, and was planned as {planned_format}: a "
                    f"dimension of size 1 changes no element's place, but its stride "
                    f"decides which layout a convolution or norm computes in and returns "
                    f"(so the plan's ops would not hold, or use memory the budget does not "
                    f"count). Pass {name}.to(memory_format={planned_format}), or plan with "
                    f"example inputs laid out like yours"
                )

    def _check_grads(self, tensors: list[torch.Tensor]) -> None:
        if self.mode != "train":
            wanting = [n for n, t in zip(self.tensor_names, tensors) if t.requires_grad]
            if wanting:
                raise PlannerError(
                    f"input(s) {', '.join(wanting)} require grad, and this module was "
                    f"planned for inference: it computes no gradients, so nothing before "
                    f"it would get one. Plan with mode='train' and example inputs that "
                    f"require grad, or call it under torch.no_grad() (or pass x.detach())"
                )
            return
        missing = [
            name
            for name, was, tensor in zip(self.tensor_names, self.requires_grad, tensors)
            if tensor.requires_grad and not was
        ]
        if missing:
            raise PlannerError(
                f"input(s) {', '.join(missing)} require grad, but this module was planned "
                f"with example inputs that did not, so its backward computes no gradient "
                f"for them. Plan with example inputs that require grad where yours will "
                f"(x.requires_grad_()), or pass x.detach() if you need no gradient for it"
            )


def _identity(tensor: torch.Tensor) -> tuple:
    """Two tensors with equal identities read the same elements: the same storage,
    offset, shape and strides (one object, or ``x`` and ``x.detach()``)."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
    )


def _same_tensors(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Groups (two or more) of positions whose tensors are the same elements."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() and t.device.type != "meta":
            groups.setdefault(_identity(t), []).append(i)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def _exact(tensor: torch.Tensor) -> tuple[torch.Size, torch.dtype, torch.device, tuple[int, ...]]:
    return tensor.shape, tensor.dtype, tensor.device, tensor.stride()


def _meta(tensor: torch.Tensor) -> tuple[tuple[int, ...], str]:
    return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _layout(tensor: torch.Tensor) -> tuple[int, ...]:
    return strides_that_matter(tensor.shape, tensor.stride())


#: ATen ops (by a part of their names) whose kernels pick the layout they compute in
#: and return by their input's ``suggest_memory_format``, which reads the strides
#: of dimensions of size 1 too: convolutions, norms over channels, pooling,
#: resampling (their backwards' names contain the same)
_FORMAT_READERS = (
    "conv",  # conv2d (inference's graph), convolution, their transposes and backward
    "batch_norm",
    "group_norm",
    "pool",
    "upsample",
    "grid_sampler",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
)


def reads_memory_format(graph_module: torch.fx.GraphModule) -> bool:
    """Whether an op of the traced graph computes by its input's memory format:
    only then can an input whose size-1 dimensions are strided otherwise than
    planned run other than planned (``_memory_format``). Elsewhere such an input
    runs as planned (pointwise ops keep its strides, views see the same strides
    in every longer dimension): an (N, C, 1, 1) pooled channels-last batch into a
    Flatten and Linear was refused, and ran right before."""
    return any(
        node.op == "call_function" and any(part in str(node.target) for part in _FORMAT_READERS)
        for node in graph_module.graph.nodes
    )


def _memory_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """The memory format torch's kernels read off a 4-d or 5-d tensor's strides
    (``suggest_memory_format``), else None. It reads the strides of dimensions of
    size 1 too, which ``_layout`` leaves out: a grayscale batch permuted from NHWC,
    (N, 1, H, W) with strides (HW, 1, W, 1), lies as NCHW's does in every longer
    dimension, yet a convolution computes it channels-last and returns a
    channels-last output, on which a ``view`` traced for NCHW fails."""
    if tensor.dim() not in (4, 5) or tensor.layout != torch.strided:
        return None
    return suggest_memory_format(tensor)


def _constant(value: Any) -> tuple[type, Any]:
    """Compared with its type: 1, 1.0 and True are equal in Python, not in a trace."""
    return type(value), value


def check_not_unfrozen(
    names: Sequence[str], planned: tuple[bool, ...], needs: tuple[bool, ...]
) -> None:
    """``planned``: each parameter's ``requires_grad`` when planned; ``needs``: the
    planned step's ``ctx.needs_input_grad`` for them now, which autograd has already
    computed, so a steady loop pays one tuple comparison."""
    if needs == planned:
        return
    unfrozen = [name for name, now, was in zip(names, needs, planned) if now and not was]
    if unfrozen:
        raise PlannerError(
            f"parameters that did not require grad when planned do now: {listed(unfrozen)}. The "
            f"planned backward computes no gradient for them, so they would not train: "
            f"call planner.plan again after unfreezing (a plan per stage of a gradual "
            f"unfreeze)"
        )


def accumulators(
    params: Sequence[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor, Any]]:
    """Each parameter with its gradient accumulator node (``AccumulateGrad``), held
    so that it stays the one the engine runs, for ``check_deliveries_wanted``:
    looking them up each step cost 3.5 us a parameter, asking the held ones 0.07."""
    return [(name, param, get_gradient_edge(param).node) for name, param in params]


def check_deliveries_wanted(delivered: Sequence[tuple[str, torch.Tensor, Any]]) -> None:
    """Called from the planned backward before it runs: the gradients the plan
    writes straight into ``.grad`` as soon as they are made (``Runtime.deliver``)
    must be ones this backward accumulates there. ``torch.autograd.grad(loss,
    params)`` accumulates none (it returned ``None`` for a delivered parameter and
    set its ``.grad``), and ``backward(inputs=[...])`` only those named (the others'
    ``.grad`` was set anyway). The engine says which leaves it will accumulate;
    ``delivered``: from ``accumulators``. A parameter frozen since planning is no
    such leaf, and gets no gradient (``Runtime.deliver`` skips it)."""
    if not delivered:
        return
    try:
        left_out = [
            name
            for name, param, node in delivered
            if param.requires_grad and not torch._C._will_engine_execute_node(node)
        ]
        # the engine does not say which: torch.autograd.grad(loss, inputs) and
        # backward(inputs=[...]) both run only part of the graph
        how = "torch.autograd.grad(...), or backward(inputs=[...]) without them,"
    except RuntimeError:  # the engine runs torch.autograd.grad: nothing is accumulated
        left_out, how = [name for name, _, _ in delivered], "torch.autograd.grad(...)"
    if left_out:
        raise PlannerError(
            f"this plan writes the gradients of {listed(left_out)} straight into .grad as "
            f"soon as they are made (the budget has no room to hold them to the end of "
            f"the backward), so {how} cannot get them the way it asks: call "
            f"loss.backward() and read .grad, or plan with a budget at which no gradient "
            f"is delivered early (no 'deliver' in pm.plan.actions)"
        )


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


def check_not_batched(grad_outputs: tuple) -> None:
    """Called from the planned backward: ``torch.autograd.grad(...,
    is_grads_batched=True)`` (and ``torch.autograd.functional.jacobian`` or
    ``hessian`` with ``vectorize=True``, which use it) runs the backward once on
    gradients batched over a leading dimension. The plan's buffers, ``out=`` writes
    and budget are for one gradient: torch's batching raised from inside its ops
    ("Batching rule not implemented for ..."), or held the batch at once over the
    budget."""
    is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if is_batched is None:
        return
    if any(isinstance(g, torch.Tensor) and is_batched(g) for g in grad_outputs):
        raise PlannerError(
            "torch.autograd.grad(..., is_grads_batched=True) (also "
            "torch.autograd.functional.jacobian/hessian(vectorize=True)) through a "
            "planned step is not supported: the plan sizes and writes its buffers for "
            "one gradient at a time, within its budget. Compute the products once per "
            "vector (call the planned module and backward for each), or use the "
            "unplanned model"
        )


def check_not_functorch_transform(
    training: bool = True, tensors: Sequence[torch.Tensor] = ()
) -> None:
    """Called at a training step: under a ``torch.func`` transform (``grad``,
    ``vjp``, ``jacrev``, ``vmap``, ...) the planned step, an autograd.Function
    without ``setup_context``, raised torch's own error about the planner's
    internals. And at an inference call (``training=False``): its executor failed
    inside with torch's errors (``vmap``: "attempting to call
    Tensor.requires_grad_()"; ``jvp``: "Cannot access storage of TensorWrapper"),
    and a batched call would hold the batch's tensors at once, over the budget.
    An inference call whose ``tensors`` the transform does not wrap (a frozen
    feature extractor inside ``torch.func.grad`` of a loss over other tensors, an
    unbatched input under ``vmap``) computes as outside it and is not refused
    (the caller runs it with functorch off)."""
    if torch._C._functorch.maybe_current_level() is None:
        return
    if not training:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if not any(wrapped(t) for t in tensors):
            return
        raise PlannerError(
            "an inference plan cannot run under a torch.func transform (vmap, jvp, "
            "jacfwd, grad, ...): it runs a schedule of kernels and copies on tensors "
            "it places itself, sized for one call within its budget, which those "
            "transforms cannot batch or trace. Call it once per example (or plan the "
            "batched shape), or apply the transform to the unplanned model"
        )
    raise PlannerError(
        "a training plan cannot run under a torch.func transform (torch.func.grad, "
        "vjp, jacrev, vmap, ...): its step is one autograd node whose backward runs "
        "the planned kernels and copies, which those transforms cannot trace or "
        "batch. Take gradients with loss.backward() or torch.autograd.grad, one "
        "batch per call; or apply the transform to the unplanned model"
    )


def check_not_forward_ad(tensors: Sequence[torch.Tensor]) -> None:
    """Called at a training step: an input that is a forward-mode AD dual tensor
    (``torch.autograd.forward_ad.make_dual``) failed inside the planned step with
    torch's "You must implement the jvp function for custom autograd.Function"."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:  # no dual level entered: nothing is dual
        return
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise PlannerError(
            "forward-mode AD (a dual tensor from torch.autograd.forward_ad.make_dual, "
            "torch.func.jvp) through a planned training step is not supported: the "
            "step's kernels compute no tangents. Pass the primal "
            "(forward_ad.unpack_dual(x).primal), or use the unplanned model"
        )


def warn_if_saved_tensors_hooks() -> None:
    """Called at a training step: ``saved_tensors_hooks`` in effect (such as
    ``torch.autograd.graph.save_on_cpu()``) are not applied to what the planned
    step keeps for its backward, which the plan places itself (kept, offloaded,
    recomputed) within the budget: a caller wrapping the step in them expects them
    applied."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and torch.is_grad_enabled():
        if _is_checkpoint_hook(hooks[0]):
            raise PlannerError(
                "a planned training step cannot run inside torch.utils.checkpoint "
                "(use_reentrant=False): the step keeps what its backward needs itself, so "
                "checkpointing frees nothing, and its recompute runs the whole planned "
                "forward again during the backward while the first one's tensors are "
                "held (the meter saw the step 26-58% over its budget; at a budget that "
                "spills, the backward failed). Call the planned module outside the "
                "checkpointed region: the plan already recomputes or offloads what the "
                "budget needs"
            )
        warnings.warn(
            "saved_tensors_hooks (such as torch.autograd.graph.save_on_cpu()) around a "
            "planned training step are not applied to the tensors it keeps for its "
            "backward: the plan places those itself, within its budget. Call the planned "
            "module outside them",
            PlannerWarning,
            stacklevel=user_stacklevel(),
        )


def _is_checkpoint_hook(pack: Any) -> bool:
    """Whether ``pack`` is the pack hook of ``torch.utils.checkpoint``'s
    non-reentrant region (its first forward; ``_recomputation_hook`` in the
    recompute)."""
    name = getattr(pack, "__qualname__", "")
    return name.startswith(("_checkpoint_hook.", "_recomputation_hook."))


class BackwardReads:
    """The planned step's inputs (parameters, buffers, the caller's tensors) and
    outputs that its backward reads, whose versions a forward records and the
    backward checks: as eager autograd refuses a backward after a saved tensor was
    written in place (``y.mul_(2)`` on a softmax output, an optimizer step or an EMA
    update of the weights between forward and backward), where the planned backward
    silently read the new values (the carry holds the same tensors, not copies)."""

    def __init__(
        self,
        program: Program,
        problem: Problem,
        plan: Plan,
        flat_names: Sequence[str],
        num_buffer_updates: int,
        updated_buffers: Sequence[str],
    ) -> None:
        """``updated_buffers``: those the step itself writes after its forward
        (BatchNorm's running statistics, which its backward op takes as arguments
        and, in training mode, does not read). What the backward reads includes
        what the plan's recomputes there read: eager saved their result, the plan
        makes it again from its inputs."""
        read = {
            program.values[v].storage
            for op in program.ops
            if op.phase is Phase.BACKWARD
            for v in op.inputs
        }
        backward_start = program.backward_start()  # where the backward function starts
        storage_of = {t.name: i for i, t in enumerate(problem.tensors)}
        for action in plan.actions:
            if action.kind != "recompute" or action.step < backward_start:
                continue
            recipe = problem.tensors[storage_of[action.tensor]].recompute
            for step, _ in recipe.replayed if recipe is not None else ():
                read.update(program.values[v].storage for v in program.ops[step].inputs)
        primals = [
            v
            for v in program.inputs
            if program.values[v].kind in (ValueKind.PARAM, ValueKind.BUFFER)
        ]
        inputs = [v for v in program.inputs if program.values[v].kind is ValueKind.INPUT]
        #: (position among the step's flat inputs, name) of each one read
        self.inputs = [
            (j, name)
            for j, (v, name) in enumerate(zip(primals + inputs, flat_names))
            if program.values[v].storage in read and name not in updated_buffers
        ]
        forward_outputs = program.outputs[num_buffer_updates : program.num_forward_outputs]
        #: (position among all forward outputs, name) of each user output read
        self.outputs = [
            (num_buffer_updates + i, f"output {i}")
            for i, v in enumerate(forward_outputs)
            if program.values[v].storage in read
        ]

    def record(
        self, flat: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, int, str]]:
        """The versions of what the backward reads. An inference tensor has none
        (torch raised "Inference tensors do not track version counter"): a step
        called inside ``torch.inference_mode()`` makes only such outputs and has no
        backward, and one given such an input under ``no_grad`` none either
        (``check_not_inference`` refuses one where grad is enabled)."""
        read = [(flat[j], name) for j, name in self.inputs] + [
            (outs[i], name) for i, name in self.outputs
        ]
        return [(t, t._version, name) for t, name in read if not t.is_inference()]

    def check_not_inference(self, flat: Sequence[torch.Tensor]) -> None:
        """Called at a training step with grad enabled: a tensor the backward reads
        that was made under ``torch.inference_mode()`` is refused, as eager autograd
        refuses to save one for backward (the step failed inside with torch's
        "Inference tensors do not track version counter")."""
        named = [name for j, name in self.inputs if flat[j].is_inference()]
        if named:
            raise PlannerError(
                f"{listed(named)} {'was' if len(named) == 1 else 'were'} made under "
                f"torch.inference_mode(), and the planned backward reads "
                f"{'it' if len(named) == 1 else 'them'}: autograd refuses to save such "
                f"tensors for backward, as it does in eager. Pass a clone made outside "
                f"inference mode (x.clone()), or call the module under torch.no_grad() "
                f"or torch.inference_mode() if no backward follows"
            )

    @staticmethod
    def check(recorded: Sequence[tuple[torch.Tensor, int, str]]) -> None:
        changed = [name for tensor, version, name in recorded if tensor._version != version]
        if changed:
            raise PlannerError(
                f"{listed(changed)}, which the planned backward reads (or recomputes "
                f"from), {'was' if len(changed) == 1 else 'were'} modified in place after "
                f"the forward: the planned step refuses to compute gradients from the new "
                f"values, as eager autograd does for the tensors it saved. Make that change "
                f"out of place (y = y * 2), or after backward()"
            )
