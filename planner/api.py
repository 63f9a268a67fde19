"""The public entry points."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.budget import is_smallest, parse_budget
from planner.caller_grad_mode import planning_training_in_grad_mode
from planner.caller_rng import caller_rng_kept
from planner.codegen.assemble import Assembled
from planner.codegen.emit import check_kernels
from planner.errors import (
    BudgetTooSmall,
    CaptureError,
    InvalidPlan,
    PlannerError,
    PlannerTypeError,
    PlannerValueError,
    listed,
)
from planner.full_collections import full_collections_deferred
from planner.ir.autocast import autocast_off
from planner.ir.capture import capture, normalize_example_inputs
from planner.ir.conv_layout import channels_last_convolutions
from planner.ir.fused_loss import fuse_cross_entropy_backward
from planner.ir.hooks import module_hooks
from planner.measured_room import plan_by_measured_room
from planner.passes.device_profile import DeviceProfile, builtin_for_device, get_profile
from planner.passes.pipeline import Analysis
from planner.passes.pipeline import analyze as analyze_captured
from planner.planned_module import PlannedModule
from planner.report import Report, format_bytes
from planner.runtime.checkpoint import checkpoint_attached
from planner.runtime.meter import Measurement, measure, measure_training_step
from planner.runtime.store import check_offload_dir
from planner.saved_plan import check_saved_plan_given, what_differs
from planner.shapes import check_same_homes, solve_shapes
from planner.solver import DEFAULT_TIME_LIMIT, Plan, Problem, from_program, solve, validate
from planner.solver.solve import keep_all_peak, record_replay
from planner.traced_mode import warn_if_inference_traced_in_training
from planner.verify import checked_peak

log = logging.getLogger(__name__)

#: a saved plan: the Plan, or the path ``Plan.save`` wrote
SavedPlan = str | Path | Plan


def _retry_finds_the_weights_free(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` raising a PlannerError whose traceback's frames hold no locals. The
    documented retry is ``planner.plan(model, e.min_budget, ...)`` inside the
    ``except`` block, while the exception is alive; its frames held the failed
    attempt's analysis, whose exported program references the model's weights, so
    the retry's plan warned that every weight it moved off the device was "still
    held outside the model" and their memory stayed in use (the same after any
    planner error: a saved plan refused). The traceback itself is kept."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handled = sys.exc_info()[1]  # the caller's own, when called in an except block
        try:
            return fn(*args, **kwargs)
        except PlannerError as e:
            seen: set[int] = set()
            error: BaseException | None = e
            # and what it came from, up to the caller's own exception, whose frames
            # (the caller's locals) are not ours to clear
            while error is not None and error is not handled and id(error) not in seen:
                seen.add(id(error))
                traceback.clear_frames(error.__traceback__)
                error = error.__cause__ or error.__context__
            raise

    return wrapper


@caller_rng_kept
@planning_training_in_grad_mode
@full_collections_deferred
def analyze(
    model: torch.nn.Module,
    example_inputs: Any,
    mode: str = "infer",
    profile: str | DeviceProfile | None = None,
    kernels: str = "eager",
) -> Analysis:
    """Capture ``model`` and run every analysis pass: the unplanned picture.

    ``profile``: a built-in name ("h100", "h200", "a100", "rtx4090", "t4", "cpu"), a path
    to a calibrated JSON profile, a DeviceProfile, or None for this machine's.
    ``kernels``: the graph as plans with those kernels run it; with "inductor",
    convolutions take channels-last inputs (``planner.ir.conv_layout``) and
    cross-entropy's backward is one op (``planner.ir.fused_loss``), as in
    ``torch.compile``.
    """
    check_kernels(kernels)
    captured = capture(model, example_inputs, mode, kernels)
    if kernels == "inductor":
        captured = dataclasses.replace(
            captured, graph_module=channels_last_convolutions(captured.graph_module)
        )
        fuse_cross_entropy_backward(captured.graph_module)
    with autocast_off(), _on_the_inputs_gpu(example_inputs):  # op timings of the traced dtypes
        return analyze_captured(captured, get_profile(profile))


def _on_the_inputs_gpu(example_inputs: Any) -> contextlib.AbstractContextManager[Any]:
    """The example inputs' GPU as the current one while the passes run: they make
    up inputs and time ops on "cuda", the current device, which for a model on
    cuda:1 with cuda:0 current measured (and allocated on) the other card."""
    tensors = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor)]
    if tensors and tensors[0].device.type == "cuda":
        return torch.cuda.device(tensors[0].device)
    return contextlib.nullcontext()


@caller_rng_kept
@planning_training_in_grad_mode
def report(
    model: torch.nn.Module,
    example_inputs: Any,
    mode: str = "infer",
    profile: str | DeviceProfile | None = None,
    measure_peak: bool = False,
) -> Report:
    """The placement report of ``model``; with ``measure_peak`` it also runs the
    unplanned program once under the independent meter and records the result."""
    analysis = analyze(model, example_inputs, mode, profile)
    result = Report.from_analysis(analysis)
    if measure_peak:
        m = measure_unplanned(analysis, model, example_inputs)
        result.measured = {"peak_bytes": m.peak_bytes, "seconds": m.seconds}
    return result


@_retry_finds_the_weights_free
@caller_rng_kept
@planning_training_in_grad_mode
def make_plan(
    model: torch.nn.Module,
    budget: int | str,
    example_inputs: Any,
    mode: str = "infer",
    profile: str | DeviceProfile | None = None,
    quantize: str | dict[str, str] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    reuse: str | Path | Plan | None = None,
    kernels: str = "eager",
) -> tuple[Analysis, Plan]:
    """Capture, analyze and solve: the Plan for ``model`` under ``budget``.

    ``budget``: bytes, a size ("512MiB", "2GB"), a share of the unplanned peak
    ("60%"), or "min" (the smallest a plan is found for). Raises BudgetTooSmall
    (with ``min_budget``) when no plan fits.
    ``time_limit``: seconds of optimization search; the best plan found by then is
    returned with its bound (see ``plan.solver``). ``reuse``: a saved Plan (or its
    path) to use instead of solving; refused unless it was made for this graph and
    this budget, and replayed by the validator first. ``kernels``: how the ops
    will run (as in ``plan``); "inductor" prices them as compiled runs run them,
    and solves for ``budget`` op by op (planning by measured room compiles the
    runs, which ``plan`` does).
    """
    check_kernels(kernels)
    _check_time_limit(time_limit)
    _check_smallest_not_reused(budget, reuse, "reuse=")
    check_saved_plan_given(reuse, "reuse=")
    analysis, _, solved = _analyze_and_solve(
        model, budget, example_inputs, mode, profile, quantize, time_limit, reuse, kernels
    )
    return analysis, solved


@full_collections_deferred
def _analyze_and_solve(
    model: torch.nn.Module,
    budget: int | str,
    example_inputs: Any,
    mode: str,
    profile: str | DeviceProfile | None,
    quantize: str | dict[str, str] | None,
    time_limit: float,
    reuse: str | Path | Plan | None,
    kernels: str = "eager",
) -> tuple[Analysis, Problem, Plan]:
    """make_plan's work, also returning the Problem (the executor needs it)."""
    analysis = analyze(model, example_inputs, mode, profile, kernels)
    # The problem does not depend on the budget: translate once, set the budget.
    problem = from_program(
        analysis.program, analysis.unplanned_peak_bytes, analysis.profile, quantize, kernels=kernels
    )
    if is_smallest(budget):  # with a saved plan: refused (_check_smallest_not_reused)
        (problem,), (solved,) = _at_smallest(
            [problem], lambda ps: (ps, [solve(ps[0], time_limit=time_limit)])
        )
        return analysis, problem, solved
    reference = _budget_reference(budget, problem, analysis)
    problem = dataclasses.replace(problem, budget_bytes=parse_budget(budget, reference))
    if reuse is not None:
        return analysis, problem, _reuse_plan(problem, reuse, kernels)
    return analysis, problem, solve(problem, time_limit=time_limit)


def _check_smallest_not_reused(budget: int | str, saved: Any, option: str) -> None:
    """budget="min" solves; a saved plan is not solved again (``make_plan``'s
    ``reuse=`` was ignored: a new plan, at another budget, came back)."""
    if saved is not None and is_smallest(budget):  # a saved plan has its budget
        raise PlannerValueError(
            f"budget='min' plans at the smallest budget a plan is found for; with {option} "
            f"give the saved plan's budget instead (Plan.budget_bytes, or the budget it was "
            f"made with)"
        )


def _at_smallest(
    problems: list[Problem],
    solved: Callable[[list[Problem]], tuple[list[Problem], list[Plan]]],
) -> tuple[list[Problem], list[Plan]]:
    """budget="min": ``solved(problems)`` at the smallest budget a plan is found
    for (with several input shapes, the largest of theirs). Solved at one byte,
    whose BudgetTooSmall names that budget (always plannable: ``solve``), then
    solved there; the captures are not made again."""
    try:  # a model that holds nothing plans at one byte
        return solved([dataclasses.replace(p, budget_bytes=1) for p in problems])
    except BudgetTooSmall as exc:
        if exc.min_budget is None:
            raise
        smallest = exc.min_budget
    return solved([dataclasses.replace(p, budget_bytes=smallest) for p in problems])


def _reuse_plan(problem: Problem, reuse: str | Path | Plan, kernels: str) -> Plan:
    try:
        saved = reuse if isinstance(reuse, Plan) else Plan.load(reuse)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlannerError(f"cannot load plan {str(reuse)!r}: {exc}") from exc
    if saved.op_level_budget_bytes is not None and kernels != "inductor":
        raise PlannerError(
            f"the saved plan was made for kernels='inductor': op by op it holds up to "
            f"{saved.op_level_budget_bytes:,} bytes, and only its compiled runs keep it "
            f"within the budget; pass kernels='inductor', or plan again"
        )
    if saved.fingerprint != problem.fingerprint():  # say which, and what to pass
        differs, todo = what_differs(saved, problem)
        raise PlannerError(f"the saved plan was made for a different graph: {differs}; {todo}")
    if saved.budget_bytes != problem.budget_bytes:
        raise PlannerError(
            f"the saved plan was made for a budget of {saved.budget_bytes:,} bytes, not "
            f"{problem.budget_bytes:,}: pass that budget, or plan again"
        )
    try:  # a plan planned by measured room replays op by op for its higher budget
        replay = validate(
            dataclasses.replace(problem, budget_bytes=saved.replay_budget_bytes), saved
        )
    except InvalidPlan as exc:
        raise PlannerError(
            f"the saved plan does not replay on this graph: {exc}; plan again without plan= "
            f"(then save the new plan)"
        ) from exc
    # its peak and timelines (what the executor is assembled by, the report says) are
    # this replay's, not the file's: a file's, edited or stale, refused an eager plan
    # as "compiled runs" over the budget, or reported a peak the plan does not hold.
    # A copy: the caller's Plan is not changed by the module (compiled_peak_bytes)
    reused = dataclasses.replace(saved)
    record_replay(reused, replay)
    return reused


def _reused_for_shape(k: int, problem: Problem, reuse: SavedPlan, kernels: str) -> Plan:
    """``_reuse_plan`` of ``plan=[k]``; a refusal names which plan, for which
    inputs (it read as about the example inputs, whichever was wrong)."""
    try:
        return _reuse_plan(problem, reuse, kernels)
    except PlannerError as exc:
        inputs = "example_inputs" if k == 0 else f"extra_example_inputs[{k - 1}]"
        raise PlannerError(f"plan[{k}] (for {inputs}): {exc}") from exc


def _check_time_limit(time_limit: float) -> None:
    number = isinstance(time_limit, (int, float)) and not isinstance(time_limit, bool)
    if not number or not time_limit >= 0:
        raise PlannerValueError(
            f"time_limit must be seconds of solver search, a number >= 0, got {time_limit!r}: "
            f"pass e.g. time_limit={DEFAULT_TIME_LIMIT} (0 keeps the best baseline plan)"
        )


@_retry_finds_the_weights_free
@caller_rng_kept
@planning_training_in_grad_mode
def plan(
    model: torch.nn.Module,
    budget: int | str,
    example_inputs: Any,
    mode: str = "infer",
    offload_dir: str | None = None,
    profile: str | DeviceProfile | None = None,
    quantize: str | dict[str, str] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    checkpoint: str | os.PathLike[str] | None = None,
    plan: SavedPlan | list[SavedPlan] | tuple[SavedPlan, ...] | None = None,
    kernels: str = "eager",
    measure_room: bool = True,
    extra_example_inputs: Sequence[Any] | None = None,
) -> PlannedModule:
    """Plan ``model`` under ``budget`` and return a module that runs the plan.

    The result returns exactly what ``model`` returns (same pytree), never holding
    more than ``budget`` bytes on the device.

    ``budget``: bytes (an int), a size (``"512MiB"``, ``"2GB"``) or a share of the
    unplanned peak (``"60%"``); below what any plan reaches, BudgetTooSmall with
    ``min_budget``. ``"min"``: that smallest budget, planned in one capture (where
    catching BudgetTooSmall and planning at its ``min_budget`` traces twice).
    ``example_inputs``: what the model is called with when planned, as a tensor,
    a tuple of positional arguments, a dict of keyword arguments, or ``(args,
    kwargs)``; a call must match their shapes and dtypes.
    ``mode``: ``"infer"`` (outputs only) or ``"train"`` (``pm(x)`` builds an
    autograd graph; the budget covers forward and backward; gradients land on the
    model's parameters). ``profile``: the device profile that prices ops and copies
    (``"h100"``, ``"cpu"``, a DeviceProfile, a JSON path; None: the calibrated
    one, else this machine's built-in). ``quantize``: ``"int8"`` / ``"int4"`` or a
    mapping (``{"weights": "int8"}``) to allow lossy storage; None (default) is
    lossless. ``time_limit``: seconds of CP-SAT's search (default 20; 0 keeps the
    best baseline plan). It does not bound the whole call: capture, analysis and
    the greedy baseline (given at least 30 s, so that it finds a plan that fits)
    come on top, and so does compiling with ``kernels="inductor"``.

    ``offload_dir``: where disk-tier files
    go (a fresh subdirectory is made there and removed with the module; default: a
    temporary directory). Tier-home weights are released from ``model``.
    ``checkpoint``: a safetensors file to take the weights of a model built on the
    meta device from, or a sharded checkpoint's index (``model.safetensors.index.json``)
    or directory (memory-mapped: for models larger than RAM; weights homed on disk
    are read from it in place; inference or training, which copies what it trains
    into memory or its store: the files are never written). ``plan``: a saved
    plan (``pm.plan.save(path)``) to reuse without solving again; it must have been
    made for this graph and budget.

    ``kernels``: ``"eager"`` (default) runs each op as its own ATen call, so outputs
    and gradients are bit-identical to the captured graph run unplanned.
    ``"inductor"`` compiles each run of ops between the plan's memory steps with
    TorchInductor (fused kernels, as ``torch.compile`` makes them): faster, with
    outputs equal to eager within floating-point rounding instead of bit for bit.
    Compiling takes seconds per distinct run on first use (Inductor caches
    kernels across calls and processes). Random ops stay eager.

    ``measure_room`` (with ``"inductor"``): compiled runs hold less than their
    ops one by one, so schedules are also solved op by op for budgets above
    ``budget`` and assembled, each run compiled and its allocations measured;
    the fastest by estimate whose compiled executor holds within ``budget``
    is kept (``planner.measured_room``; ``pm.plan.op_level_budget_bytes`` says
    which). It costs a solve and a compile per budget tried (GPT-2's example:
    about a minute); False plans for ``budget`` alone.

    With ``"inductor"`` the plan is checked by the meter before it is returned
    (``planner.verify``): one call (training: one step) on ``example_inputs``, its
    effects undone, must hold ``budget``; ``pm.measured`` says what it held. Over
    the budget, training falls back to the schedule solved for ``budget`` alone;
    otherwise PlannerError, with the model left whole.

    ``extra_example_inputs``: more input shapes the module serves (a prompt's
    chunk beside one token; a training set's last, smaller batch), each a set of
    example inputs as ``example_inputs`` is. Each shape gets its own plan under
    ``budget`` (a share of the largest shape's unplanned peak), all of them
    homing each weight in the same place, over one offload store
    (``planner.shapes``); a call runs the plan its arguments match. In training
    they train the same parameters (a second ``plan`` of the model for training
    would take them over from the first). ``pm.other_shapes[k]`` is the module of
    ``extra_example_inputs[k]`` (its ``report``, ``code``). ``plan`` then takes
    a saved plan per shape, in order (``pm.plan``, then each of
    ``pm.other_shapes``'s), which must home the weights alike.
    """
    check_kernels(kernels)  # before any work
    _check_time_limit(time_limit)
    if extra_example_inputs is not None and not isinstance(extra_example_inputs, (list, tuple)):
        # a dict of keyword arguments was iterated as its keys ("got str"), a tensor
        # as its rows (an error from inside the model)
        raise PlannerError(
            f"extra_example_inputs takes a list of example inputs, one per more shape "
            f"(extra_example_inputs=[inputs_2, inputs_3], each as example_inputs is "
            f"given), got a {type(extra_example_inputs).__name__}: wrap it in a list"
        )
    _check_smallest_not_reused(budget, plan, "plan=")
    check_saved_plan_given(plan)
    if extra_example_inputs:
        _check_saved_plans(plan, 1 + len(extra_example_inputs))
    elif isinstance(plan, (list, tuple)):
        raise PlannerError(
            f"plan= got {len(plan)} saved plans for one input shape: pass one (a list is "
            f"for a module planned with extra_example_inputs, one plan per shape)"
        )
    args, kwargs = normalize_example_inputs(example_inputs)
    # the devices the example inputs use (a GPU batch may come with CPU lengths);
    # the module's is the first tensor's
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    devices = {t.device for t in tensors}
    if device.type == "meta":
        raise PlannerError(
            "the example inputs are on the meta device, which holds no values: a plan is "
            "made and checked by running them. Give real example inputs (a model built on "
            "the meta device takes its weights from checkpoint=)"
        )
    for k, extra in enumerate(extra_example_inputs or ()):
        with _naming_extra_set(k):  # "example_inputs contain no tensor"
            leaves = pytree.tree_leaves(normalize_example_inputs(extra))
        other = {t.device for t in leaves if isinstance(t, torch.Tensor)} - devices
        if other:  # the meta device was blamed on forward(): "make it traceable"
            raise PlannerError(
                f"extra_example_inputs[{k}] hold tensors on {listed(sorted(map(str, other)))} "
                f"and the example inputs are on {listed(sorted(map(str, devices)))}: give "
                f"every set of example inputs real tensors on the devices the module will "
                f"be called with"
            )
    profile = _profile_for_device(profile, device)  # before anything touches the model
    if offload_dir is not None:
        check_offload_dir(offload_dir)
    # a plan that fails puts back the meta tensors the checkpoint's maps replaced
    with checkpoint_attached(model, checkpoint):
        if extra_example_inputs:
            return _plan_shapes(
                model, budget, [example_inputs, *extra_example_inputs], mode, offload_dir,
                profile, quantize, time_limit, kernels, device, plan, measure_room,
            )  # fmt: skip
        assert not isinstance(plan, (list, tuple))  # refused above
        analysis, problem, solved = _analyze_and_solve(
            model, budget, example_inputs, mode, profile, quantize, time_limit, plan, kernels
        )
        if mode == "infer":
            warn_if_inference_traced_in_training(model, analysis.program)
        if kernels != "inductor":  # peaks predicted op by op: the validator's replay
            return PlannedModule(model, analysis, problem, solved, offload_dir, device, kernels)

        def module_of(schedule: Plan, assembled: Assembled | None) -> PlannedModule:
            return PlannedModule(
                model, analysis, problem, schedule, offload_dir, device, kernels,
                assembled=assembled, defer_release=True,
            )  # fmt: skip

        pm = _compiled_and_checked(
            module_of, analysis, problem, solved, device, time_limit,
            search_room=plan is None and measure_room, example=(args, kwargs),
        )  # fmt: skip
        pm.release_offloaded(model)
        return pm


def _compiled_and_checked(
    module_of: Callable[[Plan, Assembled | None], PlannedModule],
    analysis: Analysis,
    problem: Problem,
    solved: Plan,
    device: torch.device,
    time_limit: float,
    search_room: bool,
    example: tuple[tuple, dict[str, Any]],
    close_refused: bool = True,
) -> PlannedModule:
    """The module (``module_of(schedule, its assembled executor or None)``) of a
    plan with Inductor kernels: planned by measured room from ``solved`` first
    (``search_room``), then checked by the meter on the ``example`` call
    (``_checked_by_meter``); over the budget, training falls back to ``solved``
    itself (one training analysis makes more modules)."""
    schedule, assembled = solved, None
    if search_room:
        schedule, assembled = plan_by_measured_room(analysis, problem, solved, device, time_limit)
    fallback: Callable[[], PlannedModule] | None = None
    if schedule is not solved and problem.mode == "train":
        fallback = functools.partial(module_of, solved, None)
    args, kwargs = example
    module = module_of(schedule, assembled)
    return _checked_by_meter(module, args, kwargs, fallback, close_refused=close_refused)


def _analyzed_shape(
    model: torch.nn.Module,
    k: int,
    inputs: Any,
    mode: str,
    profile: DeviceProfile,
    kernels: str,
) -> Analysis:
    """``analyze`` of input set ``k`` (0: example_inputs, k: extra_example_inputs[k
    - 1]); an error says which set it is about: the sets before it were captured,
    so what failed is this one's (a dtype, a shape the model cannot take)."""
    if k == 0:
        return analyze(model, inputs, mode, profile, kernels)
    with _naming_extra_set(k - 1):
        return analyze(model, inputs, mode, profile, kernels)


@contextlib.contextmanager
def _naming_extra_set(k: int) -> Iterator[None]:
    """A CaptureError or PlannerTypeError raised about ``extra_example_inputs[k]``
    starts "with extra_example_inputs[k]: " (the message named no set, and read as
    about the example inputs, which were fine)."""
    try:
        yield
    except (CaptureError, PlannerTypeError) as exc:
        raise type(exc)(f"with extra_example_inputs[{k}]: {exc}") from exc


def _plan_shapes(
    model: torch.nn.Module,
    budget: int | str,
    shapes: list[Any],
    mode: str,
    offload_dir: str | None,
    profile: DeviceProfile,
    quantize: str | dict[str, str] | None,
    time_limit: float,
    kernels: str,
    device: torch.device,
    saved: SavedPlan | list[SavedPlan] | tuple[SavedPlan, ...] | None,
    measure_room: bool,
) -> PlannedModule:
    """``plan`` with ``extra_example_inputs``: one module, a plan per input shape,
    the weights' homes shared (``planner.shapes``); ``saved``: a saved plan per
    shape to use instead of solving. With Inductor kernels each shape is planned
    by measured room (its homes fixed) and checked by the meter as ``plan`` does
    one shape: the first shape's module first (the others share its store)."""
    analyses = [_analyzed_shape(model, k, inputs, mode, profile, kernels) for k, inputs in
                enumerate(shapes)]  # fmt: skip
    # a later shape's trace may install hooks of the model's own (transformers'
    # output recorders, for output_hidden_states=True): a shape traced before them
    # is traced again with them in place (they ran in its calls' eager
    # counterpart), else the first shape's every call was refused for hooks
    # "registered since planning" (or, let through, computed without them)
    hooks = module_hooks(model, backward=mode == "train")
    for k, inputs in enumerate(shapes):
        if analyses[k].captured.extra["hooks"] != hooks:
            analyses[k] = _analyzed_shape(model, k, inputs, mode, profile, kernels)
    problems = [
        from_program(a.program, a.unplanned_peak_bytes, a.profile, quantize, kernels=kernels)
        for a in analyses
    ]
    if is_smallest(budget):  # the largest of the shapes' smallest (plan= refused)
        problems, plans = _at_smallest(problems, lambda ps: solve_shapes(ps, time_limit))
    else:
        reference = max(_budget_reference(budget, p, a) for p, a in zip(problems, analyses))
        budget_bytes = parse_budget(budget, reference)
        problems = [dataclasses.replace(p, budget_bytes=budget_bytes) for p in problems]
        if isinstance(saved, (list, tuple)):  # one per shape (_check_saved_plans)
            _check_saved_order(problems, saved)
            plans = [
                _reused_for_shape(k, p, s, kernels) for k, (p, s) in enumerate(zip(problems, saved))
            ]
            check_same_homes(problems, plans)
        else:
            problems, plans = solve_shapes(problems, time_limit)
    if mode == "infer":
        warn_if_inference_traced_in_training(model, analyses[0].program)

    def checked(k: int, owner: PlannedModule | None) -> PlannedModule:
        """Shape k's module, over ``owner``'s store (None: its own); with Inductor
        kernels as ``plan`` makes one shape's."""

        def module_of(schedule: Plan, assembled: Assembled | None) -> PlannedModule:
            return PlannedModule(
                model, analyses[k], problems[k], schedule,
                offload_dir if owner is None else None, device, kernels,
                assembled=assembled, defer_release=True, share_store_of=owner,
            )  # fmt: skip

        if kernels != "inductor":
            return module_of(plans[k], None)
        return _compiled_and_checked(
            module_of, analyses[k], problems[k], plans[k], device, time_limit,
            search_room=measure_room and saved is None,
            example=normalize_example_inputs(shapes[k]), close_refused=owner is None,
        )  # fmt: skip

    pm = checked(0, None)
    try:
        pm.add_other_shapes([checked(k, pm) for k in range(1, len(plans))])
    except BaseException:
        pm.close()
        raise
    pm.release_offloaded(model)
    return pm


def _check_saved_order(problems: list[Problem], saved: Sequence[Any]) -> None:
    """Saved plans given in another order than the shapes: each was refused as
    made "for a different graph", which sent the caller to plan again."""
    try:
        theirs = [(s if isinstance(s, Plan) else Plan.load(s)).fingerprint for s in saved]
    except (OSError, ValueError, KeyError, TypeError):
        return  # _reuse_plan says what is wrong with it
    ours = [p.fingerprint() for p in problems]
    if ours != theirs and sorted(ours) == sorted(theirs):
        order = [ours.index(f) for f in theirs]
        raise PlannerError(
            f"the saved plans are for these shapes in another order: those given are for "
            f"shapes {order} in turn (0: example_inputs, k: extra_example_inputs[k - 1]); "
            f"pass them in the shapes' order (pm.plan, then each of pm.other_shapes's .plan)"
        )


def _check_saved_plans(saved: Any, shapes: int) -> None:
    """With ``extra_example_inputs``, ``plan=`` is None or one saved plan per shape,
    refused before any work otherwise."""
    if saved is None:
        return
    if not isinstance(saved, (list, tuple)) or len(saved) != shapes:
        got = f"{len(saved)} plans" if isinstance(saved, (list, tuple)) else "one plan"
        raise PlannerError(
            f"with extra_example_inputs, plan= takes a saved plan per input shape ({shapes}, "
            f"in order), got {got}: save them from the module planned for these shapes "
            f"(pm.plan, then each of pm.other_shapes's .plan), or plan without plan="
        )


def _budget_reference(budget: int | str, problem: Problem, analysis: Analysis) -> int:
    """What a share of the budget ("60%") is a share of: the unplanned peak, or
    what the executor would hold with nothing moved, whichever is higher."""
    reference = analysis.unplanned_peak_bytes
    if isinstance(budget, str) and budget.strip().endswith("%"):
        reference = max(keep_all_peak(problem), reference)
    return reference


def _profile_for_device(spec: str | DeviceProfile | None, device: torch.device) -> DeviceProfile:
    """The profile a plan that runs on ``device`` is solved with. None: this
    machine's (a saved calibration or the detected built-in), or, when that is
    for another kind of device, the built-in for ``device``'s. A given profile for
    another kind of device is an error before any work: its plan would use tiers
    and copies the executor there cannot make (``analyze`` and ``make_plan`` take
    any profile, to ask what a plan would be on that hardware)."""
    profile = get_profile(spec)
    if profile.device_type == device.type:
        return profile
    if spec is None:
        fallback = builtin_for_device(device)
        log.warning("this machine's profile %r is for %s; planning for %s with the built-in %r "
                    "(pass profile= to choose)", profile.name, profile.device_type, device,
                    fallback.name)  # fmt: skip
        return fallback
    raise PlannerError(
        f"profile {profile.name!r} is for a {profile.device_type} device, but the example "
        f"inputs are on {device}: pass a {device.type} profile (profile=None picks this "
        f"machine's; `planner calibrate --device {device.type}` measures one), or move the "
        f"model and inputs to {profile.device_type}; planner.make_plan solves for any "
        f"profile without running"
    )


def _checked_by_meter(
    pm: PlannedModule,
    args: tuple,
    kwargs: dict[str, Any],
    fallback: Callable[[], PlannedModule] | None,
    close_refused: bool = True,
) -> PlannedModule:
    """``pm`` if one call of it on the example inputs holds its budget by the meter
    (``planner.verify``; ``pm.measured`` then says how much); else ``fallback()``,
    checked the same way (the plan solved for the budget alone, when measured room
    chose another); else PlannerError. A refused module is closed."""
    measured = checked_peak(pm, args, kwargs)
    budget = pm.plan.budget_bytes
    if measured.peak_bytes <= budget:  # pm.measured holds it (the metered call's)
        return pm
    over = measured.peak_bytes - budget
    composed = pm.plan.compiled_peak_bytes
    if close_refused:
        pm.close()
    if fallback is not None:
        log.warning(
            "the plan with measured room held %s by the meter, %s over the budget "
            "(composed: %s); using the plan solved for the budget alone",
            format_bytes(measured.peak_bytes),
            format_bytes(over),
            format_bytes(composed) if composed else "?",
        )
        return _checked_by_meter(fallback(), args, kwargs, None)
    raise PlannerError(
        f"the compiled plan held {measured.peak_bytes:,} bytes by the meter on the example "
        f"inputs, {over:,} over the budget of {budget:,} (its compiled runs' measured "
        f"allocations composed to {composed or 0:,}). Plan with kernels='eager' (peaks "
        f"predicted op by op), or a budget {over:,} bytes lower"
    )


def measure_unplanned(
    analysis: Analysis, model: torch.nn.Module, example_inputs: Any
) -> Measurement:
    """Meter one unplanned run on the CPU: the captured inference graph under
    no_grad, or an eager forward + backward for training."""
    args, kwargs = normalize_example_inputs(example_inputs)
    if analysis.program.mode == "train":
        return measure_training_step(model, args, kwargs)[1]
    module = analysis.captured.extra["exported_program"].module()

    def run() -> Any:
        with torch.no_grad():
            return module(*args, **kwargs)

    return measure(run, model, (args, kwargs))[1]
