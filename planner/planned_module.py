"""PlannedModule: the user's model, run by the generated executor under its plan.

It owns the tier stores (a fresh directory per module, removed when the module is
garbage-collected, at interpreter exit, or by ``close()``), the copy engine, and the
device-resident state. Weights whose home is a tier are written there once, here,
and then released from the wrapped model (its parameters are replaced by meta
tensors, as Accelerate's disk offload does), so they no longer occupy device
memory through either module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.call_checks import (
    BackwardReads,
    PlannedCall,
    StateTypes,
    StateWatch,
    SwapWatch,
    TierParams,
    accumulators,
    check_deliveries_wanted,
    check_not_batched,
    check_not_create_graph,
    check_not_forward_ad,
    check_not_functorch_transform,
    check_not_unfrozen,
    warn_if_saved_tensors_hooks,
)
from planner.codegen.assemble import Assembled, assemble
from planner.codegen.emit import Executor
from planner.codegen.segments import kernels_summary
from planner.errors import InvalidPlan, PlannerError, PlannerWarning, listed
from planner.ir.autocast import (
    AutocastState,
    any_autocast_enabled,
    autocast_off,
    check_autocast,
    check_backward_autocast,
)
from planner.ir.hooks import HookWatch
from planner.ir.meta import BUFFER_UPDATES, PARAM_GRADS
from planner.ir.program import Phase, ValueKind
from planner.model_slots import (
    compact,
    free_if_moved_still_held,
    materialize,
    names_by_tensor,
    release_slots,
    replace_slot,
    slot_tensor,
    warn_if_still_held,
)
from planner.passes.pipeline import Analysis
from planner.quantized_weights import Made, WeightQuantizer
from planner.released import FROZEN_QUANTIZED, ReleasedWeight, released_like
from planner.report import Report
from planner.runtime.checkpoint import is_checkpoint_view, is_file_backed
from planner.runtime.copy_engine import CopyEngine, ThreadCopyEngine, make_engine
from planner.runtime.exact_blocks import exact_blocks
from planner.runtime.meter import Measurement, measure
from planner.runtime.runtime import Runtime, output_error
from planner.runtime.store import DiskStore
from planner.solver.plan import Plan
from planner.solver.problem import Problem
from planner.step_wiring import StepWiring
from planner.traced_mode import ModeWatch, check_call_mode, depends_on_mode, draws_random

log = logging.getLogger(__name__)


def direct_op(fn: Any) -> Any:
    """What the executor calls for ``fn``: an ATen ``OpOverload``'s own C++
    callable, which ``OpOverload.__call__`` calls and nothing more (one Python
    frame less per op: 0.4-0.5 us, over a training step of a few hundred small
    ops a fifth of its time); anything else as it is."""
    return fn._op if type(fn) is torch._ops.OpOverload else fn


def _exclude_forward_from_dynamo() -> None:
    """``torch.compile(pm)`` runs the plan as it is (its runs are compiled already,
    or eager by choice); traced by Dynamo it failed on its own guards. Done at the
    first module, not at import: ``torch.compiler.disable`` imports Dynamo (1.5 s
    of ``import planner``), which ``plan()`` has imported by then."""
    if not getattr(PlannedModule.forward, "_planner_excluded", False):
        from torch._C._dynamo.eval_frame import get_eval_frame_callback

        plain = PlannedModule.forward
        excluded = torch.compiler.disable(plain)

        # an eager call (no Dynamo frame callback set) needs no wrapper: torch's
        # annotates the FX trace in one global dict whenever any thread exports
        # (is_exporting() is process-wide), so a call made while another thread
        # planned failed there with KeyError: 'custom'. Dynamo folds this check
        # to True, so it meets the excluded forward and skips it
        def forward(self: PlannedModule, *args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_dynamo_compiling() and get_eval_frame_callback() is None:
                return plain(self, *args, **kwargs)
            return excluded(self, *args, **kwargs)

        forward._planner_excluded = True  # type: ignore[attr-defined]
        PlannedModule.forward = forward  # type: ignore[method-assign]


def _close(engine: CopyEngine, disk: DiskStore, pid: int) -> None:
    """Stop the copy engine and remove the offload files. A forked child that
    collects its inherited copy of the module leaves both to the parent, whose
    they are: the engine's threads (and CUDA streams) do not exist in the child,
    and its normal exit removed the parent's files."""
    if os.getpid() != pid:
        disk.close()  # its own descriptors only (``DiskStore.close``)
        return
    try:
        engine.close()
    finally:
        disk.close()


class PlannedModule(torch.nn.Module):
    """What ``planner.plan`` returns: call it as the model (``pm(x)``; in training,
    then ``loss.backward()``). ``report`` (per-tensor decisions), ``code`` (the
    generated executor), ``plan`` (the saved-able Plan), ``analysis`` (what
    planning measured); ``run_measured(*inputs)`` / ``run_measured_step(*inputs)``
    (training: forward and backward) run once under the independent meter and set
    ``measured`` (its peak_bytes) and ``measured_seconds``; ``close()`` removes its
    offload files (collection does too)."""

    def __init__(
        self,
        model: torch.nn.Module,
        analysis: Analysis,
        problem: Problem,
        plan: Plan,
        offload_dir: str | None = None,
        device: torch.device | None = None,
        kernels: str = "eager",
        assembled: Assembled | None = None,
        defer_release: bool = False,
        share_store_of: PlannedModule | None = None,
    ) -> None:
        """``assembled``: ``plan``'s executor, already built (``measured_room``
        builds candidates to choose from); None: built here. ``defer_release``:
        leave the weights homed off the device in ``model`` until
        ``release_offloaded(model)`` (``plan()`` checks a compiled plan by the
        meter first: a plan it refuses must leave the model whole).
        ``share_store_of``: the module of another input shape of the same model,
        whose plan homes the weights where this one does (``planner.shapes``):
        this one uses its offload store, copy engine and stored weights instead of
        writing them a second time, and closes with it."""
        super().__init__()
        _exclude_forward_from_dynamo()
        captured = analysis.captured
        self.mode = captured.mode
        self.plan = plan
        self.analysis = analysis
        self.problem = problem
        self.device = device or torch.device("cpu")
        if captured.out_spec is None:  # both captures set it
            raise PlannerError(
                "internal: the captured graph has no output structure; please report "
                "this with the model"
            )
        self._out_spec: pytree.TreeSpec = captured.out_spec
        program = analysis.program
        self._call: PlannedCall = captured.extra["call"]  # the arguments a call must give
        # the forward's first outputs (program.meta, as the solver reads them too)
        self._buffer_updates = list(program.meta[BUFFER_UPDATES])
        self._num_buffer_updates = len(self._buffer_updates)
        #: non-tensor forward outputs by position (the executor returns tensors only)
        self._output_constants: list[tuple[int, Any]] = captured.extra.get("output_constants", [])
        #: the program value of each tensor forward output, by position among all
        taken = {i for i, _ in self._output_constants}
        positions = (i for i in range(captured.num_forward_outputs) if i not in taken)
        self._forward_value_at = dict(
            zip(positions, program.outputs[: program.num_forward_outputs])
        )
        self.kernels = kernels
        self._model_name = type(model).__name__
        #: autocast as it was when traced (the trace fixed its dtypes), per device type
        self._autocast: AutocastState = captured.extra["autocast"]
        # the mode the model was traced in, where calling in the other would differ
        self.training = model.training
        self._traced_training = (
            model.training if self.mode == "train" and depends_on_mode(model, program) else None
        )
        if assembled is None:
            assembled = assemble(
                program, captured.graph_module, problem, plan, kernels, self.device
            )
        if kernels == "inductor":
            plan.compiled_peak_bytes = assembled.peak_bytes
        if assembled.peak_bytes > plan.budget_bytes:
            raise PlannerError(
                f"assembled here the plan's executor holds {assembled.peak_bytes:,} bytes, "
                f"over its budget of {plan.budget_bytes:,} (a saved plan whose compiled runs "
                f"allocate more on this machine or version): plan again instead of reusing it"
            )
        self.executor: Executor = assembled.executor
        # Training: forward tensors the plan moves to a tier wait there, in one slot per
        # tensor, for the backward; a second forward before that backward overwrites
        # them. Each forward is numbered so such a backward fails instead of misreading.
        forward_steps = {i for i, op in enumerate(program.ops) if op.phase is Phase.FORWARD}
        self._forward_spills = self.mode == "train" and any(
            a.kind == "offload" and a.step in forward_steps for a in plan.actions
        )
        #: the modules of this model's other input shapes (``add_other_shapes``)
        self._other_shapes: list[PlannedModule] = []
        self._owns_store = share_store_of is None
        disk: DiskStore
        engine: CopyEngine
        if share_store_of is None:
            disk = DiskStore(offload_dir)
            try:
                engine = make_engine(self.device, disk)
            except BaseException:
                disk.close()
                raise
            self._runtime = Runtime(engine)
            self._shared = _Shared()
            self._finalizer = weakref.finalize(self, _close, engine, disk, os.getpid())
        else:
            disk, engine = share_store_of._disk, share_store_of._engine
            self._runtime = Runtime(engine, weights_of=share_store_of._runtime)
            self._shared = share_store_of._shared
            self._finalizer = share_store_of._finalizer  # closing either closes both
        self._engine: CopyEngine = engine
        self._disk: DiskStore = disk
        #: (name, parameter) whose gradient the plan writes into .grad itself
        self._delivered_params: list[tuple[str, torch.Tensor]] = []
        #: parameter name -> the key its gradient is delivered under
        self._delivery_keys: dict[str, str] = {}
        self._quantizer = WeightQuantizer(
            self._runtime,
            disk,
            program,
            problem,
            self.device,
            self._shared.quantized_weights,
            self._shared.weight_keys,
        )
        #: per quantized tensor, its round-trip error (weights at plan time,
        #: activations by measure_quantization_error)
        self.quantization_errors = self._quantizer.errors
        self.offload_dir = disk.root
        try:
            # dropped from the analysis once used (its state dict holds the weights);
            # a second module of one training analysis takes the model's own tensors
            self._place_state(model, captured.extra.pop("exported_program", None), engine)
            self._record_state_types()
            if not defer_release:
                self.release_offloaded(model)
            namespace: dict[str, Any] = {
                "torch": torch,
                **{name: direct_op(fn) for name, fn in self.executor.ops.items()},
                **assembled.runs,
            }
            exec(compile(self.executor.source, "<planner executor>", "exec"), namespace)
            self._fn = namespace[self.executor.function_name]
            self._hook_watch = HookWatch(
                model, captured.extra["hooks"], self.mode, self._delivered_params
            )
            if self.mode == "train":
                self._bw = namespace[self.executor.backward_function_name]  # type: ignore[index]
                self._wiring = StepWiring.of(
                    analysis,
                    self._num_buffer_updates,
                    self._forward_value_at,
                    len(self.executor.tangent_values),
                )
                primals = zip(self._primal_names, self._primals)
                self._state_watch = StateWatch(model, self._model_entries(model, primals))
                self._mode_watch = ModeWatch(model, draws_random(program))
                #: parameters the traced graph computes no gradient for (a layer the
                #: forward never calls), passed to the step detached: as an input
                #: of the step node their gradient accumulators ran with no gradient,
                #: where eager never reaches them, so their post-accumulate-grad hooks
                #: fired and DDP's reducer counted them used (find_unused_parameters=
                #: False then gave zero gradients, which AdamW decays, where eager
                #: DDP raises that they were unused)
                self._no_gradient_primals = tuple(
                    i
                    for i, (p, slot) in enumerate(zip(self._primals, self._wiring.grad_slots))
                    if slot is None and p.requires_grad
                )
                # as the step sees them: a detached one needs no gradient, so a steady
                # loop keeps check_not_unfrozen's one tuple comparison
                self._primals_require_grad = tuple(
                    p.requires_grad and i not in self._no_gradient_primals
                    for i, p in enumerate(self._primals)
                )
                #: whether a primal with a gradient can be on another device than the
                #: backward's (only a tier-home parameter on CUDA, on the host): then each
                #: step records the primals' devices and moves such a gradient there
                #: (``StepWiring.gradients``). Inputs are on the devices ``_call``
                #: checks at each call; primals on the plan's device stay there (a
                #: tier-home one moved elsewhere is ``_tier_params``' error, a model
                #: converted in place fails the forward: ``StateTypes``)
                flat_devices = [p.device for p in self._primals] + list(self._call.devices)
                self._gradients_move = len(flat_devices) != len(self._wiring.grad_slots) or any(
                    k is not None and d != self.device
                    for k, d in zip(self._wiring.grad_slots, flat_devices)
                )
                self._delivery_accumulators = accumulators(self._delivered_params)
                self._tier_params = TierParams(self._tier_homed_params)
                self._backward_reads = BackwardReads(
                    program,
                    problem,
                    plan,
                    self._primal_names + self._call.tensor_names,
                    self._num_buffer_updates,
                    self._buffer_updates,
                )
            else:  # the weights it keeps on the device, the model's (the rest leave it)
                kept = zip(self._state_names, self._state)
                self._state_watch = StateWatch(model, self._model_entries(model, kept))
            self._swap_watch = SwapWatch(self, [*model._parameters, *model._buffers])
        except BaseException:
            if self._owns_store:  # another shape's module owns a shared one
                self._finalizer()
            raise
        self.measured: Measurement | None = None
        self.output_error: dict[str, float] | None = None  # see measure_quantization_error
        self.measured_seconds: float | None = None  # set by time_call
        self.timed_calls = 0  # how many calls measured_seconds is the median of
        #: which shape's plan ran the call ``measured`` (and ``measured_seconds``)
        #: is of: 0, this module's, or k, ``other_shapes[k - 1]``'s (whose own
        #: attributes hold it too); the report shows it beside that plan
        self._measured_shape = self._timed_shape = 0

    def _place_state(self, model: torch.nn.Module, ep: Any, engine: CopyEngine) -> None:
        """Device-home weights become this module's buffers; tier-home weights are
        written to their tier and released everywhere else. In training a tier-home
        parameter stays the model's, its data now a shared map of its file (the
        optimizer updates it there; each step reads it from there)."""
        program = self.analysis.program
        if self.mode == "train":  # autograd needs the model's own parameter objects
            tensors = dict(self.analysis.captured.extra.get("constants", {}))
            tensors.update(model.named_parameters(remove_duplicate=False))
            tensors.update(model.named_buffers(remove_duplicate=False))
        else:
            if ep is None:
                raise PlannerError("an inference analysis makes one planned module: plan again")
            tensors = {**ep.state_dict, **ep.constants}
        homes = {d.name: d.home for d in self.plan.tensors}
        #: buffers updated in place and homed in a tier (a key/value cache): the
        #: executor writes each call's update over the tier's copy; by the model's
        #: name -> (key, tier), for ``state_tensor``
        self._tier_buffers: dict[str, tuple[str, str]] = {}
        written_back = {
            self.problem.tensors[t.writes_home_of].name
            for t in self.problem.tensors
            if t.writes_home_of is not None
        }
        self._state_names: list[str] = []
        state: list[torch.Tensor] = []
        state_values = set(self.executor.state_values)
        released: list[str] = []
        #: training: every parameter and buffer, in the captured graph's order (the
        #: autograd node's inputs, so that gradients reach them)
        self._primals: list[torch.Tensor] = []
        self._primal_names: list[str] = []
        primal_of: dict[int, int] = {}
        written: set[str] = set()
        #: training: the parameters homed in a tier, their data a map of their file
        self._tier_homed_params: list[tuple[str, torch.Tensor]] = []
        for vi in program.inputs:
            value = program.values[vi]
            if value.kind not in (ValueKind.PARAM, ValueKind.BUFFER):
                continue
            tensor = tensors[value.source]
            primal_of[vi] = len(self._primals)
            self._primals.append(tensor)
            self._primal_names.append(value.source)  # type: ignore[arg-type]
            name = self.problem.tensors[value.storage].name
            if vi in state_values or name in written:
                continue
            written.add(name)
            if homes[name].startswith("device:"):  # stored quantized (see _store_quantized)
                released.append(value.source)  # type: ignore[arg-type]
                continue
            tier, _, fmt = homes[name].partition(":")
            if fmt:  # its tier holds it quantized
                problem_tensor = self.problem.tensors[value.storage]
                self._quantizer.in_tier(problem_tensor, tier, fmt, tensor.detach())
                released.append(value.source)  # type: ignore[arg-type]
                continue
            stored = name in self._shared.weight_keys  # by another shape's module, same home
            # a disk-home weight nothing writes (inference: none the plan writes; a
            # weight the forward returns has no home off the device. Training: a
            # frozen one) is read from its checkpoint where it lies
            read_only = name not in written_back and (
                self.mode != "train" or not tensor.requires_grad
            )
            linked = (
                not stored
                and read_only
                and is_checkpoint_view(tensor)
                and engine.link_now(name, homes[name], tensor.detach())
            )
            if not stored and not linked:
                engine.store_now(name, homes[name], compact(tensor.detach()))
            if tensor.requires_grad:
                self._runtime.grad_keys.add(name)
            self._shared.weight_keys.add(name)
            if self.mode == "train":  # CUDA: the parameter now lives on the host
                if not stored and not linked:  # else its data is a map of its file already
                    tensor.data = engine.home_tensor(name, homes[name])
                self._tier_homed_params.append((value.source, tensor))  # type: ignore[arg-type]
            elif name in written_back:  # read as copies: each call writes it
                self._tier_buffers[value.source] = (name, homes[name])  # type: ignore[index]
                released.append(value.source)  # type: ignore[arg-type]
            else:
                released.append(value.source)  # type: ignore[arg-type]
                if isinstance(engine, ThreadCopyEngine):  # large ones read as maps
                    engine.mappable.add(name)
        self._state_positions = [primal_of[vi] for vi in self.executor.state_values]
        #: training: frozen weights stored quantized, by primal name, each with its
        #: stand-in, which this module holds at once (the meter counts its tensors),
        #: the model once ``release_offloaded`` runs, and a weak reference to the
        #: full copy (freed then, unless held elsewhere)
        self._frozen_stand_ins: dict[str, tuple[torch.Tensor, weakref.ref]] = {}
        #: the model's names for them, once released (a tied weight has two)
        self._frozen_quantized: set[str] = set()
        if self.mode == "train":
            for fqn in released:
                original = tensors[fqn]
                stand_in = self._shared.stand_ins.get(fqn)
                if stand_in is None:
                    stand_in = released_like(original, fqn, model, FROZEN_QUANTIZED)
                    self._shared.stand_ins[fqn] = stand_in
                for position, primal in enumerate(self._primals):
                    if primal is original:  # a tied weight is a primal per name
                        self._primals[position] = stand_in
                        name = self._primal_names[position]
                        self._frozen_stand_ins[name] = (stand_in, weakref.ref(original))
            released = []
        if self.mode == "train":
            self._prepare_deliveries(tensors)
        for vi in self.executor.state_values:
            source = program.values[vi].source
            if is_file_backed(tensors[source]) and self.mode == "train":
                # mapped by an earlier plan of this model: same parameter, data in memory
                tensors[source].data = tensors[source].detach().clone()
            elif is_file_backed(tensors[source]):  # a checkpoint map: bring it into memory
                if source not in self._shared.materialized:  # else another shape's module did
                    self._shared.materialized[source] = materialize(tensors[source])  # type: ignore[index]
                    replace_slot(model, source, self._shared.materialized[source])  # type: ignore[arg-type,index]
                tensors[source] = self._shared.materialized[source]  # type: ignore[index]
            state.append(tensors[source])
            self._state_names.append(source)  # type: ignore[arg-type]
            tensor = tensors[source]
            if self.mode == "train":
                self._hold_as_models(source, tensor)  # type: ignore[arg-type]
            else:
                self.register_buffer(f"state_{len(state) - 1}", tensor, persistent=False)
        if self.mode == "train":  # pm.parameters() lists every parameter, as the model's
            held = {id(t) for t in state}
            for name, tensor in zip(self._primal_names, self._primals):
                if id(tensor) not in held and isinstance(tensor, torch.nn.Parameter):
                    self._hold_as_models(name, tensor)  # file-backed: see above
                    held.add(id(tensor))
            # in the model's order, so that an optimizer over pm.parameters() indexes
            # its state as one over model.parameters() does (checkpoints go either way)
            order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
            held_params = sorted(
                self._parameters.items(), key=lambda kv: order.get(kv[0], len(order))
            )
            self._parameters.clear()
            self._parameters.update(held_params)
        #: weights stored quantized (``Quantized``), after the state in a run's list
        self._stored = self._store_quantized(tensors)  # type: ignore[arg-type]
        state += self._stored
        self._state = state
        #: where each updated buffer sits in the state (-1: homed in a tier, which
        #: the executor writes back), looked up once: a list lookup per buffer per
        #: call cost updated buffers x state tensors
        state_position = {name: i for i, name in enumerate(self._state_names)}
        self._update_positions = [state_position.get(n, -1) for n in self._buffer_updates]
        if self.mode == "train" and -1 in self._update_positions:  # the step copies each in
            raise InvalidPlan(
                f"a training plan homes an updated buffer off the device: "
                f"{listed([n for n in self._buffer_updates if n not in state_position])}"
            )
        self._unreleased: tuple[list[str], Any] = (released, ep)
        if self.mode != "train":
            # only autograd needs the model's tensors as primals: held here, the
            # weights homed in a tier would never be freed (they were, for every
            # inference plan, until this line)
            self._primals, self._primal_names = [], []

    def extra_repr(self) -> str:
        """``print(model)`` of a module holding this one shows what was planned."""
        shapes = f", other shapes={len(self._other_shapes)}" if self._other_shapes else ""
        return (
            f"{self._model_name}, mode={self.mode!r}, budget={self.plan.budget_bytes:,} B, "
            f"predicted peak={self.plan.predicted_peak_bytes:,} B, kernels={self.kernels!r}"
            f"{shapes}"
        )

    def _with_constants(self, outs: list[Any]) -> list[Any]:
        """The forward's outputs as the graph returns them: the executor's tensors
        with the non-tensor outputs back in their places."""
        if not self._output_constants:
            return outs
        full = list(outs)
        for position, value in self._output_constants:  # ascending
            full.insert(position, value)
        return full

    def _hold_as_models(self, name: str, tensor: torch.Tensor) -> None:
        """Training: register one of the model's tensors on this module under the
        model's own name ("layers.0.bias"), so that a module holding this one lists it
        as the model would ("body.layers.0.bias", as its state dict does), and
        grouping parameters by name works there too (as ``state_<i>`` every bias
        fell in the weight-decay group). The name has dots, which
        ``register_parameter`` refuses: torch.nn only walks these dicts."""
        if isinstance(tensor, torch.nn.Parameter):
            self._parameters[name] = tensor
        else:
            self._buffers[name] = tensor
            self._non_persistent_buffers_set.add(name)

    def release_offloaded(self, model: torch.nn.Module) -> None:
        """Release the weights homed off the device (or stored quantized) from
        ``model`` and the exported program: this module reads them from their tier."""
        released, ep = self._unreleased
        for other in self._other_shapes:  # same homes: the same weights, by name
            released = list(dict.fromkeys([*released, *other._unreleased[0]]))
        for other in self._other_shapes:  # their exported programs hold them too
            other._drop_exported(released)
        full_copies = {n: ref for n, (_, ref) in self._frozen_stand_ins.items()}
        if self.mode == "train":
            self._release_frozen(model)
        originals = {source: slot_tensor(model, source) for source in released}
        moved = {s: weakref.ref(t) for s, t in originals.items() if t is not None}
        del originals
        release_slots(model, released)
        for source in released:
            if ep is not None and source in ep.state_dict:
                ep.state_dict[source] = ep.state_dict[source].to("meta")
        if released:
            log.info("released %d offloaded weights from the model", len(released))
        self._unreleased = ([], None)
        del ep  # its state dict holds the model's tensors: the check below would see them
        warn_if_still_held(full_copies)
        free_if_moved_still_held(moved, set(self._tier_buffers))
        self._record_state_types()  # a released weight is no longer read from the model

    def _drop_exported(self, released: list[str]) -> None:
        """Another shape's module released ``released`` from the model: this one's
        exported program lets go of them too (``release_offloaded``)."""
        ep = self._unreleased[1]
        for source in released:
            if ep is not None and source in ep.state_dict:
                ep.state_dict[source] = ep.state_dict[source].to("meta")
        self._unreleased = ([], None)
        self._record_state_types()

    def _release_frozen(self, model: torch.nn.Module) -> None:
        """Training: the frozen weights this module stores quantized leave the model
        too, under every name it holds them by (a tied weight has two), so that
        their full copies are freed; the model holds the stand-in the step passes
        in the weight's place (the executor reads the codes; autograd sees an input
        that wants no gradient), and the state watch expects it there."""
        names_of = names_by_tensor(model)
        for source, (stand_in, full_copy) in self._frozen_stand_ins.items():
            for name in names_of.get(id(full_copy()), []):
                replace_slot(model, name, stand_in)
                self._frozen_quantized.add(name)
            if hasattr(self, "_state_watch"):
                self._state_watch.expect(source, stand_in)
        self._frozen_stand_ins = {}

    def _model_entries(
        self, model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Those of ``named`` (the primals; in inference, the weights kept on the
        device) that are the model's parameters and buffers, by name (not the
        tensors it holds as plain attributes, which the trace took as constants)."""
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names.update(n for n, _ in model.named_buffers(remove_duplicate=False))
        names -= self._frozen_stand_ins.keys()  # expected there once released
        return {n: t for n, t in named if n in names}

    def _record_state_types(self) -> None:
        """What explains a failed run: the model's tensors as this plan reads them."""
        named = dict(zip(self._state_names, self._state))
        named.update(zip(self._primal_names, self._primals))
        self._state_types = StateTypes(list(named.items()))

    def _prepare_deliveries(self, tensors: dict[str, torch.Tensor]) -> None:
        """A file-backed buffer, shaped like its parameter, for each gradient the
        plan delivers early (``Runtime.deliver`` makes it the parameter's .grad);
        none for a delivery to the host tier (CUDA): the copy engine holds the host
        buffer, and ``Runtime.finish_deliveries`` makes the .grad from it."""
        program = self.analysis.program
        param_of = {program.values[v].storage: fqn for v, fqn in program.meta[PARAM_GRADS].items()}
        delivered = {a.tensor: a.tier for a in self.plan.actions if a.kind == "deliver"}
        for tensor in self.problem.tensors:
            if tensor.name not in delivered:
                continue
            param = tensors[param_of[tensor.index]]
            self._delivered_params.append((param_of[tensor.index], param))
            self._delivery_keys[param_of[tensor.index]] = tensor.name
            if delivered[tensor.name] == "host":  # CUDA: through the engine's host buffer
                self._runtime.deliveries[tensor.name] = (param, None)
                continue
            fqn = param_of[tensor.index]
            buffer = self._shared.delivery_buffers.get(fqn)  # another shape's plan made it
            if buffer is None:
                key = f"grad:{fqn}"
                buffer = self._disk.create_mapped(key, param.detach())
                self._shared.weight_keys.add(key)
                self._shared.delivery_buffers[fqn] = buffer
            self._runtime.deliveries[tensor.name] = (param, buffer)

    def _store_quantized(self, tensors: dict[str, torch.Tensor]) -> list[Any]:
        """The weights the executor reads quantized on the device, quantized once
        (``WeightQuantizer``), as this module's buffers: the module, and the
        meter, which reads modules, hold them."""
        stored = self._quantizer.on_device(self.executor.stored_values, tensors)
        for k, q in enumerate(stored):
            for part, tensor in q.parts().items():
                self.register_buffer(f"stored_{k}_{part}", tensor, persistent=False)
        return stored

    def measure_quantization_error(
        self, *args: Any, reference: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Run once (unmetered) recording the round-trip error of every tensor the
        plan quantizes on the way; with ``reference`` (the lossless outputs for
        these inputs, e.g. the eager model's) also the outputs' error. The report
        shows both."""
        with self._runtime.recording_errors(self.quantization_errors), torch.no_grad():
            out = self(*args, **kwargs)
        if reference is not None:
            self.output_error = output_error(out, reference)
        return {"tensors": dict(self.quantization_errors), "output": self.output_error}

    @property
    def code(self) -> str:
        """The generated executor's Python source."""
        return self.executor.source

    @property
    def report(self) -> Report:
        """The placement report: each tensor's decision, the peaks planned and
        measured, the solver's status (``print(pm.report)``; ``.to_json()``)."""
        report = Report.from_plan(self.analysis, self.plan)
        report.add_quantization_errors(self.quantization_errors, self.output_error)
        if self.problem.quantize:
            report.lossy_allowed = {
                "format": self.problem.quantize,
                "uses": list(self.problem.quantize_uses),
            }
        for row in report.quantized:
            row["exact_lookups"] = row["tensor"] in self._quantizer.exact_lookups
        if any("disk" in row.decision for row in report.tensors):
            report.disk_rates = self.problem.meta.get("disk_rates")
        if self.kernels == "inductor":
            report.kernels = kernels_summary(self.executor.segments, self.executor.op_calls)
        disk = getattr(self._engine, "disk", None)
        if disk is not None and len(disk.linked):
            report.read_in_place = disk.linked.summary()
        if self.measured is not None and self._measured_shape == 0:
            report.measured = {
                "peak_bytes": self.measured.peak_bytes,
                "seconds": self.measured.seconds,
                "wall_seconds": self.measured_seconds if self._timed_shape == 0 else None,
                "wall_calls": self.timed_calls if self._timed_shape == 0 else 0,
            }
        if self._other_shapes:
            report.inputs = list(self._call.meta)
            report.other_shapes = [
                m._shape_summary(k) for k, m in enumerate(self._other_shapes, start=1)
            ]
        return report

    def _shape_summary(self, k: int) -> dict[str, Any]:
        """This module's plan in a line of its owner's report (as shape ``k``)."""
        return {
            "shape": k,
            "inputs": list(self._call.meta),
            "planned_peak_bytes": self.plan.compiled_peak_bytes or self.plan.predicted_peak_bytes,
            "estimated_seconds": self.plan.estimated_seconds,
            "solver_status": self.plan.solver.status,
            "measured_peak_bytes": self.measured.peak_bytes if self.measured else None,
        }

    def _serving(self, args: tuple, kwargs: dict) -> tuple[int, PlannedModule]:
        """The plan a call with these arguments runs: 0 and this module, or k and
        ``other_shapes[k - 1]`` (an error if none matches)."""
        if not self._other_shapes:
            return 0, self
        k, module, _ = self._matching(args, kwargs)
        return k, module

    def _delivery_keys_of(self, positions: frozenset[int]) -> frozenset[str]:
        """The delivery keys of the parameters at gradient ``positions``."""
        names = [self._primal_names[p] for p in positions if p < len(self._primal_names)]
        return frozenset(self._delivery_keys[n] for n in names if n in self._delivery_keys)

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise PlannerError(
                "this planned module was closed (its offload files are removed): "
                "call planner.plan again for a new one"
            )

    def _run(self, fn: Any, *args: Any) -> Any:
        """Call the generated executor (on CUDA with blocks split to their
        requests: ``exact_blocks``); if the run stops half-way (an error, a
        KeyboardInterrupt), wait out the copies it issued and remove the files it
        spilled before re-raising, so the next call starts from a clean store."""
        with self._shared.running:  # the clean-up too: another thread's run spills next
            try:
                if torch._C._len_torch_function_stack() and _default_device_set():
                    with torch.device("cpu"):  # the runtime's host buffers
                        result = self._call_executor(fn, *args)
                else:
                    result = self._call_executor(fn, *args)
                self._engine.settle()  # CUDA: uploads from homes the caller may write
                return result
            except BaseException as error:
                try:
                    self._engine.drain()
                finally:
                    self._runtime.arriving.clear()  # half a backward delivers nothing
                    spills = [k for k in self._disk.entries if k not in self._shared.weight_keys]
                    for key in spills:
                        self._disk.discard(key)
                why = self._state_types.changed() if isinstance(error, Exception) else None
                if why is not None:
                    raise PlannerError(why) from error
                raise

    def _call_executor(self, fn: Any, *args: Any) -> Any:
        if self.device.type != "cuda" and not any_autocast_enabled():
            return fn(self._runtime, *args)  # nothing to switch off or split
        with autocast_off(), exact_blocks(self.device):
            return fn(self._runtime, *args)

    @property
    def other_shapes(self) -> torch.nn.ModuleList:
        """The modules of ``extra_example_inputs``' shapes, in order: children of
        this one (so the meter counts what they hold); empty for one shape (code
        looping over them met an AttributeError), without a child to print."""
        held = self._modules.get("other_shapes")
        return held if isinstance(held, torch.nn.ModuleList) else torch.nn.ModuleList()

    def add_other_shapes(self, modules: list[PlannedModule]) -> None:
        """Serve the input shapes of ``modules`` too (``planner.shapes``: the same
        model, planned per shape over this module's store): a call runs the
        executor whose arguments it matches. They are this module's children, so
        the meter counts what they hold (the weights they share, once)."""
        self._other_shapes = list(modules)
        self._modules["other_shapes"] = torch.nn.ModuleList(modules)  # the property reads it

    def _matching(self, args: tuple, kwargs: dict) -> tuple[int, PlannedModule, list[torch.Tensor]]:
        """The shape (0: this module's, k: ``other_shapes[k - 1]``'s) whose planned
        arguments the call matches, its module and the call's tensors; none: the
        error says what each expects."""
        modules = (self, *self._other_shapes)
        for k, module in enumerate(modules):
            if not module._call.ruled_out(args, kwargs):
                try:
                    return k, module, module._call.flatten(args, kwargs)
                except PlannerError:
                    pass
        errors = []
        for module in modules:  # none matches: each one's reason
            try:
                module._call.flatten(args, kwargs)
            except PlannerError as error:
                errors.append(str(error))
        raise PlannerError(
            f"this module was planned for {len(errors)} input shapes and the call matches "
            f"none of them: "
            + "; ".join(f"shape {k} (example input set {k}): {e}" for k, e in enumerate(errors))
            + (
                ". To serve this shape too, plan again with it in extra_example_inputs"
                if all("planned for inputs" in e for e in errors)  # shapes or dtypes differ
                else ""  # a layout or an argument: each error says what to do
            )
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # A training plan holds the model's parameters under the model's names
            # ("0.weight"), an inference plan none, and neither the submodules:
            # torch.export and functional_call walk those names and failed with a
            # bare "has no attribute `0`"
            held = self.__dict__.get("_parameters", {})
            model = getattr(self.__dict__.get("_state_watch"), "model", None)
            if any(key.startswith(name + ".") for key in held) or (
                isinstance(model, torch.nn.Module) and name in model._modules
            ):
                raise AttributeError(
                    f"PlannedModule has no attribute {name!r}: a planned module runs the "
                    f"plan and holds none of the model's submodules ({name!r} is one). "
                    f"Reach {name!r} through the model; export or functional_call the "
                    f"model, not the planned module"
                ) from None
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        if _being_traced(args, kwargs):
            raise PlannerError(
                "a planned module cannot be traced or exported (torch.jit.trace, "
                "torch.export): it runs a schedule of kernels and copies of its own on "
                "tensors it holds, which a trace would record as one call's constants "
                "(a jit trace of one failed at its first run). Trace or export the model "
                "itself; torch.compile(pm) runs the plan as it is"
            )
        self._swap_watch.check()
        if self._other_shapes:  # several input shapes
            _, module, inputs = self._matching(args, kwargs)
        else:
            module = self
            inputs = self._call.flatten(args, kwargs)
        if self.mode != "train":
            return module._infer(inputs)
        return module._train_step(args, kwargs, inputs)

    def _train_step(self, args: tuple, kwargs: dict, inputs: list[torch.Tensor]) -> Any:
        """A training forward on the call's tensors (matched to the plan already):
        the planned step as one autograd node, the buffers' updates copied in."""
        if self._traced_training is not None:
            check_call_mode(self._traced_training, self.training)
            self._mode_watch.check()
        check_autocast(self._autocast)
        check_not_functorch_transform()
        check_not_forward_ad(inputs)
        self._hook_watch.check()
        self._state_watch.check()
        self._tier_params.check()
        warn_if_saved_tensors_hooks()
        if torch.is_grad_enabled():
            self._backward_reads.check_not_inference([*self._primals, *inputs])
        with self._shared.running:  # and the statistics it updates
            primals = self._primals
            if self._no_gradient_primals:  # a copy per step, then only those detached
                primals = list(primals)
                for i in self._no_gradient_primals:
                    primals[i] = primals[i].detach()
            outs = list(_PlannedStep.apply(self, *primals, *inputs))
            with torch.no_grad():
                for i, new in zip(self._update_positions, outs[: self._num_buffer_updates]):
                    self._state[i].copy_(new)
        user = outs[self._num_buffer_updates :]
        handed = self._wiring.forward_outputs
        if handed.rebuilders or handed.num_user < len(user):
            user = handed.hand_over([*self._primals, *pytree.tree_leaves((args, kwargs))], user)
        return pytree.tree_unflatten(user, self._out_spec)

    def _infer(self, inputs: list[torch.Tensor]) -> Any:
        """An inference call on the call's tensors (matched to the plan already)."""
        if torch._C._functorch.maybe_current_level() is not None:
            # inside a torch.func transform: inputs it wraps are refused; plain ones
            # compute as outside it (its ops would wrap the executor's own tensors)
            check_not_functorch_transform(training=False, tensors=inputs)
            from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

            with temporarily_clear_interpreter_stack():
                return self._infer_plain(inputs)
        return self._infer_plain(inputs)

    def _infer_plain(self, inputs: list[torch.Tensor]) -> Any:
        check_autocast(self._autocast)
        self._hook_watch.check()
        self._state_watch.check()
        with torch.no_grad(), self._shared.running:  # and the state it updates
            outs = self._with_constants(self._run(self._fn, self._state, inputs))
            for i, new in zip(self._update_positions, outs[: self._num_buffer_updates]):
                if new is not None:  # None: written back to its tier by the executor
                    self._state[i].copy_(new)
        user = outs[self._num_buffer_updates :]
        return pytree.tree_unflatten(user, self._out_spec)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Training: the model's own state dict, under the model's names (a training
        plan trains the model's parameter and buffer objects), so a checkpoint saved
        from here loads into the model, and into this module (``_load_from_state_dict``).
        Inference: no entries, and a warning saying so: the plan holds its weights
        where it placed them (some quantized, some in files), none under the model's
        names (save the model's state dict before planning).

        Training with frozen weights stored quantized: those are left out (this
        module holds only their codes; they do not train, so the checkpoint they
        came from still holds them), with a warning naming them."""
        if self.mode == "train":
            state = self._state_watch.model.state_dict(*args, **kwargs)
            left_out = [k for k, v in state.items() if isinstance(v, ReleasedWeight)]
            for key in left_out:
                del state[key]
            if left_out:
                warnings.warn(
                    f"state_dict leaves out {len(left_out)} frozen weight(s) this plan "
                    f"stores quantized ({listed(left_out)}): it holds only their codes. "
                    f"They do not train: the checkpoint the model was built from still "
                    f"holds them",
                    PlannerWarning,
                    stacklevel=2,
                )
            return state
        warnings.warn(
            "an inference plan's state_dict holds none of the model's weights (the plan "
            "placed them: on the device, in its offload store, or quantized): save the "
            "model's state_dict before planning",
            PlannerWarning,
            stacklevel=2,
        )
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Training: load the entries under ``prefix`` into the model, in place (the
        plan keeps reading the same objects). ``nn.Module.load_state_dict`` calls this
        for this module, alone or inside a larger one."""
        if self.mode == "train" and not self._owns_store:
            return None  # another shape's module: the owner loads the model's tensors
        if self.mode != "train":
            named = sorted(k[len(prefix) :] for k in state_dict if k.startswith(prefix))
            if named:
                # before: torch's bare "Unexpected key(s) in state_dict", or with
                # strict=False nothing loaded and the old weights used, silently
                raise PlannerError(
                    f"load_state_dict: an inference plan holds the weights it was planned "
                    f"with where it placed them (on the device, in its offload store, or "
                    f"quantized), not under the model's names, so it cannot load "
                    f"{listed(named)}. Load them into the model before planning "
                    f"(model.load_state_dict(...)), then call planner.plan again"
                )
            return super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        if local_metadata.get("assign_to_params_buffers", False):
            raise PlannerError(
                "load_state_dict(..., assign=True) would replace the parameters this module "
                "was planned over: load with assign=False (values are copied in place), or "
                "plan the model again after assigning"
            )
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        frozen = sorted(self._frozen_quantized & ours.keys())
        if frozen:
            raise PlannerError(
                f"load_state_dict: {listed(frozen)} {'is' if len(frozen) == 1 else 'are'} "
                f"frozen and stored quantized by this plan, which holds only the codes of "
                f"the values it was planned with: leave {'it' if len(frozen) == 1 else 'them'} "
                f"out of the state dict (pm.state_dict() does), or plan the model again "
                f"with the new values"
            )
        # Frozen weights the plan reads from their checkpoint in place view the file's
        # shared map: copying into one wrote the user's checkpoint (and the next step
        # then failed with LinkedFileChanged, even for the same values, as a resume
        # from pm.state_dict() loads). Equal values are skipped; others refused.
        linked = {
            k: t
            for k, t in self._state_watch.model.state_dict(keep_vars=True).items()
            if k in ours
            and isinstance(t, torch.Tensor)
            and is_checkpoint_view(t)
            and isinstance(ours[k], torch.Tensor)
            and ours[k].shape == t.shape
        }
        changed = sorted(
            k
            for k, t in linked.items()
            if not _views_the_same(t, ours[k])
            # a meta tensor has no values to compare: other values, as loading it would be
            and (ours[k].is_meta or not _same_values(t, ours[k].to(t.device, t.dtype)))
        )
        if changed:
            raise PlannerError(
                f"load_state_dict: {listed(changed)} {'is' if len(changed) == 1 else 'are'} "
                f"frozen and read by this plan from its checkpoint file in place, so loading "
                f"other values would write into that file: nothing was loaded. Leave "
                f"{'it' if len(changed) == 1 else 'them'} out of the state dict and load "
                f"with strict=False, or save the new values to a checkpoint of their own "
                f"and plan from that"
            )
        ours = {k: v for k, v in ours.items() if k not in linked}
        result = self._state_watch.model.load_state_dict(ours, strict=False)
        # not missing: this module holds them (quantized) and state_dict leaves them
        # out, or they equal what their checkpoint holds (skipped above)
        missing = [
            k for k in result.missing_keys if k not in self._frozen_quantized and k not in linked
        ]
        missing_keys.extend(prefix + k for k in missing)
        unexpected_keys.extend(prefix + k for k in result.unexpected_keys)

    def _apply(self, fn: Any, recurse: bool = True) -> PlannedModule:
        """``pm.to(...)``, ``.half()``, ``.cuda()``: the plan placed these tensors and
        sized every buffer by their dtypes, so what would move or convert one is an
        error (before: training met mixed dtypes in the first matmul, inference
        silently kept computing as planned). What changes nothing (``pm.float()`` on
        a float32 plan, ``pm.to(its device)``, as training loops do) passes, and
        changes nothing: a parameter the plan keeps on the host between uses (CUDA)
        stays there. Judged on an empty tensor of each dtype on the plan's device,
        so nothing is copied to find out."""
        dtypes = {t.dtype for t in [*self.parameters(), *self.buffers()]}
        for dtype in dtypes:
            probe = torch.empty(0, dtype=dtype, device=self.device)
            converted = fn(probe)
            if converted.dtype != dtype or converted.device != probe.device:
                raise PlannerError(
                    "a planned module's tensors are placed and typed by its plan: "
                    "pm.to(), .half(), .cuda() and the like cannot move or convert them. "
                    "Convert the model first, then plan it"
                )
        return self

    def apply(self, fn: Any) -> PlannedModule:
        """``fn`` reaches this module only, not the model's submodules, which a
        planned module does not hold: ``pm.apply(freeze_batch_norm)`` changed
        nothing, silently, and the statistics went on updating."""
        warnings.warn(
            f"pm.apply({getattr(fn, '__name__', 'fn')}) reaches the planned module only, "
            f"not the modules of {self._model_name}: apply it to the model before "
            f"planning (model.apply(fn), then planner.plan)",
            PlannerWarning,
            stacklevel=2,
        )

        def visit(module: torch.nn.Module) -> None:  # as nn.Module.apply, children first
            for child in module.children():  # (other shapes' modules: warned once)
                visit(child)
            fn(module)

        visit(self)
        return self

    def __prepare_scriptable__(self) -> Any:
        # torch.jit.script calls this first: without it, it failed on forward's
        # *args with a bare TorchScript NotSupportedError
        raise PlannerError(
            "a planned module cannot be scripted (torch.jit.script): it runs a schedule "
            "of kernels and copies of its own in Python. Script the model itself; "
            "torch.compile(pm) runs the plan as it is"
        )

    def __getstate__(self) -> Any:
        raise PlannerError(
            "a planned module cannot be copied or pickled: it owns its offload files, a "
            "copy thread and code made for this process. Save the model's state dict "
            "(pm.state_dict() in training), or plan a copy of the model "
            "(planner.plan(copy.deepcopy(model), ...))"
        )

    @property
    def buffer_updates(self) -> list[str]:
        """Names of the buffers each call updates in place (BatchNorm statistics)."""
        return list(self._buffer_updates)

    def state_tensor(self, name: str) -> torch.Tensor:
        """The tensor the executor holds for the model's state entry ``name``; for
        a buffer each call updates that the plan keeps in a tier (a key/value
        cache), a copy read from there."""
        if name in self._tier_buffers:
            with self._shared.running:  # not torn by another thread's call
                self._check_open()
                key, tier = self._tier_buffers[name]
                return self._engine.read_now(key, tier)
        if name not in self._state_names:
            known = sorted({*self._state_names, *self._tier_buffers})
            raise PlannerError(
                f"{name!r} is not state this module holds; it holds {listed(known)} "
                f"(names as in the model's state_dict)"
            )
        return self._state[self._state_names.index(name)]

    def restore_state_tensor(self, name: str, value: torch.Tensor) -> None:
        """Put ``value`` back as the model's state entry ``name`` (``state_tensor``
        reads it): into the executor's tensor, or over its copy in the tier where
        the plan keeps it (a key/value cache)."""
        with self._shared.running:  # not under another thread's call
            if name in self._tier_buffers:
                # copied into what the tier holds, as into a tensor in memory: a
                # value of another shape, dtype or layout was written as given, and
                # the next calls failed (another shape) or differed from eager's
                # by 9e-8 (a transposed value, read back with its strides)
                current = self.state_tensor(name)
                with torch.no_grad():
                    _copy_checked(name, current, value)
                key, tier = self._tier_buffers[name]
                self._engine.write_now(key, tier, current)
                return
            with torch.no_grad():
                _copy_checked(name, self.state_tensor(name), value)

    def _no_grad_if_inference(self) -> contextlib.AbstractContextManager:
        """An inference plan runs under no_grad anyway; so measured or timed, an
        example input that requires grad is run, not refused (``PlannedCall``)."""
        return torch.no_grad() if self.mode == "infer" else contextlib.nullcontext()

    def run_measured(self, *args: Any, **kwargs: Any) -> Any:
        """Call once under the independent memory meter; ``report`` then shows it.
        (Inference: under ``no_grad``, as the plan runs anyway, so an example input
        that requires grad is measured, not refused.)"""

        def call() -> Any:
            with self._no_grad_if_inference():
                return self(*args, **kwargs)

        self._measured_shape, serving = self._serving(args, kwargs)
        out, self.measured = measure(call, self, (args, kwargs), device=self.device)
        serving.measured = self.measured
        return out

    def time_call(self, *args: Any, repeats: int = 5, **kwargs: Any) -> float:
        """Median wall seconds of ``repeats`` calls (after one warm-up), unmetered."""
        import statistics
        import time

        self._timed_shape, serving = self._serving(args, kwargs)
        times = []
        with self._no_grad_if_inference():
            self(*args, **kwargs)
            if self.device.type == "cuda":  # the warm-up's kernels end before the first sample
                torch.cuda.synchronize(self.device)
            for _ in range(repeats):
                start = time.perf_counter()
                self(*args, **kwargs)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - start)
        self.measured_seconds = serving.measured_seconds = statistics.median(times)
        self.timed_calls = serving.timed_calls = repeats
        return self.measured_seconds

    def run_measured_step(self, *args: Any, **kwargs: Any) -> Any:
        """Training: one forward + backward under the independent meter; ``report``
        then shows it. The backward is driven by all-ones gradients of the outputs
        that require grad (what a loss summing them gives), each an expanded view
        of a one-element tensor made before the meter starts: a summed loss and its
        gradient are the caller's bytes, not the plan's, and counted they put a
        step planned to its budget's last byte 8 bytes over it. The step leaves no
        trace: ``.grad``, the buffers it updates (BatchNorm statistics) and the
        random generators are put back (its all-ones gradients were added to
        ``.grad``, for a training loop's next ``optimizer.step()`` to take)."""
        from planner.verify import untouched

        ones = {
            (dtype, self.device): torch.ones((), dtype=dtype, device=self.device)
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        }

        @torch.enable_grad()  # a step, also when called under no_grad (it measured
        def step() -> Any:  # the forward alone, and reported that as the step's peak)
            out = self(*args, **kwargs)
            leaves = [
                t
                for t in pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            grads = [
                one.expand_as(t)
                if (one := ones.get((t.dtype, t.device))) is not None
                else torch.ones_like(t)
                for t in leaves
            ]
            torch.autograd.backward(leaves, grads)
            return out

        self._measured_shape, serving = self._serving(args, kwargs)
        with untouched(self):
            out, self.measured = measure(step, self, (args, kwargs), device=self.device)
        serving.measured = self.measured
        return out

    def close(self) -> None:
        """Remove the offload files now (also done when the module is collected);
        after another thread's call in progress ends."""
        with self._shared.running:
            self._finalizer()

    def __enter__(self) -> PlannedModule:
        """``with planner.plan(...) as pm:`` closes the module (its offload files)
        when the block ends, however it ends."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass
class _Shared:
    """What the modules of one model's input shapes share besides the store, copy
    engine and finalizer (``PlannedModule(share_store_of=...)``): made by the first,
    held by the others, so each thing is written, quantized or made once."""

    #: keys of the files written at plan time, by every shape's module (the rest
    #: are spills, which a failed run removes)
    weight_keys: set[str] = dataclasses.field(default_factory=set)
    #: weights stored quantized, by name: on the device (``Quantized``), or in a
    #: tier (None), with their round-trip errors
    quantized_weights: Made = dataclasses.field(default_factory=dict)
    #: training: the file-backed buffer each early-delivered gradient lands in, by
    #: parameter (one per parameter whichever shape's backward runs)
    delivery_buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: training: the stand-in of each frozen weight stored quantized, by name: one
    #: object whichever shape's module made it (pm.parameters())
    stand_ins: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: inference: weights a checkpoint's map held, brought into memory, by name
    #: (each shape's exported program still holds the map)
    materialized: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: held by each run (and, in inference, while the state it updates is copied
    #: in): calls from several threads run one at a time. A run's spills and
    #: prefetches use one store slot per tensor, and two threads' runs of one plan
    #: overwrote each other's (20 of 40 outputs wrong, silently); run together,
    #: they would also hold twice the budget
    running: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    #: training forwards that moved activations to the store, over every shape: their
    #: spills share its slots, so a backward must come before any other spilling
    #: forward (``_PlannedStep``)
    spilled_forwards: int = 0


def _copy_checked(name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    try:
        target.copy_(value)
    except RuntimeError as exc:
        raise PlannerError(
            f"cannot restore {name!r}, shape {tuple(target.shape)}, from a tensor of shape "
            f"{tuple(value.shape)}: {exc}"
        ) from exc


class _PlannedStep(torch.autograd.Function):
    """The planned forward as one autograd node whose backward is the planned
    backward. Tensors the backward needs cross in ``ctx.carry`` (kept, or as
    pending copies and quantized copies, exactly as the plan placed them)."""

    @staticmethod
    def forward(ctx: Any, pm: PlannedModule, *flat: torch.Tensor) -> tuple:  # type: ignore[override]
        n_primals = len(pm._primals)
        check_not_unfrozen(
            pm._primal_names, pm._primals_require_grad, ctx.needs_input_grad[1 : 1 + n_primals]
        )
        # tier-home ones are read there; frozen weights stored quantized come as codes
        state = [flat[j] for j in pm._state_positions] + pm._stored
        # under the module's turn (``_train_step`` holds it): another thread's step
        # spills into the same slots
        if pm._forward_spills:
            pm._shared.spilled_forwards += 1
        ctx.forward_number = pm._shared.spilled_forwards
        outs, carry = pm._run(pm._fn, state, list(flat[n_primals:]))
        # a tier-home parameter's is the host's; None: no gradient moves
        ctx.devices = [t.device for t in flat] if pm._gradients_move else None
        ctx.pm = pm
        ctx.carry = carry
        ctx.versions = pm._backward_reads.record(flat, outs)
        outs = pm._with_constants(outs)
        # Only outputs with a tangent get a gradient: not buffer updates (BatchNorm
        # statistics), integer outputs, outputs that need none, or aliases (made again
        # from their bases outside this node: ``output_aliases``). And autograd must
        # not allocate zero gradients for outputs the loss did not use: the plan has
        # no room for them.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(
            *[
                o
                for i, o in enumerate(outs)
                if i not in pm._wiring.with_tangent and isinstance(o, torch.Tensor)
            ]
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple:  # type: ignore[override]
        pm: PlannedModule = ctx.pm
        check_not_create_graph()
        check_backward_autocast(pm._autocast, pm.device.type)
        check_not_batched(grad_outputs)
        check_deliveries_wanted(pm._delivery_accumulators)
        if ctx.carry is None:
            raise PlannerError(
                "backward through a planned step twice is not supported "
                "(its saved tensors were freed by the first backward): call the planned "
                "module again for each backward (sum the losses into one backward to "
                "combine them)"
            )
        no_grad_for = pm._wiring.unreached(grad_outputs)
        tangents = pm._wiring.tangents(grad_outputs, pm.device)
        with pm._shared.running:  # from the spill check to the last delivery
            if pm._forward_spills and ctx.forward_number != pm._shared.spilled_forwards:
                raise PlannerError(
                    "this backward needs activations the planned module moved to its offload "
                    "store, and a later forward of the same module (or of another input "
                    "shape it serves) has overwritten them: call backward() after each "
                    "forward before the next one (several inputs: one batch), or plan with "
                    "a budget that spills nothing"
                )
            BackwardReads.check(ctx.versions)
            carry, ctx.carry = ctx.carry, None
            ctx.versions = None
            pm._check_open()
            pm._runtime.undelivered = pm._delivery_keys_of(no_grad_for)
            try:
                grads = pm._run(pm._bw, carry, tangents)
            finally:
                pm._runtime.undelivered = frozenset()
            pm._runtime.finish_deliveries()  # CUDA: gradients copied to the host land in .grad
        return (None, *pm._wiring.gradients(grads, no_grad_for, ctx.devices))


def _default_device_set() -> bool:
    """Whether the caller set a default device other than the CPU
    (``torch.set_default_device``, ``with torch.device(...)``). The runtime makes
    its host buffers (a read from the offload store, a copy to it) without naming
    a device: under ``torch.device("meta")`` a planned call that read a weight
    from disk failed with torch's "can't convert meta device type tensor to
    numpy"; under ``torch.set_default_device("cuda")`` they would land on the GPU,
    outside the budget. A planned call runs them on the CPU."""
    return torch.get_default_device().type != "cpu"


def _being_traced(args: tuple, kwargs: dict) -> bool:
    """Whether this call is being traced by torch.jit.trace or torch.export.

    ``torch.compiler.is_exporting()`` is one flag for the whole process: while a
    thread plans a model (torch.export), a call of a planned module in another
    thread saw it set and was refused. An export traces on its own thread under
    fake and proxy dispatch modes (thread-local) with fake inputs, so those decide.
    """
    if torch.jit.is_tracing():
        return True
    if not torch.compiler.is_exporting():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    keys = torch._C._TorchDispatchModeKey
    if any(torch._C._get_dispatch_mode(k) is not None for k in (keys.FAKE, keys.PROXY)):
        return True
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return any(isinstance(t, FakeTensor) or torch._is_functional_tensor(t) for t in tensors)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Elementwise equal, a NaN equal to a NaN where both hold one (``torch.equal``
    says a weight holding a NaN differs from its own copy: a resume from a saved
    ``pm.state_dict()`` was refused)."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _views_the_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` views ``a``'s very elements (``pm.state_dict()`` handed back as it came):
    equal without reading them, which for weights read from a checkpoint in place
    would read the file."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )
