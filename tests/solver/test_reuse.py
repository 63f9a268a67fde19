"""An op writing its output into the buffer of an input that dies there (``out=``):
bit-identical to the out-of-place op, accounted once by the model and the
validator, and what brings GPT-2's training floor (the loss backward's three
logits-sized buffers) below half its unplanned peak."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_example

import planner
from planner.codegen.emit import out_variant
from planner.errors import InvalidPlan
from planner.solver import from_program, solve, validate
from planner.solver.candidates import build_candidates
from planner.solver.plan import Action
from planner.solver.solve import lower_bound_bytes
from planner.solver.translate import REUSE_INPUT


def _call_args(target: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
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
    name, overload = target.removeprefix("aten.").rsplit(".", 1)
    op = getattr(getattr(torch.ops.aten, name), overload)
    variant, out_arg = out_variant(op)
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (64, 1000), (2, 3, 130)]:
        x, y = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        args = _call_args(target, x, y)
        expected = op(*args)
        into = x.clone()
        args = (into, *args[1:])
        result = variant(*args, **{out_arg: into})
        assert result.data_ptr() == into.data_ptr()  # no new buffer
        assert torch.equal(result, expected), (target, shape)


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
