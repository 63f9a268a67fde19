"""Capture a model into one FX graph of ATen ops.

Inference goes through ``torch.export`` (functionalized, no decompositions, so ops
such as ``aten.linear`` and fused attention stay whole). Training goes through the
AOTAutograd joint graph: forward and backward in one graph whose backward is driven
by incoming output gradients ("tangents"), exactly what ``torch.compile`` traces.
We export first in both modes so that untraceable models fail in one place with
one kind of error, which names the user's source line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
import torch.fx.traceback as fx_traceback
from torch.utils import _pytree as pytree

from planner.call_checks import PlannedCall, reads_memory_format
from planner.errors import CaptureError, PlannerTypeError, PlannerValueError, listed
from planner.ir.aliased_state import merge_constants_that_are_state
from planner.ir.autocast import autocast_state
from planner.ir.constants import inline_scalar_constants
from planner.ir.control_flow import refuse_control_flow
from planner.ir.converting_copies import refuse_converting_copies
from planner.ir.custom_backward import functions_applied, refuse_custom_backwards
from planner.ir.data_dependent import refuse_data_dependent_shapes
from planner.ir.example_inputs import (
    check_inputs_are_not_state,
    hint_args_kwargs_reading,
    inputs_written_in_place,
    user_input_names,
)
from planner.ir.export_speedups import faster_export_bookkeeping
from planner.ir.gradient_hooks import gradient_hooks_recorded, refuse_gradient_hooks
from planner.ir.hooks import check_hooks_at_capture, hooked_parameters, module_hooks
from planner.ir.layout import fix_layouts, true_layouts
from planner.ir.meta import FROZEN_PARAMS, HOOKED_PARAMS, NONFINITE_SOURCES
from planner.ir.metadata_args import explicit_metadata_args
from planner.ir.mutated_attributes import (
    plain_attributes_left_alone,
    plain_tensors,
    refuse_stale_reads,
)
from planner.ir.nonfinite_sources import nonfinite_sources
from planner.ir.program import ValueKind
from planner.ir.rnn_dropout import rnn_dropout_kept
from planner.ir.shared_state import check_state_does_not_overlap, written_state
from planner.released import ReleasedWeight

log = logging.getLogger(__name__)

MODES = ("infer", "train")


@dataclass
class Role:
    """What a graph input or output is to the user's model."""

    kind: ValueKind
    source: str | None = None


@dataclass
class CapturedGraph:
    """An FX graph plus what each of its inputs and outputs means.

    ``input_roles``/``output_roles`` align with the graph's placeholders and the
    flat list its output node returns (``None`` outputs, e.g. gradients of inputs
    that need none, have role ``None``).
    """

    mode: str
    graph_module: torch.fx.GraphModule
    input_roles: list[Role]
    output_roles: list[Role | None]
    num_forward_outputs: int
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, a dict of keyword arguments, or
    ``(args, kwargs)``; check for tensors."""
    args: tuple
    kwargs: dict
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
        if len(args) == 2 and isinstance(args[0], (tuple, list)) and isinstance(args[1], dict):
            args, kwargs = tuple(args[0]), dict(args[1])
    else:
        raise PlannerTypeError(
            f"example_inputs must be a tensor, a tuple of positional arguments, a dict "
            f"of keyword arguments, or (args, kwargs); got "
            f"{type(example_inputs).__name__}. Wrap a single tensor x as (x,)."
        )
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise PlannerTypeError(
            "example_inputs contain no tensor: pass the tensors the model is called "
            "with, e.g. example_inputs=(torch.randn(8, 512),)."
        )
    for x in leaves:
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:  # a raw
            # NotImplementedError before: "Cannot access storage of SparseTensorImpl"
            raise CaptureError(
                f"example_inputs hold a {x.layout} tensor of shape {tuple(x.shape)}: the "
                f"planner plans dense tensors; pass it dense (x.to_dense()), or keep the "
                f"sparse op outside the planned module"
            )
        if not isinstance(x, (torch.Tensor, int, float, bool, str, type(None))):
            raise PlannerTypeError(
                f"example_inputs may hold tensors and plain Python scalars in "
                f"tuples, lists and dicts; found a {type(x).__name__}."
            )
    return args, kwargs


#: one capture at a time in this process: torch.export is not thread-safe (two
#: threads planning at once both failed, "ProxyTorchDispatchMode slot already
#: occupied", with advice to make forward() traceable), and a capture patches
#: process-wide state while it runs (``custom_backward``, ``rnn_dropout``)
_ONE_CAPTURE = threading.Lock()


def capture(
    model: torch.nn.Module, example_inputs: Any, mode: str = "infer", kernels: str = "eager"
) -> CapturedGraph:
    """Trace ``model`` on ``example_inputs`` into a :class:`CapturedGraph`
    (captures in several threads run one after the other). ``kernels``: how the
    plan will run the ops; a training graph for ``"inductor"`` keeps the fake
    layouts of ``planner.ir.layout``'s unstable outputs (restrided), since Inductor's
    BatchNorm returns those, where an eager one records what the CPU kernel returns."""
    with _ONE_CAPTURE, faster_export_bookkeeping():
        return _capture(model, example_inputs, mode, kernels)


def _capture(
    model: torch.nn.Module, example_inputs: Any, mode: str, kernels: str = "eager"
) -> CapturedGraph:
    if mode not in MODES:
        raise PlannerValueError(f"unknown mode {mode!r}: use one of {', '.join(map(repr, MODES))}")
    if not isinstance(model, torch.nn.Module):
        raise PlannerTypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}: plan an "
            f"nn.Module whose forward computes it (a function: wrap it in one)"
        )
    _check_no_planned_modules(model)
    if isinstance(model, torch.jit.ScriptModule):  # refuses the forward hook put on
        # the model below: "register_forward_hook is not supported on ScriptModules"
        raise CaptureError(_scripted_submodules(model))
    _check_not_distributed_wrapper(model)
    args, kwargs = normalize_example_inputs(example_inputs)
    autocast = autocast_state()  # the trace fixes each op's dtype as it chooses
    check_hooks_at_capture(model, mode)
    _check_not_released(model)
    _check_no_meta_weights(model)
    _check_plain_tensors(model)
    check_inputs_are_not_state(model, args, kwargs)
    with (
        _grad_flags_kept(model),
        plain_attributes_left_alone(model) as watch,
        functions_applied(mode == "train") as functions,
        gradient_hooks_recorded(mode == "train") as hooks,
    ):
        try:
            exported = _export(model, args, kwargs)
        except CaptureError as error:
            hint_args_kwargs_reading(error, example_inputs)
            raise
    refuse_stale_reads(type(model).__name__, watch, exported)
    check_state_does_not_overlap(
        model, written_state(exported), trained=mode == "train", constants=exported.constants
    )
    exported = merge_constants_that_are_state(exported)
    refuse_control_flow(exported.graph, type(model).__name__)
    refuse_custom_backwards(functions, type(model).__name__)
    refuse_gradient_hooks(hooks, type(model).__name__)
    refuse_data_dependent_shapes(exported.graph)
    refuse_converting_copies(exported, type(model).__name__)
    with rnn_dropout_kept():  # where AOTAutograd or run_decompositions decompose RNNs
        if mode == "infer":
            captured = _capture_inference(exported, args, kwargs, type(model).__name__)
        else:
            captured = _capture_joint(model, exported, args, kwargs, kernels)
    captured.extra["autocast"] = autocast
    # as the trace left them, which a call checks they stay: a model may install
    # hooks of its own in its first forward (transformers' output recorders: 8 on a
    # DPT), and those were taken for the caller's once any hook anywhere came later
    captured.extra["hooks"] = module_hooks(model, backward=mode == "train")
    if mode == "train":  # their gradients go through autograd, which runs the hooks
        captured.extra[HOOKED_PARAMS] = hooked_parameters(model)
        captured.extra[FROZEN_PARAMS] = frozenset(
            n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad
        )
    # what a call must match
    formats = reads_memory_format(captured.graph_module)
    captured.extra["call"] = PlannedCall(args, kwargs, mode, formats_matter=formats)
    captured.extra[NONFINITE_SOURCES] = nonfinite_sources(model, captured, args, kwargs)
    return captured


@contextlib.contextmanager
def _grad_flags_kept(model: torch.nn.Module) -> Any:
    """Leave the model's buffers as the trace found them. A buffer that forward
    reaches through another object (transformers' static cache) is traced as the
    real tensor, and an in-place write of a value that requires grad into it made
    it require grad, no longer a leaf: the model's own eager forward then failed
    outside ``no_grad`` ("a leaf Variable that requires grad is being used in an
    in-place operation")."""
    buffers = [b for _, b in model.named_buffers(remove_duplicate=True) if not b.requires_grad]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer in buffers:
                if buffer.requires_grad:
                    buffer.detach_()


def _check_not_released(model: torch.nn.Module) -> None:
    """A model an earlier plan took weights from (``planner.released``) cannot be
    traced: its stand-ins hold no values, and torch.export said only that it
    found tensors on two devices, cpu and meta."""
    taken = {
        name: t
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if isinstance(t, ReleasedWeight)
    }
    if taken:
        how = next(iter(taken.values())).taken_by
        raise CaptureError(
            f"{type(model).__name__}: {listed(list(taken))} {'was' if len(taken) == 1 else 'were'} "
            f"moved into a planned module {how}, so this model no longer holds "
            f"{'its' if len(taken) == 1 else 'their'} values. Plan a copy of the model "
            f"made before the first plan (copy.deepcopy(model) before planner.plan), or "
            f"load the weights into it again (load_state_dict(..., assign=True))"
        )


def _check_no_meta_weights(model: torch.nn.Module) -> None:
    """A model built on the meta device without its checkpoint attached holds no
    values: torch.export said only that it found tensors on two devices."""
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise CaptureError(
            f"{type(model).__name__}: {listed(empty)} {'is' if len(empty) == 1 else 'are'} "
            f"on the meta device and hold no values. Pass its weights' safetensors "
            f"checkpoint (planner.plan(..., checkpoint=PATH); planner report: "
            f"--checkpoint PATH; or planner.attach_checkpoint(model, PATH) first), or "
            f"build the model outside torch.device('meta')"
        )


def _check_plain_tensors(model: torch.nn.Module) -> None:
    """A weight that is a tensor subclass wrapping others (torchao's quantized
    tensors, an NF4 weight, torch's TwoTensor) has no storage of its own to copy,
    offload or measure: the state checks failed on it with a raw "invalid python
    storage" error, and before them the plan failed at its first call."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    wrapped = [
        f"{name} ({type(t).__name__})"
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if is_traceable_wrapper_subclass(t)
    ]
    if wrapped:
        what = "is a tensor subclass" if len(wrapped) == 1 else "are tensor subclasses"
        raise CaptureError(
            f"{type(model).__name__}: {listed(wrapped)} {what} "
            f"wrapping other tensors; planner places, copies and stores plain tensors only. "
            f"Convert {'it' if len(wrapped) == 1 else 'them'} to plain tensors before planning "
            f"(dequantize the layer), or leave this part of the model unplanned"
        )


def _check_no_planned_modules(model: torch.nn.Module) -> None:
    """A planned module inside the model cannot be traced (it runs a schedule of its
    own): a training plan's exposes the model's parameter names, and torch.export
    failed on them with a bare "PlannedModule has no attribute `0`"."""
    from planner.planned_module import PlannedModule  # imports this module

    planned = [
        repr(name) if name else "the model itself"
        for name, module in model.named_modules()
        if isinstance(module, PlannedModule)
    ]
    if planned:
        raise CaptureError(
            f"{type(model).__name__}: {listed(planned)} "
            f"{'is a planned module' if len(planned) == 1 else 'are planned modules'} "
            f"(made by planner.plan), which cannot be traced into another plan. Plan the "
            f"model with the original module in its place (a copy made before the first "
            f"planner.plan), or call the planned module beside the rest unplanned"
        )


def _check_not_distributed_wrapper(model: torch.nn.Module) -> None:
    """A ``DistributedDataParallel`` wrapper's forward runs its reducer's bookkeeping,
    which torch.export refuses ("Non-recursive torch.compiler.disable is not
    supported"); the error then told the user to make forward() traceable. The
    order that works is the other one: plan the model, then wrap the planned module
    (its gradients all-reduce as eager DDP's do, bit for bit)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise CaptureError(
            f"the model is a DistributedDataParallel wrapper (of "
            f"{type(model.module).__name__}), whose forward runs DDP's own gradient "
            f"bookkeeping and cannot be traced into a plan. Plan the model it wraps, "
            f"then wrap the planned module: DistributedDataParallel(planner.plan(model, "
            f"..., mode='train')) (its gradients are all-reduced as eager DDP's are)"
        )


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    # on a failure torch.export prints the partial graph it traced to stderr (a
    # thousand lines for a Longformer) before raising: kept on the error instead
    stderr = io.StringIO()
    graph = None
    try:
        with contextlib.redirect_stderr(stderr):
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # torch raises many types; we add the user's line
        graph = getattr(exc, "partial_fx_graph", None)
        where = "\n(the graph traced before the failure: this error's .partial_graph)"
        error = CaptureError(
            _scripted_submodules(model)
            or _describe_trace_failure(model, exc) + (where if graph else "")
        )
        error.partial_graph = graph
        raise error from exc
    finally:
        # after a failure with a partial graph, what was written is that graph (each
        # of torch's export wrappers prints it); else it goes where it was headed
        if not graph:
            sys.stderr.write(stderr.getvalue())


def _scripted_submodules(model: torch.nn.Module) -> str:
    """Why a trace failed when TorchScript modules are inside: torch.export cannot
    call them (a scripted Linear failed with "forward() takes 2 positional arguments
    but 3 were given", naming nothing the user wrote)."""
    scripted = [
        name or "the model itself"
        for name, module in model.named_modules()
        if isinstance(module, torch.jit.ScriptModule)
    ]
    if not scripted:
        return ""
    return (
        f"planner could not trace {type(model).__name__}: it holds TorchScript modules "
        f"({listed(scripted)}; torch.jit.script or torch.jit.trace), which torch.export cannot "
        f"trace through. Plan the model built from plain nn.Modules (before scripting)"
    )


_FRAMEWORK_PATHS = (
    "/torch/",
    "/planner/",
    "/transformers/utils/",
    "/contextlib.py",
    "/functools.py",
    "<string>",  # code torch generates at run time (a lambda of its own)
)


def _describe_trace_failure(model: torch.nn.Module, exc: BaseException) -> str:
    """Name the user's source line where tracing failed, and what to do."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not any(p in f.filename for p in _FRAMEWORK_PATHS)]
    where = ""
    if user:
        f = user[-1]
        where = f"\n  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    # a torch.nn module the model calls is model code too: name its line (inside
    # nn.Transformer, say) where the user's own line is only the call into it
    last_user = max((i for i, f in enumerate(frames) if user and f is user[-1]), default=-1)
    library = [
        f
        for f in frames[last_user + 1 :]
        if "/torch/nn/" in f.filename and not f.filename.endswith("/torch/nn/modules/module.py")
    ]
    if library:
        f = library[-1]
        shown = f.filename[f.filename.index("torch/nn/") :]
        where += f"\n  inside {shown}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = (
        "Data-dependent control flow (an `if` or loop on a tensor's value, .item(), "
        "nonzero) cannot be planned ahead of time: compute both branches and select "
        "with torch.where, decide in Python on something fixed when planning (a "
        "shape), or move it out of forward() and pass the result in as an input "
        "(torch.cond is refused too: a plan is one straight-line graph)."
    )
    if library and library[-1].name == "_detect_is_causal_mask":
        hint = (
            "nn.Transformer reads a given mask's values to tell whether it is causal: "
            "say so instead, with tgt_is_causal=True (or src_is_causal / is_causal, "
            "for encoder and layer calls) next to the causal mask, or False."
        )
    elif library and "num_batches_tracked" in (library[-1].line or ""):
        hint = (
            "A batch norm with momentum=None (a cumulative average) reads how many "
            "batches it has tracked into Python: give it a float momentum (0.1 is the "
            "default), or plan it in eval mode."
        )
    elif _given_a_packed_sequence(exc):
        hint = (
            "An RNN given a PackedSequence (pack_padded_sequence) sizes its work by the "
            "lengths' values, which a plan cannot know ahead of time: plan the model "
            "on padded batches without packing (masking what the padding computes), or "
            "keep the packed RNN outside the planned module."
        )
    elif type(exc).__name__ == "DynamicOutputShapeException":
        hint = (
            f"{first} makes an output whose shape depends on its inputs' values (torch "
            f"cannot size it ahead of time, so neither can a plan): compute it outside "
            f"the planned module (a loss such as F.ctc_loss: plan the model that makes "
            f"its inputs) and pass the result in, or use an op of fixed shape."
        )
    elif "which is not a known type" in str(exc):
        hint = _unknown_output_hint(str(exc))
    elif "data-dependent" not in str(exc).lower() and "guard" not in str(exc).lower():
        hint = (  # a model given inputs it does not take got only the first sentence
            "Check that the model runs on these example inputs as given (their shapes, "
            "dtypes and devices: an error raised by one of its ops is often an input "
            "it does not take, which eager raises too); else make forward() "
            "traceable by torch.export(strict=False): avoid Python-side effects and "
            "unsupported ops there."
        )
    return (
        f"planner could not trace {type(model).__name__}: "
        f"{type(exc).__name__}: {first}{where}\n{hint}"
    )


def _given_a_packed_sequence(exc: BaseException) -> bool:
    """Whether the trace failed inside an RNN module's forward given a
    PackedSequence (its batch sizes are the lengths' values)."""
    packed = torch.nn.utils.rnn.PackedSequence
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith("nn/modules/rnn.py") and any(
            isinstance(v, packed) for v in frame.f_locals.values()
        ):
            return True
        tb = tb.tb_next
    return False


def _unknown_output_hint(message: str) -> str:
    """What to do when the outputs hold an object torch.export cannot flatten: a
    transformers model in eval mode returns its key/value cache (a DynamicCache)
    unless told not to, and torch's message about pytrees named nothing of that."""
    found = re.search(r"Found <class '([\w.]+)'>", message)
    name = found.group(1).rsplit(".", 1)[-1] if found else "object"
    if found and "cache" in found.group(1).lower():
        return (
            f"The model returns a {name} (a transformers cache of past keys and values, "
            f"returned while use_cache is on): plan it with the cache off, "
            f"model.config.use_cache = False or use_cache=False in the example inputs' "
            f"keyword arguments, or wrap the model to return the tensors you use. To "
            f"decode with a cache, plan a step with a static one (transformers' "
            f"TorchExportableModuleWithStaticCache: README, generation; "
            f"examples/generate_llama.py), not a DynamicCache passed in."
        )
    return (
        f"The model's outputs hold an instance of {name}, which torch.export cannot flatten into "
        f"tensors: return tensors (or lists, tuples, dicts of them), or register the "
        f"class as a pytree node (torch.utils._pytree.register_pytree_node)."
    )


def _capture_inference(
    ep: torch.export.ExportedProgram, args: tuple, kwargs: dict, model_name: str
) -> CapturedGraph:
    from torch.export.graph_signature import InputKind, OutputKind

    # before functionalizing: torch's run_decompositions fails with a bare
    # AssertionError on a write into an input that aliases another input (one
    # tensor passed twice, two views of one storage)
    written = inputs_written_in_place(ep)
    if written:  # one tensor passed twice is written under each of its names
        leaves = pytree.tree_leaves((args, kwargs))
        names = user_input_names(ep)
        if len(names) == len(leaves):  # else name the ones written only
            ids = {id(leaves[names.index(w)]) for w in written}
            written = [n for n, x in zip(names, leaves, strict=True) if id(x) in ids]
        raise CaptureError(_input_mutation_message(model_name, written))
    with warnings.catch_warnings():
        # torch 2.13's own deep copy of its call graph warns once per plan about its
        # own deprecated LeafSpec check: nothing a caller of planner can change
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
        ep = ep.run_decompositions({})  # functionalize only: keep ops whole
    true_layouts(ep.graph_module)  # where a CPU kernel's output layout breaks the fake one
    explicit_metadata_args(ep.graph_module)
    input_kind = {
        InputKind.PARAMETER: ValueKind.PARAM,
        InputKind.BUFFER: ValueKind.BUFFER,
        InputKind.CONSTANT_TENSOR: ValueKind.BUFFER,
        InputKind.USER_INPUT: ValueKind.INPUT,
    }
    input_roles = []
    for spec in ep.graph_signature.input_specs:
        kind = input_kind.get(spec.kind, ValueKind.INPUT)
        input_roles.append(Role(kind, spec.target or spec.arg.name))
    user_paths = _input_paths(args, kwargs)
    user_roles = [r for r in input_roles if r.kind is ValueKind.INPUT]
    for role, path in zip(user_roles, user_paths):
        role.source = path
    written = [
        s.target
        for s in ep.graph_signature.output_specs
        if s.kind is OutputKind.USER_INPUT_MUTATION
    ]
    if written:
        raise CaptureError(_input_mutation_message(model_name, written))
    output_roles: list[Role | None] = []
    for spec in ep.graph_signature.output_specs:
        if spec.kind is OutputKind.USER_OUTPUT:
            output_roles.append(Role(ValueKind.OUTPUT, "output"))
        else:
            output_roles.append(Role(ValueKind.OUTPUT, f"{spec.target} (updated)"))
    return CapturedGraph(
        mode="infer",
        graph_module=ep.graph_module,
        input_roles=input_roles,
        output_roles=output_roles,
        num_forward_outputs=len(output_roles),
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        extra={
            "exported_program": ep,
            "output_constants": _output_constants(ep.graph_module, len(output_roles)),
        },
    )


def _input_paths(args: tuple, kwargs: dict) -> list[str]:
    """The path of every leaf of the inputs, in flattening order: tensors and the
    flags beside them alike (``use_cache=False``), since both the exported
    program's user inputs and the joint graph's primals count them."""
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    return ["input" + pytree.keystr(path) for path, _ in leaves]


class _FlatModule(torch.nn.Module):
    """Calls the exported module on flat inputs and returns flat outputs, so that
    AOTAutograd sees a plain function of tensors.

    The exported graph runs node by node (an FX ``Interpreter``) with each node's
    metadata current, as AOTAutograd runs a graph module it is handed: the joint
    graph's nodes, forward and backward, then carry the model's source lines, which
    the floor message, the report and the refusals name. Its generated code would
    run the same ops with no metadata current. The input-checking hooks of
    ``ep.module()`` are not run: export checked these very inputs.
    """

    def __init__(self, inner: torch.nn.Module, in_spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.inner = inner
        self.in_spec = in_spec
        self.out_spec: pytree.TreeSpec | None = None

    def forward(self, *flat: Any) -> tuple:
        args, kwargs = pytree.tree_unflatten(list(flat), self.in_spec)
        out = self._run_inner(args, kwargs)
        leaves, self.out_spec = pytree.tree_flatten(out)
        return tuple(leaves)

    def _run_inner(self, args: tuple, kwargs: dict) -> Any:
        inner = self.inner
        graph_in_spec = getattr(inner, "_in_spec", None)
        if not isinstance(inner, torch.fx.GraphModule) or graph_in_spec is None:
            return inner(*args, **kwargs)
        # the flattening the generated forward starts with
        graph_inputs = fx_pytree.tree_flatten_spec((args, kwargs), graph_in_spec)
        with fx_traceback.preserve_node_meta():
            out = _NodeByNode(inner).run(*graph_inputs, enable_io_processing=False)
        return inner.graph.process_outputs(out)


#: higher-order ops that only call their body in a context: the body of a
#: ``torch.autocast`` or ``torch.no_grad()`` region, a graph module of its own
_REGION_WRAPPERS = (
    torch.ops.higher_order.wrap_with_autocast,
    torch.ops.higher_order.wrap_with_set_grad_enabled,
)


class _NodeByNode(torch.fx.Interpreter):
    """Runs a graph node by node, and the body of an autocast or grad-mode region
    in it too (its generated code ran those ops with the region's call current,
    which carries no source line: none of a ``torch.autocast`` region's ops, forward
    or backward, named one). An op's error is raised as the generated code raises
    it: the Interpreter's note (the node, its stack, tlparse) went into the first
    line of a bare one, and a KeyError became a RuntimeError that lost the line
    raising it."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.extra_traceback = False

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _REGION_WRAPPERS:
            body = next(a for a in args if isinstance(a, torch.fx.GraphModule))
            args = tuple(_run_node_by_node(body) if a is body else a for a in args)
        return super().call_function(target, args, kwargs)


def _run_node_by_node(body: torch.fx.GraphModule) -> Any:
    def run(*args: Any) -> Any:
        return _NodeByNode(body).run(*args)

    return run


def _drop_self_copies(gm: torch.fx.GraphModule) -> None:
    """Unlifting an exported program writes each mutated buffer back at the end,
    ``copy_(count, add_)``, even where the value is the buffer itself (``add_`` is
    ``count.add_(1)``). Eager never makes that copy, and AOTAutograd, tracing it,
    sees the buffer written again after an op saved it for backward
    (``self.count += 1; return h * self.count``: "modified by an inplace
    operation"). A copy of a tensor into itself changes nothing: drop it."""

    def base(node: Any) -> Any:
        while (
            isinstance(node, torch.fx.Node)
            and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.arguments
            and node.target._schema.arguments[0].alias_info is not None
            and node.target._schema.arguments[0].alias_info.is_write
            and node.args
        ):
            node = node.args[0]  # an in-place op returns its first argument
        return node

    changed = False
    for node in list(gm.graph.nodes):
        if (
            node.op == "call_function"
            and node.target is torch.ops.aten.copy_.default
            and not node.users
            and len(node.args) == 2
            and node.args[1] is not node.args[0]
            and base(node.args[1]) is node.args[0]
        ):
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


#: test hook: run AOTAutograd to its end (partition, compile) as before
_FULL_AOT_RUN = False


class _JointCaptured(Exception):
    """Raised from the partition function once the joint graph and AOTAutograd's
    metadata of the forward are in hand: what AOTAutograd does after (partition
    the joint, compile both halves, wrap them) was thrown away: 1-1.7 s of a
    32-layer GPT-2's 10 s training capture (alone, on a loaded machine); with the
    deferred full collections, 5.6 s instead of 7.7 (BENCHMARKS_solver.md)."""


def _partition_caller_metadata() -> Any:
    """AOTAutograd's view-and-mutation metadata of the forward, from the frame that
    calls the partition function (``inner_meta`` there: what it sets as the tracing
    context's ``fw_metadata`` before compiling the forward, where it was read
    before). None if that frame holds no such value (another torch version): the
    capture then runs AOTAutograd to its end and reads it there."""
    from torch._functorch._aot_autograd.schemas import ViewAndMutationMeta

    frame = sys._getframe(2)  # keep_joint's caller
    metadata = frame.f_locals.get("inner_meta")
    if not isinstance(metadata, ViewAndMutationMeta):
        return None
    if metadata.traced_tangent_metas is None:
        # as AOTAutograd leaves it once compiled: the trace's fake tangents dropped
        metadata.make_runtime_safe()
    return metadata


def _capture_joint(
    model: torch.nn.Module,
    ep: torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict,
    kernels: str = "eager",
) -> CapturedGraph:
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition
    from torch._subclasses.fake_tensor import FakeTensorMode

    flat_inputs, in_spec = pytree.tree_flatten((args, kwargs))
    inner = ep.module()
    _drop_self_copies(inner)
    constants = _constants_as_buffers(inner, ep, model)
    flat_module = _FlatModule(inner, in_spec)
    seen: dict[str, Any] = {}

    def keep_joint(joint: torch.fx.GraphModule, joint_inputs: Sequence, **kw: Any) -> Any:
        seen["joint"] = joint
        seen["num_fwd_outputs"] = kw["num_fwd_outputs"]
        metadata = None if _FULL_AOT_RUN else _partition_caller_metadata()
        if metadata is not None:
            seen["fw_metadata"] = metadata
            raise _JointCaptured
        return default_partition(joint, joint_inputs, **kw)

    def no_compile(gm: torch.fx.GraphModule, _inputs: Sequence) -> torch.fx.GraphModule:
        return gm

    def keep_forward_metadata(gm: torch.fx.GraphModule, _inputs: Sequence) -> torch.fx.GraphModule:
        # which outputs alias others or inputs, and which take a gradient: AOTAutograd
        # sets this on its tracing context before compiling the forward
        context = torch._guards.TracingContext.try_get()
        seen["fw_metadata"] = getattr(context, "fw_metadata", None)
        return gm

    try:
        # a tracing context (as torch.compile's) is where AOTAutograd leaves the
        # metadata; its fake mode is the one AOTAutograd would make for real inputs.
        # The grad mode is restored however the trace ends: torch's no_grad region op
        # (wrap_with_set_grad_enabled) sets it back only when its body returns, and an
        # op failing in one left the caller's process with gradients off
        with (
            torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode())),
            torch.set_grad_enabled(torch.is_grad_enabled()),
        ):
            aot_module_simplified(
                flat_module,  # type: ignore[arg-type]  # any nn.Module works
                flat_inputs,
                fw_compiler=keep_forward_metadata,  # type: ignore[arg-type]
                bw_compiler=no_compile,  # type: ignore[arg-type]
                partition_fn=keep_joint,
            )
    except _JointCaptured:
        pass
    except Exception as exc:
        raise CaptureError(_describe_trace_failure(model, exc)) from exc
    if "joint" not in seen:
        raise CaptureError(_no_backward_message(model))
    joint: torch.fx.GraphModule = seen["joint"]
    # where a CPU kernel's output layout breaks the fake one: eager kernels run on
    # the layout the kernel returns, as eager does (a restriding copy made the ops
    # after it reduce another layout, rounding apart from eager's), compiled runs on
    # the fake one, which Inductor's BatchNorm returns
    # (the forward's outputs keep their traced layouts: their gradients come in as
    # tangents traced in those)
    if kernels == "inductor":
        fix_layouts(joint)
    else:
        true_layouts(joint, fixed_outputs=seen["num_fwd_outputs"])
    drop_metadata_asserts(joint)
    explicit_metadata_args(joint)
    inline_scalar_constants(joint, type(model).__name__)
    num_fwd = seen["num_fwd_outputs"]
    input_roles = _joint_input_roles(joint, flat_module, args, kwargs)
    fw_metadata = seen.get("fw_metadata")
    if fw_metadata is not None:
        # the caller's inputs, and anything that requires grad (a parameter): the
        # planned backward carries no gradient through an in-place write
        written_into = [
            role
            for role, info in zip(input_roles, fw_metadata.input_info)
            if info.mutates_data and (role.kind is ValueKind.INPUT or info.requires_grad)
        ]
        params = [r.source or "a parameter" for r in written_into if r.kind is ValueKind.PARAM]
        if params:
            raise CaptureError(_parameter_write_message(type(model).__name__, params))
        state = [r.source or "a buffer" for r in written_into if r.kind is not ValueKind.INPUT]
        if state:
            raise CaptureError(_state_mutation_message(type(model).__name__, state))
        if written_into:
            written = [r.source or "an input" for r in written_into]
            raise CaptureError(_input_mutation_message(type(model).__name__, written))
    bases = fw_metadata.num_intermediate_bases if fw_metadata is not None else 0
    mutated = (
        # AOTAutograd's own account of the inputs whose new values the forward
        # returns first: the export graph's signature misses a buffer written inside
        # a no_grad region (spectral norm's power iteration), and its new value was
        # then handed to the caller as the model's output
        [input_roles[i].source or "" for i in fw_metadata.mutated_inp_runtime_indices]
        if fw_metadata is not None
        else _mutated_buffers(ep, input_roles)
    )
    output_roles = _joint_output_roles(joint, input_roles, num_fwd, mutated, bases)
    return CapturedGraph(
        mode="train",
        graph_module=joint,
        input_roles=input_roles,
        output_roles=output_roles,
        num_forward_outputs=num_fwd,
        in_spec=in_spec,
        out_spec=flat_module.out_spec,
        extra={
            "exported_program": ep,
            "fw_metadata": fw_metadata,
            "constants": constants,
            "output_constants": _output_constants(joint, num_fwd),
        },
    )


def _attribute(model: torch.nn.Module, fqn: str) -> object:
    """``model``'s attribute at dotted path ``fqn``, or None."""
    target: object = model
    for part in fqn.split("."):
        target = getattr(target, part, None)
    return target


def _output_constants(
    graph_module: torch.fx.GraphModule, num_forward: int
) -> list[tuple[int, Any]]:
    """The forward's non-tensor outputs (``None``, an int, a shape's sizes, a
    string), by position among the forward outputs. The graph returns them as
    constants; the executor returns tensors only, and the planned module puts these
    back where they stood (a module returning ``(y, None)``, as
    ``nn.MultiheadAttention`` does without weights, failed to unflatten)."""
    (output,) = [n for n in graph_module.graph.nodes if n.op == "output"]
    flat = pytree.tree_leaves(output.args[0], is_leaf=lambda x: x is None)
    return [(i, v) for i, v in enumerate(flat[:num_forward]) if not isinstance(v, torch.fx.Node)]


def _constants_as_buffers(
    module: torch.nn.Module, ep: torch.export.ExportedProgram, model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Make each tensor the model holds as a plain attribute (a sinusoidal table:
    VideoMAE's position embeddings) a non-persistent buffer of the exported module,
    so that AOTAutograd takes it as an input like the other buffers. As a plain
    attribute it stayed a real tensor inside AOTAutograd's fake trace, which
    refused it. Not the constants forward makes (``torch.tensor(2.0)``, lifted as
    ``lifted_tensor_0``): AOTAutograd copies those in (``planner.ir.constants``).
    Returns them by name (the planned module reads them from here). One held in a
    plain list, dict or object (``self.tables = [t]``), lifted as a forward-made
    one is, is the model's too: found by identity, it is made a buffer by that
    name (training failed on it with torch's "convert all Tensors to
    FakeTensors")."""
    held = {id(t) for _, t in plain_tensors(model, state_views=True)}
    constants = {
        k: v
        for k, v in ep.constants.items()
        if isinstance(v, torch.Tensor)
        and (isinstance(_attribute(model, k), torch.Tensor) or id(v) in held)
    }
    for fqn, value in constants.items():
        path, _, leaf = fqn.rpartition(".")
        owner = module.get_submodule(path)
        if leaf in owner._buffers or leaf in owner._parameters:
            continue
        delattr(owner, leaf)
        owner.register_buffer(leaf, value, persistent=False)
    return constants


def _no_backward_message(model: torch.nn.Module) -> str:
    name = type(model).__name__
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if not trainable:
        return (
            f"{name}: no parameter requires grad, so there is no backward to plan. Use "
            f"mode='infer', or plan after setting requires_grad on what should train"
        )
    # reentrant checkpointing runs its forward under no_grad: the trace sees no
    # path from the outputs back to the parameters inside it
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # its name before transformers deprecated it
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    cause = (
        "its gradient checkpointing is on (gradient_checkpointing_enable()), and when "
        "reentrant it runs the checkpointed forward under no_grad, hiding it from the "
        "trace. planner chooses what to recompute itself: call "
        "model.gradient_checkpointing_disable() before planning, or enable it with "
        "gradient_checkpointing_kwargs={'use_reentrant': False}"
        if checkpointing
        else "something in its forward cuts the graph: reentrant activation "
        "checkpointing (torch.utils.checkpoint(..., use_reentrant=True), which runs "
        "under no_grad; planner chooses what to recompute itself, so drop it or pass "
        "use_reentrant=False), a torch.no_grad() block or .detach() on the way to "
        "the outputs"
    )
    return (
        f"{name}: no gradient flows from its outputs to any parameter or input in the "
        f"traced graph, though {trainable} parameters require grad: {cause}"
    )


def _input_mutation_message(model_name: str, written: list[str]) -> str:
    """A forward that writes into its own inputs (``x.mul_(2)``, ``x /= 255``): the
    executor hands each op fresh or planned buffers, and would neither write the
    caller's tensor nor read the written value back as eager does."""
    return (
        f"{model_name}.forward writes in place into its input(s) {', '.join(written)} "
        f"(e.g. x.mul_(2) or x /= 255); the planner does not plan writes into the "
        f"caller's tensors: make the update out of place (x = x * 2) or clone the "
        f"input first (x = x.clone()) in forward"
    )


def _parameter_write_message(model_name: str, written: list[str]) -> str:
    """Training: forward writes into a parameter that requires grad in place, even
    under ``torch.no_grad()`` (weight clipping, ``nn.Embedding(max_norm=...)``)."""
    verb = "requires" if len(written) == 1 else "require"
    return (
        f"{model_name}.forward writes in place into {', '.join(written)}, which "
        f"{verb} grad (e.g. weight clipping under torch.no_grad(), or "
        f"nn.Embedding(max_norm=...) renormalizing the rows it reads); a training plan "
        f"does not carry writes into the parameters it trains: make the write outside "
        f"forward, between steps (after optimizer.step()), freeze the parameter "
        f"(requires_grad_(False)), or plan mode='infer', which supports it"
    )


def _state_mutation_message(model_name: str, written: list[str]) -> str:
    """Training: forward writes a value that requires grad into a parameter or a
    buffer in place (a cache filled with activations)."""
    return (
        f"{model_name}.forward writes values that require grad into {', '.join(written)} "
        f"in place; a training plan carries no gradient through a write into the "
        f"model's state: write a detached value (as a key/value cache for generation "
        f"does), keep the value in a local tensor, or plan mode='infer'"
    )


def drop_metadata_asserts(gm: torch.fx.GraphModule) -> int:
    """Erase ``aten._assert_tensor_metadata`` calls from ``gm`` in place; returns
    how many.

    Why: a no-op ``.to(dtype)`` or ``.float()`` traces to such an assert, and the
    joint graph places the asserts of the forward's ``.to`` calls in the backward,
    where they keep a dead tensor alive for the memory model. On GPT-2's training
    step the 32 MiB logits (``logits.float()`` in the loss) stayed live 13 steps
    past their last read. The assert checks dtype and device facts that the trace
    has already fixed (the planned program is specialized to them), and returns
    nothing."""
    target = torch.ops.aten._assert_tensor_metadata.default
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    for node in asserts:
        gm.graph.erase_node(node)
    if asserts:
        gm.recompile()
    return len(asserts)


def _joint_input_roles(
    joint: torch.fx.GraphModule, flat_module: _FlatModule, args: tuple, kwargs: dict
) -> list[Role]:
    """Placeholders are primals (params, buffers, user inputs, in AOTAutograd's
    order: ``named_parameters`` then ``named_buffers``, then the flat inputs) and
    then tangents."""
    roles: list[Role] = []
    strip = "inner."
    for name, _ in flat_module.named_parameters(remove_duplicate=False):
        roles.append(Role(ValueKind.PARAM, name.removeprefix(strip)))
    for name, _ in flat_module.named_buffers(remove_duplicate=False):
        roles.append(Role(ValueKind.BUFFER, name.removeprefix(strip)))
    roles.extend(Role(ValueKind.INPUT, p) for p in _input_paths(args, kwargs))
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if n.name.startswith("primals")]
    tangents = [n for n in placeholders if n.name.startswith("tangents")]
    if len(primals) != len(roles):
        # AOTAutograd dropped duplicate inputs (tied weights); fall back to
        # positional kinds without names rather than mislabel.
        log.warning("joint graph has %d primals for %d inputs", len(primals), len(roles))
        roles = roles[: len(primals)] + [Role(ValueKind.INPUT)] * (len(primals) - len(roles))
    roles += [Role(ValueKind.TANGENT, f"grad of output {i}") for i in range(len(tangents))]
    return roles


def _joint_output_roles(
    joint: torch.fx.GraphModule,
    input_roles: list[Role],
    num_fwd: int,
    mutated: list[str],
    num_intermediate_bases: int = 0,
) -> list[Role | None]:
    """Forward outputs: updated buffers (``mutated``, by name, in the order
    returned), user outputs, then the intermediate bases that user outputs are
    views of (``runtime/output_aliases.py``); then gradients."""
    (output_node,) = [n for n in joint.graph.nodes if n.op == "output"]
    outs = pytree.tree_leaves(output_node.args[0], is_leaf=lambda x: x is None)
    n_user = num_fwd - len(mutated) - num_intermediate_bases
    roles: list[Role | None] = []
    for i, out in enumerate(outs):
        if out is None:
            roles.append(None)
        elif i < len(mutated):
            roles.append(Role(ValueKind.OUTPUT, f"{mutated[i]} (updated)"))
        elif i >= len(mutated) + n_user and i < num_fwd:
            k = i - len(mutated) - n_user
            roles.append(Role(ValueKind.OUTPUT, f"base {k} of outputs that are its views"))
        elif i < num_fwd:
            roles.append(
                Role(ValueKind.OUTPUT, f"output {i - len(mutated)}" if n_user > 1 else "output")
            )
        else:
            primal = input_roles[i - num_fwd] if i - num_fwd < len(input_roles) else None
            src = primal.source if primal else None
            roles.append(Role(ValueKind.GRAD, f"grad of {src}" if src else None))
    return roles


def _mutated_buffers(ep: torch.export.ExportedProgram, input_roles: list[Role]) -> list[str]:
    """Buffers the forward writes in place (BatchNorm's running statistics), in the
    order AOTAutograd returns their new values: the inputs' order."""
    to_buffer = ep.graph_signature.inputs_to_buffers
    written: set[str] = set(ep.graph_signature.buffers_to_mutate.values())
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        bound = dict(zip((a.name for a in schema.arguments), node.args))
        bound.update(node.kwargs)
        # composite norms (aten.batch_norm) update running stats without saying so
        # in their schema: in training mode (or using input stats) they do
        updates_stats = bool(bound.get("training", bound.get("use_input_stats", False)))
        for arg in schema.arguments:
            value = bound.get(arg.name)
            if not isinstance(value, torch.fx.Node) or value.name not in to_buffer:
                continue
            info = arg.alias_info
            if (info is not None and info.is_write) or (
                updates_stats and arg.name in ("running_mean", "running_var")
            ):
                written.add(to_buffer[value.name])
    return [r.source for r in input_roles if r.kind is ValueKind.BUFFER and r.source in written]
