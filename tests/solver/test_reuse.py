"""An op writing its output into the buffer of an input that dies there (``out=``):
bit-identical to the out-of-place op, accounted once by the model and the
validator, and what brings GPT-2's training floor (the loss backward's three
logits-sized buffers) below half its unplanned peak."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import WithLoss, load_example

import planner
from planner.codegen.emit import out_variant
from planner.errors import InvalidPlan
from planner.solver import from_program, solve, validate
from planner.solver.candidates import build_candidates
from planner.solver.plan import Action
from planner.solver.solve import lower_bound_bytes
from planner.solver.translate import REUSE_INPUT, UPDATE_IN_PLACE, _reused_input


def _call_args(target: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
    if target.startswith("planner.log_softmax_nll_backward"):  # into the log-softmax
        log_probs = torch.log_softmax(y.reshape(-1, y.shape[-1]), -1)
        labels = torch.arange(log_probs.shape[0]) % log_probs.shape[1]
        total = torch.tensor(float(log_probs.shape[0]), dtype=y.dtype)
        return (torch.tensor(0.5, dtype=y.dtype), log_probs, labels, None, 1, -100, total)
    if target.startswith("aten._log_softmax_backward_data"):
        return (x, torch.log_softmax(y, -1), -1, x.dtype)
    if target.startswith("aten._softmax_backward_data"):
        return (x, torch.softmax(y, -1), -1, x.dtype)
    if target.startswith("aten.threshold_backward"):
        return (x, y, 0.0)
    return (x, y)


@pytest.mark.parametrize("target", sorted(REUSE_INPUT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_into_the_dying_input_is_bit_identical(target: str, dtype: torch.dtype) -> None:
    namespace, name, overload = target.split(".")
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    variant, out_arg = out_variant(op)
    position = REUSE_INPUT[target]
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (64, 1000), (2, 3, 130)]:
        x, y = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        args = _call_args(target, x, y)
        expected = op(*args)
        into = args[position].clone()
        args = (*args[:position], into, *args[position + 1 :])
        result = variant(*args, **{out_arg: into})
        assert result.data_ptr() == into.data_ptr()  # no new buffer
        assert torch.equal(result, expected), (target, shape)


def _update_args(target: str, buffer: torch.Tensor, g: torch.Generator) -> tuple:
    """Arguments of a buffer update of rows 1 and 3 (all of it for ``copy``)."""
    rows = torch.tensor([1, 3])
    new = torch.randn((2, *buffer.shape[1:]), generator=g).to(buffer.dtype)
    if target.startswith("aten.index_copy"):
        return (buffer, 0, rows, new)
    if target.startswith("aten.index_put"):
        return (buffer, [rows], new)
    if target.startswith("aten.slice_scatter"):
        return (buffer, new, 0, 1, 3)
    if target.startswith("aten.select_scatter"):
        return (buffer, new[0], 0, 2)
    return (buffer, torch.randn(buffer.shape, generator=g).to(buffer.dtype))


@pytest.mark.parametrize("target", sorted(UPDATE_IN_PLACE))
def test_a_buffer_update_written_into_the_buffer_is_bit_identical(target: str) -> None:
    namespace, name, overload = target.split(".")
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    variant, out_arg = out_variant(op)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        buffer = torch.randn(6, 4, 33, generator=g).to(dtype)
        args = _update_args(target, buffer.clone(), g)
        expected = op(*args)
        result = variant(*args, **{out_arg: args[0]})
        assert result.data_ptr() == args[0].data_ptr()  # no new buffer
        assert torch.equal(result, expected), target


@pytest.fixture(scope="module")
def gpt2_train_problem():  # type: ignore[no-untyped-def]
    model, inputs = load_example("gpt2_train")
    analysis = planner.analyze(model, inputs, mode="train", profile="cpu")
    return analysis, from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)


def test_gpt2_loss_backward_reuses_its_incoming_gradient(gpt2_train_problem) -> None:  # type: ignore[no-untyped-def]
    analysis, problem = gpt2_train_problem
    reused = {
        s.name: (problem.tensors[s.reuse[0]].name, problem.tensors[s.reuse[1]].name)
        for s in problem.steps
        if s.reuse
    }
    assert reused["_log_softmax_backward_data"] == (
        "nll_loss_backward",
        "_log_softmax_backward_data",
    )
    # its three logits-sized buffers were half the peak; now two are
    floor = lower_bound_bytes(build_candidates(problem))
    assert floor < 0.40 * analysis.unplanned_peak_bytes


def test_an_inductor_graph_writes_the_loss_gradient_into_the_saved_log_softmax() -> None:
    """The fused cross-entropy backward (planner/ir/fused_loss.py) reads the saved
    log-softmax through two ``detach`` views of all of it, and writes the logits'
    gradient into its buffer: one logits-sized buffer at the step, not two."""
    model, inputs = load_example("gpt2_train")
    analysis = planner.analyze(model, inputs, mode="train", profile="cpu", kernels="inductor")
    problem = from_program(
        analysis.program, analysis.unplanned_peak_bytes, analysis.profile, kernels="inductor"
    )
    (step,) = [s for s in problem.steps if s.name.startswith("log_softmax_nll_backward")]
    assert step.reuse is not None
    reused, written = (problem.tensors[i] for i in step.reuse)
    assert reused.name == "_log_softmax" and reused.nbytes == written.nbytes
    program = analysis.program
    op = program.ops[step.index]
    assert program.values[op.inputs[1]].is_view  # a detach of a detach
    # a view of part of a storage is never written into
    view = program.values[op.inputs[1]]
    program.values[op.inputs[1]] = dataclasses.replace(
        view, shape=(view.shape[0] // 2, *view.shape[1:])
    )
    try:
        assert _reused_input(program, step.index, set()) is None
    finally:
        program.values[op.inputs[1]] = view


def test_validator_holds_the_reused_input_gone(gpt2_train_problem) -> None:  # type: ignore[no-untyped-def]
    _, problem = gpt2_train_problem
    problem = dataclasses.replace(problem, budget_bytes=2**40)
    plan = solve(problem, time_limit=2)  # fits unplanned: the keep-all schedule
    validate(problem, plan)
    step = next(s for s in problem.steps if s.name == "_log_softmax_backward_data")
    victim = problem.tensors[step.reuse[0]].name  # type: ignore[index]
    freeing = dataclasses.replace(
        plan, actions=[*plan.actions, Action(step.index, "after", "free", victim)]
    )
    with pytest.raises(InvalidPlan, match="not resident"):
        validate(problem, freeing)


class _TimesTwoOfDetached(torch.nn.Module):
    """Reads an input, a parameter or a buffer through ``detach`` and doubles it:
    the ``mul`` reads the view for the last time, but the memory under it is the
    caller's or the model's, never an op's to take over."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.lin = torch.nn.Linear(128, 128)
        self.w = torch.nn.Parameter(torch.randn(128, 128))
        self.register_buffer("b", torch.randn(128, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source == "input":
            return self.lin(x.detach() * 2)
        held = self.w if self.source == "parameter" else self.b
        return self.lin(x @ (held.detach() * 2))


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("source", ["input", "parameter", "buffer"])
def test_a_detached_input_or_weight_is_not_taken_over(source: str, mode: str) -> None:
    """A view (``detach``) has a producer of its own; the storage under it has
    none: ``mul`` wrote into the input's buffer (InvalidPlan "'mul' cannot take
    over the buffer of 'input[0][0]'") or the weight's ("'w' must end resident")."""
    torch.manual_seed(0)
    model = _TimesTwoOfDetached(source)
    eager = _TimesTwoOfDetached(source)
    eager.load_state_dict(model.state_dict())
    if mode == "train":
        model, eager = WithLoss(model), WithLoss(eager)
    x = torch.randn(64, 128)
    analysis = planner.analyze(model, (x,), mode=mode, profile="cpu")
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)
    assert not any(s.reuse and not problem.tensors[s.reuse[0]].by_op for s in problem.steps)
    del analysis, problem  # they hold the weights, which a plan may keep off the device

    def planned(budget: int | str) -> planner.PlannedModule:
        return planner.plan(model, budget, (x,), mode=mode, profile="cpu", time_limit=3)

    try:
        pm = planned("60%")
    except planner.BudgetTooSmall as e:  # the smallest feasible budget instead
        pm = planned(e.min_budget)
    try:
        for _ in range(2):  # the weights and the caller's input survive a call
            if mode == "infer":
                with torch.no_grad():
                    assert torch.equal(pm(x), eager(x))
            else:
                model.zero_grad(), eager.zero_grad()
                loss, expected = pm(x), eager(x)
                loss.backward(), expected.backward()
                assert torch.equal(loss, expected)
                grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters())]
                assert all(g is not None and torch.equal(g, h) for g, h in grads if h is not None)
    finally:
        pm.close()
