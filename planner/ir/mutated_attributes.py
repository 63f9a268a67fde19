"""A forward that updates a plain tensor attribute in place is refused, and the
attribute is put back as it was.

A step counter kept as ``self.count = torch.zeros((), dtype=torch.int64)`` (not
``register_buffer``) and advanced by ``self.count += 1`` in forward: tracing ran
the update on the real tensor, so planning advanced the model's counter, and the
training trace then made the counter a constant of the value it had after that
update. Every planned step read it one ahead of eager's and the loss and every
gradient differed, silently (found by the adversarial sweep). Inference failed
with torch's own "Constant count is mutated in the forward method" from deep
inside its decompositions. A buffer is state the plan carries from call to call;
a plain attribute is not, so the fix is the user's: register it as a buffer. The
same for one held in a list or dict, and for an attribute the forward assigns a
new tensor (``self.count = self.count + 1``): the plan read the planned value at
every call, where eager's grew. And for other Python state the forward changes
(``_PythonState``): items of lists, dicts and deques (a tensor appended to a
cache), tensors of plain objects the modules hold (``self.helper.count``), and
state made at the first call and then updated (``self.h``, None when planned:
assigned a tensor made from it, or updated in place from the call's tensors).
What the trace changed is put back either way. Python numbers a forward changes
(``self.calls += 1``) are not watched.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import dis
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from planner.errors import CaptureError
from planner.ir.meta import node_draws_random

#: attributes up to this size are copied (to the CPU) before the trace, so an
#: update the trace made can be undone (a counter, a scale), up to
#: ``_RESTORED_TOTAL`` in all; a larger one is only reported
_RESTORED_BYTES = 1 << 20
_RESTORED_TOTAL = 64 << 20

#: what nn.Module keeps of its own: the dicts of its parameters, buffers and
#: submodules, its hooks (a model may install some in its first forward), flags
_MODULE_TABLES = frozenset(vars(torch.nn.Module()))


def _plain_attributes(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(qualified name, value) of every plain attribute of ``model``'s modules:
    not what nn.Module keeps of its own (a user's ``self._step`` is one)."""
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name not in _MODULE_TABLES:
                yield (f"{prefix}.{name}" if prefix else name), value


def _plain_objects(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(qualified name, object) of the plain Python objects ``model``'s modules
    hold as attributes (a helper keeping a count or a cache: ``self.helper =
    Counter()``), not modules, tensors, containers, functions or classes."""
    for qualified, value in _plain_attributes(model):
        if _is_plain_object(value):
            yield qualified, value


def _is_plain_object(value: Any) -> bool:
    return (
        hasattr(value, "__dict__")
        and not isinstance(
            value,
            (torch.nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType),
        )
        and not isinstance(value, types.ModuleType)
        and not callable(getattr(value, "forward", None))
    )


def _attribute_values(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """Every plain attribute of ``model``'s modules, and of the plain objects
    they hold, by qualified name."""
    yield from _plain_attributes(model)
    for qualified, obj in _plain_objects(model):
        for name, value in vars(obj).items():
            yield f"{qualified}.{name}", value


def plain_tensors(
    model: torch.nn.Module, state_views: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Tensors held as plain attributes of ``model``'s modules (neither parameters
    nor buffers) or of the plain objects they hold, also inside a list, tuple or
    dict there, by qualified name. Not a parameter or buffer reached that way, nor
    a view of one (transformers' static cache holds its buffers in a plain
    object): its updates are the buffer's, which a plan carries
    (``planner.ir.aliased_state``); ``state_views`` keeps those."""
    state = {
        _storage_key(t)
        for t in [*model.parameters(), *model.buffers()]
        if t.layout is torch.strided and not t.is_meta
    }
    found = []
    for qualified, value in _attribute_values(model):
        if isinstance(value, torch.Tensor):
            found.append((qualified, value))
        elif isinstance(value, (list, tuple, dict)):
            leaves, _ = pytree.tree_flatten_with_path(value)
            found += [
                (qualified + pytree.keystr(path), leaf)
                for path, leaf in leaves
                if isinstance(leaf, torch.Tensor)
            ]
    return [
        (name, t)
        for name, t in found
        if not isinstance(t, (torch.nn.Parameter, FakeTensor))
        and (
            state_views
            or not (t.layout is torch.strided and not t.is_meta and _storage_key(t) in state)
        )
    ]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


#: containers nested deeper than this, or items past this many, are not watched
_WATCHED_DEPTH = 3
_WATCHED_ITEMS = 10_000


class _PythonState:
    """What the forward could change outside tensors: the items of the lists,
    dicts, deques and sets ``model``'s modules hold, and the attributes of the
    plain objects they hold, through each other (a cache object's list of layer
    objects). ``restore()`` puts back what the trace changed and says what it
    was. Changes that hold a tensor matter: a tensor appended to a list empty
    when planned (``self.cache.append(h)``), a window kept in a deque, a tensor
    replaced that the forward read (``self.helper.count = self.helper.count +
    1``): the plan ran the forward as traced at every call, reading what they
    held when planned and changing nothing, where eager's outputs moved on,
    silently. Others are only put back (transformers' ``is_updated`` flags of an
    encoder-decoder cache, whose plan is right). torch.export puts back a module's
    list attributes as copies, so the originals are put back too (two layers
    sharing one list shared it no longer), and the trace left fake tensors in a
    cache's layer objects, which broke the model's next eager call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.containers: list[tuple[str, Any, Any]] = []
        self.objects: list[tuple[str, Any, dict[str, Any]]] = []
        self._seen: set[int] = set()  # one config object is held by every layer
        for qualified, value in _plain_attributes(model):
            self._walk(qualified, value, 0)
        self.attributes = [(module, dict(vars(module))) for module in model.modules()]

    def _walk(self, path: str, value: Any, depth: int) -> None:
        if depth > _WATCHED_DEPTH or id(value) in self._seen:
            return
        items: Any
        if isinstance(value, (list, collections.deque)):
            self.containers.append((path, value, list(value)))
            items = enumerate(value)
        elif isinstance(value, dict):
            self.containers.append((path, value, dict(value)))
            items = value.items()
        elif isinstance(value, set):
            self.containers.append((path, value, set(value)))
            items = ()
        elif isinstance(value, tuple):
            items = enumerate(value)
        elif _is_plain_object(value):
            before = dict(vars(value))
            self.objects.append((path, value, before))
            items = ((f".{k}", v) for k, v in before.items())
        else:
            return
        self._seen.add(id(value))
        for k, (key, item) in enumerate(items):
            if k >= _WATCHED_ITEMS:
                break
            where = (
                f"{path}{key}"
                if isinstance(key, str) and key.startswith(".")
                else f"{path}[{key!r}]"
            )
            self._walk(where, item, depth + 1)

    def restore(self) -> tuple[list[str], list[tuple[str, torch.Tensor]]]:
        """Put back what changed. Returns what the forward did with tensors: what
        a plan cannot follow whatever it read (the items of a list, deque, dict
        or set holding tensors changed), and (name, old tensor) of plain objects'
        tensors it replaced, which matter where the forward read the old one."""
        changed: list[str] = []
        replaced: list[tuple[str, torch.Tensor]] = []
        for path, container, before in self.containers:
            change = _container_change(path, container, before)
            if change is not None and _holds_tensors(container, before):
                changed.append(change)
            if not _same_items(container, before):
                _refill(container, before)
        for module, before in self.attributes:  # the originals, not copies
            now = vars(module)
            for name, value in before.items():
                if name not in _MODULE_TABLES and now.get(name) is not value:
                    if isinstance(value, (list, dict, collections.deque, set, tuple)):
                        now[name] = value
            # a tensor attribute the forward made (self.feat = y; hasattr-made state)
            # held the trace's fake tensor: training failed on it, and the model's
            # next eager call computed with it
            for name in [n for n, v in now.items() if n not in before]:
                if isinstance(now[name], torch.Tensor):
                    del now[name]
            for name, value in before.items():  # None when planned (lazy state)
                if value is None and isinstance(now.get(name), torch.Tensor):
                    now[name] = None
        for path, obj, before in self.objects:
            now = vars(obj)
            for name in [n for n in now if n not in before]:
                del now[name]
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    if isinstance(value, torch.Tensor):
                        replaced.append((f"{path}.{name}", value))
                    now[name] = value
        return changed, replaced


_MISSING = object()


def _holds_tensors(container: Any, before: Any) -> bool:
    if isinstance(container, dict):
        items = [*container.values(), *before.values()]
    else:
        items = [*container, *before]
    return any(isinstance(item, torch.Tensor) for item in items)


def _container_change(path: str, container: Any, before: Any) -> str | None:
    """How ``container`` differs from ``before``, its shallow copy; None if not."""
    if isinstance(container, set):
        return None if container == before else f"adds to or removes from {path}"
    if isinstance(container, dict):
        if not before.keys() <= container.keys():
            return f"removes keys from {path}"
        # keys added, the others' values left alone: a cache filled at the first
        # call (by shape: a rotary table), which a plan makes at every call; put back
        # and let through (a dict read as an accumulator is not told from one)
        keys = list(before)
        now = [container[k] for k in keys]
        items = [before[k] for k in keys]
    else:
        now, items, keys = list(container), before, list(range(len(before)))
        if len(now) != len(items):
            return (
                f"appends to or removes from {path} ({_items(len(now))}, {_items(len(items))} "
                f"when planned)"
            )
    for key, a, b in zip(keys, now, items):
        if a is not b:
            what = "tensor" if isinstance(a, torch.Tensor) else "value"
            return f"puts a new {what} at {path}[{key!r}]"
    return None


def _same_items(container: Any, before: Any) -> bool:
    if isinstance(container, set):
        return container == before
    if isinstance(container, dict):
        return container.keys() == before.keys() and all(
            container[k] is v for k, v in before.items()
        )
    now = list(container)
    return len(now) == len(before) and all(a is b for a, b in zip(now, before))


def _items(n: int) -> str:
    return f"{n} item{'' if n == 1 else 's'}"


def _refill(container: Any, before: Any) -> None:
    if isinstance(container, list):
        container[:] = before
    else:
        container.clear()
        if isinstance(container, collections.deque):
            container.extend(before)
        else:
            container.update(before)


def _tracer() -> Any:
    """The tracer of the trace running now (torch.export's), or None."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    return None if mode is None else mode.tracer


def _traced_node(tracer: Any, value: torch.Tensor) -> torch.fx.Node | None:
    """The graph node ``tracer`` made ``value`` at, or None (a tensor it did not
    make: a constant of the trace)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_slot

    try:
        return get_proxy_slot(value, tracer, None, lambda p: p.proxy.node)
    except Exception:  # noqa: BLE001 - a tracer's internals: not known
        return None


def _upstream(
    start: torch.fx.Node,
    found: Callable[[torch.fx.Node], bool],
    inputs: Callable[[torch.fx.Node], list[torch.fx.Node]] = lambda node: node.all_input_nodes,
) -> bool:
    """Whether ``found`` holds for ``start`` or a node it was made from, walking
    back through the nodes ``inputs`` says each was made from."""
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        if found(node):
            return True
        for arg in inputs(node):
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return False


def _made_from(value: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether the trace made ``value`` from ``old`` (the graph's nodes behind
    them, through the tracer's proxies); True where it cannot tell. A record kept
    twice in one call (``self.last = y``, then another) is not made from the
    first."""
    tracer = _tracer()
    if tracer is None:
        return True
    new, before = _traced_node(tracer, value), _traced_node(tracer, old)
    if new is None or before is None:
        return True
    return _upstream(new, lambda node: node is before)


#: ops whose output takes only its inputs' shapes, dtypes and devices, not their
#: values (not ``rand_like``: a draw is not the same at every call)
_SHAPED_LIKE = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like"}
    | {"new_zeros", "new_ones", "new_empty", "new_full"}
)
#: ops whose output takes its first input's values and only the second's shape or dtype
_SHAPED_AS = frozenset({"view_as", "expand_as", "reshape_as", "type_as"})


def _value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose values ``node`` reads (not those it takes a shape from)."""
    op = getattr(node.target, "__name__", "").split(".")[0]
    if op in _SHAPED_LIKE:
        return []
    if op in _SHAPED_AS:
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, torch.fx.Node) else []
    return node.all_input_nodes


def _reads_inputs(value: torch.Tensor, fixed: frozenset = frozenset()) -> bool:
    """Whether the trace made ``value`` from the values of the graph's inputs
    (the call's tensors, parameters, buffers) or from a random draw, through the
    tracer's proxies; True where a trace runs but cannot tell, False outside a
    trace (nothing to judge). A mask made lazily (``torch.ones(n, n).triu_(1)``, or
    ``ones_like(x)``) reads none of them: it is the same at every call. ``fixed``:
    placeholders whose values are the same at every call (buffers the forward
    does not write: a rotary table made from ``inv_freq``)."""
    tracer = _tracer()
    node = None if tracer is None else _traced_node(tracer, value)
    if node is None:
        return tracer is not None
    return _upstream(
        node,
        lambda n: (n.op == "placeholder" and n not in fixed) or node_draws_random(n),
        _value_inputs,
    )


#: what ``.to(...)`` traces to
_CONVERSIONS = frozenset(
    {"to.dtype", "to.device", "to.dtype_layout", "to.other", "_to_copy.default"}
)


def _converted_from(value: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether the trace made ``value`` as ``old.to(...)``, of ``old`` itself (a
    constant of the trace): ``self.freqs_cis = self.freqs_cis.to(h.device)``, as
    Meta's Llama does with a table kept on the CPU. A plan converts the original
    at every call, as eager's first call does; eager's later conversions change
    nothing, so the values agree (refused as a stale read before)."""
    tracer = _tracer()
    node = None if tracer is None else _traced_node(tracer, value)
    target = getattr(getattr(node, "target", None), "__name__", "")
    if node is None or target not in _CONVERSIONS or not node.args:
        return False
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
        return False
    return getattr(getattr(tracer, "root", None), str(source.target), None) is old


@contextlib.contextmanager
def _assignments_recorded(
    model: torch.nn.Module,
    carried: set[str],
    replaced: list[tuple[str, torch.Tensor]],
    made: dict[str, tuple[torch.nn.Module, str, torch.Tensor, int, bool]],
) -> Iterator[list[str]]:
    """The plain tensor attributes of ``model``'s modules the block assigns a new
    value to (``self.count = self.count + 1``): torch.export puts them back
    afterwards, so only the assignment itself shows it. ``carried`` gets those
    that held None before the trace and were then assigned a tensor made from
    the one the trace gave them (``self.h = zeros`` where ``self.h`` was None,
    then ``self.h = 0.5 * self.h + ...``); ``replaced`` the tensors in a tuple or
    list an assignment replaced (``self.state = (h2, c2)``); ``made`` the tensors
    assigned where None was (its module, name, the tensor and its version then,
    and whether the assigning function tests the attribute against None: made
    lazily, ``if self.noise is None: self.noise = ...``), for
    ``_updated_after_made``."""
    modules = {id(m): prefix for prefix, m in model.named_modules()}
    assigned: list[str] = []
    created: set[str] = set()
    original = torch.nn.Module.__setattr__

    def setattr_recorded(module: torch.nn.Module, name: str, value: Any) -> None:
        prefix = modules.get(id(module))
        old = vars(module).get(name)
        qualified = f"{prefix}.{name}" if prefix else name
        # a .to() that moves nothing returns the tensor itself (transformers'
        # longrope frequencies: self.x = self.x.to(device)): nothing changes
        if prefix is not None and isinstance(old, torch.Tensor) and value is not old:
            if not _converted_from(value, old):
                assigned.append(qualified)
            if qualified in created and _made_from(value, old):
                carried.add(qualified)
        elif prefix is not None and old is None and isinstance(value, torch.Tensor):
            created.add(qualified)
            lazily = _made_lazily(sys._getframe(1), module, name)
            made[qualified] = (module, name, value, value._version, lazily)
        elif prefix is not None and isinstance(old, (tuple, list)) and value is not old:
            leaves, _ = pytree.tree_flatten_with_path(old)
            replaced.extend(
                (qualified + pytree.keystr(path), leaf)
                for path, leaf in leaves
                if isinstance(leaf, torch.Tensor)
            )
        original(module, name, value)

    torch.nn.Module.__setattr__ = setattr_recorded  # type: ignore[method-assign,assignment]
    try:
        yield assigned
    finally:
        torch.nn.Module.__setattr__ = original  # type: ignore[method-assign]


def _unwritten_buffers(model: torch.nn.Module) -> frozenset:
    """The trace's placeholders of the buffers the forward has not written (the
    same at every call), for ``_reads_inputs``."""
    tracer = _tracer()
    if tracer is None:
        return frozenset()
    nodes = (
        _traced_node(tracer, b)
        for b in model.buffers()
        if isinstance(b, torch.Tensor) and b._version == 0
    )
    return frozenset(n for n in nodes if n is not None and n.op == "placeholder")


#: builtins that ask whether an attribute is there: ``hasattr(self, "noise")``,
#: ``getattr(self, "noise", None)``
_PRESENCE_TESTS = frozenset({"hasattr", "getattr"})


def _tests_against_none(code: types.CodeType, name: str) -> bool:
    """Whether ``code`` compares its attribute ``name`` with None (``if self.noise
    is None:``, ``is not None``, ``None is self.noise``) or asks whether it is there
    (``hasattr(self, "noise")``, ``getattr(self, "noise", None)``): the function
    that assigns it makes it lazily, at the first call, rather than a record at
    every call."""
    instructions = list(dis.get_instructions(code))
    # locals the attribute is read into (``n = self.noise``), tested in its place
    # (``if n is None:``)
    aliases = {
        instructions[i + 1].argval
        for i, ins in enumerate(instructions[:-1])
        if ins.opname == "LOAD_ATTR"
        and ins.argval == name
        and instructions[i + 1].opname == "STORE_FAST"
    }
    for i, ins in enumerate(instructions):
        if ins.opname == "LOAD_CONST" and ins.argval == name:
            # the builtin is loaded just before its object argument (one load, or a
            # chain of attributes: hasattr(self.child, "noise"))
            called = [
                x.argval for x in instructions[max(0, i - 4) : i] if x.opname == "LOAD_GLOBAL"
            ]
            if called and called[-1] in _PRESENCE_TESTS:
                return True
        read = ins.opname == "LOAD_ATTR" and ins.argval == name
        if not (read or (ins.opname.startswith("LOAD_FAST") and ins.argval in aliases)):
            continue
        after = instructions[i + 1 : i + 3]
        if after and after[0].opname.endswith(("IF_NONE", "IF_NOT_NONE")):
            return True
        if len(after) == 2 and after[0].opname == "LOAD_CONST" and after[0].argval is None:
            if after[1].opname == "IS_OP":
                return True
        before = instructions[i - 2 : i - 1] if i >= 2 else []
        if before and before[0].opname == "LOAD_CONST" and before[0].argval is None:
            if i + 1 < len(instructions) and instructions[i + 1].opname == "IS_OP":
                return True
    return False


#: how many of the module's own frames up the stack may hold the None test (a
#: helper that makes the state, called under ``if self.noise is None:``)
_LAZY_FRAMES = 3


def _made_lazily(frame: types.FrameType | None, module: torch.nn.Module, name: str) -> bool:
    """Whether the assignment in ``frame`` sits under a test of the attribute
    against None: in that function, or in a method that called it of the module
    or of a module holding it (``if self.noise is None: self._draw(x)``; a parent's
    ``if self.child.noise is None: self.child.noise = ...``)."""
    for _ in range(_LAZY_FRAMES):
        if frame is None:
            return False
        caller = frame.f_locals.get("self")
        if not isinstance(caller, torch.nn.Module) or not _holds(caller, module):
            return False
        if _tests_against_none(frame.f_code, name):
            return True
        frame = frame.f_back
    return False


def _holds(outer: torch.nn.Module, module: torch.nn.Module) -> bool:
    """Whether ``module`` is ``outer`` or one of its submodules."""
    return outer is module or any(m is module for m in outer.modules())


def _updated_after_made(
    made: dict[str, tuple[torch.nn.Module, str, torch.Tensor, int, bool]],
    carried: set[str],
    kept: set[str],
) -> Any:
    """A forward hook, run at the end of the traced forward (its tracer still
    running), that adds to ``carried`` the attributes of ``made`` still holding the
    tensor assigned where None was, updated in place since from the graph's
    inputs: ``if self.h is None: self.h = zeros_like(y)``, then ``self.h.add_(y)``.
    Eager's next calls add to the first call's sum; a plan would start from zeros
    at every call (3.85 off at the second call, 7.70 at the third, silently).
    ``kept`` gets those made lazily (tested against None where assigned) from the
    call's values or a random draw and kept as made: ``if self.noise is None:
    self.noise = randn_like(x)``; eager's later calls reuse the first call's, a
    plan would make it anew at every call (5.15 off at the second call)."""

    def hook(model: torch.nn.Module, *_: Any) -> None:
        fixed: frozenset | None = None
        for qualified, (module, name, tensor, version, lazily) in made.items():
            if vars(module).get(name) is not tensor:
                continue
            if tensor._version == version and not lazily:
                continue  # a record, made anew at every call
            if fixed is None:
                fixed = _unwritten_buffers(model)
            if _reads_inputs(tensor, fixed):
                (carried if tensor._version != version else kept).add(qualified)

    return hook


@dataclasses.dataclass
class TraceWatch:
    """What the trace changed that only the exported program can judge
    (``refuse_stale_reads``): the plain tensor attributes of modules it assigned
    anew, and tensors it replaced in plain objects and containers (where, the
    old tensor)."""

    assigned: list[str] = dataclasses.field(default_factory=list)
    replaced: list[tuple[str, torch.Tensor]] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def plain_attributes_left_alone(model: torch.nn.Module) -> Iterator[TraceWatch]:
    """Run the block (the trace); if it wrote into a plain tensor attribute, put
    back what can be put back and raise a CaptureError naming it. Yields what
    ``refuse_stale_reads`` judges once the program is exported."""
    watched = []
    copied = 0
    for name, t in plain_tensors(model):
        if t.layout is not torch.strided or t.is_meta or t.is_inference():
            continue
        keep = t.nbytes <= _RESTORED_BYTES and copied + t.nbytes <= _RESTORED_TOTAL
        copied += t.nbytes if keep else 0
        watched.append((name, t, t._version, t.detach().to("cpu", copy=True) if keep else None))

    def undo() -> list[str]:
        written = []
        for name, t, version, before in watched:
            if t._version != version:
                written.append(name)
                if before is not None:
                    with torch.no_grad():
                        t.copy_(before)
        return written

    state = _PythonState(model)
    carried: set[str] = set()
    kept: set[str] = set()
    in_tuples: list[tuple[str, torch.Tensor]] = []
    made: dict[str, tuple[torch.nn.Module, str, torch.Tensor, int, bool]] = {}
    watch = TraceWatch()
    hook = model.register_forward_hook(_updated_after_made(made, carried, kept))
    try:
        with _assignments_recorded(model, carried, in_tuples, made) as assigned:
            watch.assigned = assigned
            yield watch
    except BaseException as exc:
        written = undo()
        state.restore()
        if written and not isinstance(exc, CaptureError):  # torch's own words for it
            raise _updated_in_place(type(model).__name__, written) from exc
        raise
    finally:
        hook.remove()
        made.clear()  # the trace's tensors
    written = undo()
    changes, watch.replaced = state.restore()
    watch.replaced += in_tuples
    name = type(model).__name__
    if changes:
        raise CaptureError(
            f"{name}'s forward changes what it keeps in plain Python state: "
            f"{'; '.join(changes)}. A plan runs the forward as traced at every call: it "
            f"reads what was there when planned and changes nothing there, so its outputs "
            f"would not follow eager's. Keep such state in registered buffers updated in "
            f"place (self.register_buffer(...); buf.copy_(new)), or outside the model"
        )
    lazy = sorted(carried)
    if lazy:
        raise CaptureError(
            f"{name}'s forward makes {', '.join(lazy)} (None when planned) and then updates "
            f"it (a tensor made from it assigned, or an update in place from what a call "
            f"reads: its tensors, parameters, buffers it writes, or a random draw): state "
            f"carried from call to call in a plain "
            f"attribute, which a plan would start from nothing at every call. Register it "
            f"as a buffer in __init__ (self.register_buffer({lazy[0].rpartition('.')[2]!r}, "
            f"torch.zeros(...))) and update it in place"
        )
    if kept:
        first = sorted(kept)[0].rpartition(".")[2]
        raise CaptureError(
            f"{name}'s forward makes {', '.join(sorted(kept))} at its first call (where it "
            f"is None or missing, as the forward checks) from what that call reads (its tensors, "
            f"parameters, buffers it writes, or a random draw) and keeps it: eager's later "
            f"calls reuse the first call's, a plan would make it anew at every call. Make "
            f"it in __init__ (self.register_buffer({first!r}, ...)), or pass it in. If it "
            f"is a record assigned anew at every call, assign it without testing it first "
            f"(the test is what marks it as made once)"
        )
    if written:
        raise _updated_in_place(name, written)


def _updated_in_place(model_name: str, written: list[str]) -> CaptureError:
    listed = ", ".join(written)
    return CaptureError(
        f"{model_name}'s forward updates {listed} in place, a plain tensor "
        f"attribute{'s' if len(written) > 1 else ''}, not a registered buffer: a plan "
        f"carries buffers from call to call, but would fix a plain attribute at the value "
        f"it had when planned. Register it as a buffer: "
        f"self.register_buffer({written[0].rpartition('.')[2]!r}, tensor)"
    )


def refuse_stale_reads(model_name: str, watch: TraceWatch, ep: Any) -> None:
    """Raise if the forward reads a plain tensor attribute it also assigns anew
    (``self.count = self.count + 1``; in a plain object or a list too): the trace
    made the value it read a constant, which a plan would read at every call. One
    only assigned (``self.last = y``, a record kept for inspection; a cache's
    cross-attention keys, made anew from the inputs) is not read by the plan and
    is left alone."""
    from torch.export.graph_signature import InputKind

    read = {
        spec.target
        for spec in ep.graph_signature.input_specs
        if spec.kind is InputKind.CONSTANT_TENSOR
    }
    constants = {id(t) for t in ep.constants.values() if isinstance(t, torch.Tensor)}
    stale = [name for name in dict.fromkeys(watch.assigned) if name in read]
    stale += [name for name, old in watch.replaced if id(old) in constants]
    if stale:
        raise CaptureError(
            f"{model_name}'s forward reads {', '.join(stale)} and assigns it a new tensor, a "
            f"plain attribute, not a registered buffer: a plan would read the value it had "
            f"when planned at every call. Register it as a buffer and update it in place "
            f"(self.{stale[0].rpartition('.')[2]}.copy_(new), or +=)"
        )
