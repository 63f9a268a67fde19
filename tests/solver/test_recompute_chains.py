"""Recompute recipes that replay dead inputs first (a chain), view steps that are
not uses, and recipes priced as compiled runs run them.

A ReLU after a BatchNorm reads the BatchNorm's output, which nothing else reads:
no plan could keep it for a replay, so without a chain the ReLU output could only
come back by a copy, and the cheap way to free memory (keep the convolution
output, remake BatchNorm + ReLU from it, as TorchInductor's min-cut partitioner
does) was out of the solver's reach."""

from __future__ import annotations

import pytest
import torch
from conftest import WithLoss
from torch import nn

import planner
from planner.ir.program import Op
from planner.passes.fused_costs import is_fusible
from planner.runtime.meter import measure
from planner.solver import from_program, validate
from planner.solver.baselines import recompute_all
from planner.solver.candidates import build_candidates
from planner.solver.plan import SolverStats
from planner.solver.schedule import plan_from_choices


class ConvBnRelu(nn.Module):
    """Two conv-BN-ReLU blocks and a residual add: activations of 256 KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def _model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return WithLoss(ConvBnRelu()), (torch.randn(4, 16, 32, 32),)


@pytest.fixture(scope="module")
def analysis():  # type: ignore[no-untyped-def]
    return planner.analyze(*_model(), mode="train", profile="cpu")


def _tensor(problem, name: str):  # type: ignore[no-untyped-def]
    return next(t for t in problem.tensors if t.name == name)


def _step(analysis, target: str, nth: int = 0) -> int:  # type: ignore[no-untyped-def]
    return [op.index for op in analysis.program.ops if op.target == target][nth]


def test_relu_is_recomputed_through_the_batchnorm_from_the_convolution(analysis) -> None:  # type: ignore[no-untyped-def]
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)
    relu = _tensor(problem, "relu")
    recipe = relu.recompute
    bn = _step(analysis, "aten._native_batch_norm_legit_functional.default")
    conv = _tensor(problem, "convolution")
    assert recipe is not None and recipe.step == _step(analysis, "aten.relu.default")
    assert [step for step, _ in recipe.chain] == [bn]
    bn_out = recipe.chain[0][1]
    assert conv.index in recipe.inputs and bn_out not in recipe.inputs
    assert recipe.release == ((), (bn_out,))  # the BN output goes after the ReLU
    # the BN output is held while the ReLU runs
    assert recipe.extra_bytes >= problem.tensors[bn_out].nbytes
    ops = analysis.program.ops
    assert recipe.seconds == pytest.approx(ops[bn].cost.seconds + ops[recipe.step].cost.seconds)


def test_view_steps_are_not_uses(analysis) -> None:  # type: ignore[no-untyped-def]
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)
    relu = _tensor(problem, "relu")
    program = analysis.program
    storage = program.storages[relu.index]
    all_uses = {u for vi in storage.values for u in program.values[vi].uses}
    views = {u for u in all_uses if program.ops[u].target == "aten.detach.default"}
    assert views, "AOTAutograd detaches the saved ReLU output"
    assert set(relu.uses) == all_uses - views


def test_the_chain_is_an_option_even_when_it_reads_weights_used_only_forward(analysis) -> None:  # type: ignore[no-untyped-def]
    # the BatchNorm bias is read by the forward only (its gradient does not need it)
    # and is too small to move: pinned, on the device for the whole step
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)
    cands = build_candidates(problem)
    relu = _tensor(problem, "relu")
    gaps = [cands.gaps[g] for g in cands.gaps_of[relu.index]]
    assert any(o.choice == "recompute" for g in gaps for o in g.options)


def test_a_plan_of_chains_runs_exact_and_within_its_budget(analysis) -> None:  # type: ignore[no-untyped-def]
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)
    cands = build_candidates(problem)
    # recompute everything it can, but the first ReLU from the kept convolution
    # output: its saved copy is gone when the backward's detach of it runs
    choices = recompute_all(cands)
    relu = _tensor(problem, "relu")
    for kept in ("convolution", "convolution_1"):  # what makes and what reads it
        for gi in cands.gaps_of[_tensor(problem, kept).index]:
            choices[gi] = "keep"
    for gi in cands.gaps_of[relu.index]:
        choices[gi] = "recompute"
    plan = plan_from_choices(cands, choices, SolverStats("chains", "TEST", 0))
    replay = validate(problem, plan)
    chained = {
        a.tensor
        for a in plan.actions
        if a.kind == "recompute" and _tensor(problem, a.tensor).recompute.chain
    }
    assert "relu" in chained

    reference_model, inputs = _model()
    reference = planner.plan(reference_model, "100%", inputs, mode="train", profile="cpu")
    reference(*inputs).backward()
    expected = {n: p.grad.clone() for n, p in reference_model.named_parameters()}
    reference.close()

    model, inputs = _model()
    budget = problem.budget_bytes
    pm = planner.plan(model, budget, inputs, mode="train", profile="cpu", plan=plan)
    assert "on the way to recompute" in pm.code
    assert "a view, made when first read" in pm.code

    def step() -> torch.Tensor:
        loss = pm(*inputs)
        loss.backward()
        return loss

    _, measured = measure(step, pm, inputs)
    assert measured.peak_bytes <= budget
    assert replay.peak_bytes <= budget
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    pm.close()


def test_compiled_runs_price_fusible_replays_below_eager(analysis) -> None:  # type: ignore[no-untyped-def]
    program, profile = analysis.program, analysis.profile
    eager = from_program(program, analysis.unplanned_peak_bytes, profile)
    fused = from_program(program, analysis.unplanned_peak_bytes, profile, kernels="inductor")
    relu_eager, relu_fused = _tensor(eager, "relu"), _tensor(fused, "relu")
    assert relu_fused.recompute.chain == relu_eager.recompute.chain
    assert relu_fused.recompute.seconds < relu_eager.recompute.seconds
    conv_eager, conv_fused = _tensor(eager, "convolution"), _tensor(fused, "convolution")
    assert conv_fused.recompute.seconds == conv_eager.recompute.seconds  # a library kernel
    for e, f in zip(eager.steps, fused.steps):
        assert f.seconds <= e.seconds
        if not is_fusible(program.ops[e.index]):
            assert f.seconds == e.seconds


@pytest.mark.parametrize(
    ("target", "fusible"),
    [
        ("aten.add.Tensor", True),
        ("aten._native_batch_norm_legit_functional.default", True),
        ("aten.tanh.default", True),
        ("aten.convolution.default", False),
        ("aten.convolution_backward.default", False),
        ("aten.addmm.default", False),
        ("aten.mm.default", False),
        ("aten._scaled_dot_product_flash_attention_for_cpu.default", False),
        ("aten.native_dropout.default", False),
    ],
)
def test_library_kernels_and_random_ops_are_not_fusible(target: str, fusible: bool) -> None:
    random = target == "aten.native_dropout.default"
    assert is_fusible(Op(0, "op", target, [], [], draws_random=random)) is fusible


class SiLUMlp(nn.Module):
    """A matmul, then x * sigmoid(x) written out: the sigmoid output is saved for
    the backward, so it lives on past the product."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(h * torch.sigmoid(h))


def test_compiled_runs_remake_live_fusible_inputs_from_the_matmul_output() -> None:
    torch.manual_seed(0)
    analysis = planner.analyze(
        WithLoss(SiLUMlp()), (torch.randn(64, 256),), mode="train", profile="cpu"
    )
    program, profile = analysis.program, analysis.profile
    eager = from_program(program, analysis.unplanned_peak_bytes, profile)
    fused = from_program(program, analysis.unplanned_peak_bytes, profile, kernels="inductor")
    product = next(
        t.index
        for t in eager.tensors
        if t.recompute is not None and program.ops[t.recompute.step].target == "aten.mul.Tensor"
    )
    sigmoid = _tensor(eager, "sigmoid").index
    matmul = _tensor(eager, "addmm").index
    # eager: the product reads the sigmoid output, which the plan must then keep
    assert sigmoid in eager.tensors[product].recompute.inputs
    assert not eager.tensors[product].recompute.chain
    # compiled: the sigmoid is remade on the way, from the matmul output alone
    recipe = fused.tensors[product].recompute
    assert [kept for _, kept in recipe.chain] == [sigmoid]
    assert matmul in recipe.inputs and sigmoid not in recipe.inputs
