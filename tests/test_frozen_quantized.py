"""Training with frozen weights stored quantized (QLoRA's idea): a fine-tune's
frozen base does not change from step to step, so with ``quantize=`` a training
plan may keep it as int8/int4 codes (on the device or in a tier) and dequantize
it for each use, forward and backward. What it computes is then exactly what the
eager model computes with those weights replaced by their round trip; the
parameters that train are never quantized; the full copies are freed."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_step_within

import planner
from planner.errors import PlannerError
from planner.runtime import quant

#: (de)quantization priced at memory speed, as the Triton kernels run on a GPU,
#: and a slow disk: the budgets here are met by storing the frozen base quantized
_CPU = planner.get_profile("cpu")
QUANTIZE_OVER_DISK = dataclasses.replace(
    _CPU,
    quantize_bandwidth=_CPU.memory_bandwidth,
    dequantize_bandwidth=_CPU.memory_bandwidth,
    disk_read_bandwidth=1e8,
    disk_write_bandwidth=1e8,
)


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, width: int, rank: int = 8) -> None:
        super().__init__()
        self.base = torch.nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(width, rank) * 0.02)
        self.b = torch.nn.Parameter(torch.randn(rank, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a) @ self.b


class LoRANet(torch.nn.Module):
    def __init__(self, width: int = 512, depth: int = 6) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([LoRALinear(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x.square().mean()


def _lora(seed: int = 0) -> tuple[LoRANet, torch.Tensor]:
    torch.manual_seed(seed)
    return LoRANet(), torch.randn(64, 512)


def _frozen_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def _plan(
    model: torch.nn.Module, x: torch.Tensor, budget: int, fmt: str, **options: Any
) -> planner.PlannedModule:
    """A training plan allowing ``fmt`` weights, priced by ``QUANTIZE_OVER_DISK``
    unless ``options`` say otherwise."""
    settings: dict[str, Any] = {"profile": QUANTIZE_OVER_DISK, "time_limit": 20, **options}
    return planner.plan(
        model, budget, example_inputs=(x,), mode="train", quantize={"weights": fmt}, **settings
    )


def _quantized_homes(pm: planner.PlannedModule) -> dict[str, str]:
    return {d.name: d.home for d in pm.plan.tensors if d.home.endswith(("int8", "int4"))}


@pytest.fixture(scope="module")
def lora_int8_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schedule ``_plan`` solves for ``_lora()`` at 65% of its frozen bytes with
    int8 weights, solved once (the solver is deterministic) and saved: the tests
    that check what a module so planned does with its model (errors, state_dict,
    warnings, an optimizer) plan their own fresh model with it (``plan=``) rather
    than solve the same problem again. The round-trip test solves its own."""
    model, x = _lora()
    _, solved = planner.make_plan(
        model, int(0.65 * _frozen_bytes(model)), (x,), mode="train",
        quantize={"weights": "int8"}, profile=QUANTIZE_OVER_DISK, time_limit=20,
    )  # fmt: skip
    return solved.save(tmp_path_factory.mktemp("plans") / "lora_int8.json")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_frozen_base_stored_quantized_trains_as_its_round_trip(fmt: str) -> None:
    """Below the frozen base's own fp32 bytes, the plan stores it quantized: the
    loss and every adapter's gradient are bit-identical to eager's with the base
    round-tripped, the step stays within the budget under the meter, the trained
    parameters keep full precision, and the base's full copies are freed."""
    model, x = _lora()
    budget = int(0.65 * _frozen_bytes(model))
    first_base = weakref.ref(model.layers[0].base.weight)
    pm = _plan(model, x, budget, fmt)
    try:
        homes = _quantized_homes(pm)
        assert homes, "the budget is below the frozen weights: some must be quantized"
        frozen_rows = [row.name for row in pm.report.tensors if row.frozen]
        assert sorted(frozen_rows) == [
            f"layers.{i}.base.{w}" for i in range(6) for w in ("bias", "weight")
        ]
        assert "param (frozen)" in str(pm.report)
        trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
        assert all(".base.weight" in name for name in homes) and not trainable & homes.keys()
        reference = quant.round_tripped(_lora()[0], set(homes), fmt)
        expected = reference(x)
        expected.backward()
        loss = pm(x)
        loss.backward()
        assert torch.equal(loss, expected)
        for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
            if r.grad is not None:
                assert torch.equal(p.grad, r.grad), name
        for p in pm.parameters():
            p.grad = None
        pm.run_measured_step(x)
        assert pm.measured is not None and pm.measured.peak_bytes <= budget
        gc.collect()
        if "layers.0.base.weight" in homes:
            assert first_base() is None, "the planned module or the model kept the full copy"
    finally:
        pm.close()


def test_steps_of_an_optimizer_match_eager_over_the_round_trip(lora_int8_plan: Path) -> None:
    """Three AdamW steps over pm.parameters() (the frozen stand-ins included, as
    ``model.parameters()`` lists them; they get no gradient): losses and adapters
    bit-identical to eager's over the round-tripped base."""
    model, x = _lora()
    pm = _plan(model, x, int(0.65 * _frozen_bytes(model)), "int8", plan=lora_int8_plan)
    try:
        homes = _quantized_homes(pm)
        reference = quant.round_tripped(_lora()[0], set(homes), "int8")
        planned_opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
        eager_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        for _ in range(3):
            for opt, run in ((planned_opt, pm), (eager_opt, reference)):
                opt.zero_grad()
                run(x).backward()
                opt.step()
        assert torch.equal(pm(x), reference(x))
        for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
            if p.requires_grad:
                assert torch.equal(p, r), name
    finally:
        pm.close()


def test_the_model_reading_a_quantized_frozen_weight_says_where_it_went(
    lora_int8_plan: Path,
) -> None:
    model, x = _lora()
    pm = _plan(model, x, int(0.65 * _frozen_bytes(model)), "int8", plan=lora_int8_plan)
    try:
        name = next(iter(_quantized_homes(pm)))
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        with pytest.raises(PlannerError, match="stores frozen weights .* quantized"):
            owner.weight + 1
        owner.weight.requires_grad_(True)  # unfreezing it after planning
        with pytest.raises(PlannerError, match="did not require grad when planned"):
            pm(x)
    finally:
        pm.close()


def test_state_dict_leaves_quantized_frozen_weights_out_and_refuses_them(
    lora_int8_plan: Path,
) -> None:
    """pm.state_dict() holds everything but the quantized frozen weights (with a
    warning naming them) and loads back into pm; loading values for one of them
    is an error (the plan holds the codes of the values it was planned with)."""
    model, x = _lora()
    full = copy.deepcopy(model.state_dict())
    pm = _plan(model, x, int(0.65 * _frozen_bytes(model)), "int8", plan=lora_int8_plan)
    try:
        homes = _quantized_homes(pm)
        with pytest.warns(UserWarning, match="leaves out"):
            state = pm.state_dict()
        assert set(state) == set(full) - set(homes)
        assert torch.equal(state["layers.0.a"], full["layers.0.a"])
        assert not pm.load_state_dict(state).missing_keys
        with pytest.raises(PlannerError, match="frozen and stored quantized"):
            pm.load_state_dict(full)
    finally:
        pm.close()


class TiedFrozen(torch.nn.Module):
    """A frozen embedding shared with the output head (read at the last position),
    a trainable middle whose saved activations compete with it for the budget."""

    def __init__(self, vocab: int = 2048, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.middle = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.embed.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.middle:
            h = torch.tanh(layer(h))
        return self.head(h[:, -1]).square().mean()


def test_a_tied_frozen_weight_leaves_the_model_under_both_names() -> None:
    """Stored int8, the tied weight's lookup reads exact rows and the head its
    round trip: loss and gradients bit-identical to eager over the weight untied
    that way (``quant.round_tripped(exact_lookups=)``)."""
    torch.manual_seed(0)
    model = TiedFrozen()
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, 2048, (4, 128))
    # (the peak alone: an analysis kept would hold the weights' full copies)
    peak = planner.analyze(
        model, (ids,), mode="train", profile=QUANTIZE_OVER_DISK
    ).unplanned_peak_bytes
    pm = _plan(model, ids, int(0.65 * peak), "int8")
    try:
        assert "embed.weight" in _quantized_homes(pm)
        assert model.head.weight is model.embed.weight
        with pytest.raises(PlannerError, match="frozen"):
            model.head.weight.sum()
        rows = {row["tensor"]: row for row in pm.report.quantized}
        assert rows["embed.weight"]["exact_lookups"]
        reference = quant.round_tripped(pristine, set(rows), "int8", exact_lookups={"embed.weight"})
        loss, expected = pm(ids), reference(ids)
        loss.backward()
        expected.backward()
        assert torch.equal(loss, expected)
        for layer, ref in zip(model.middle, reference.middle, strict=True):
            assert torch.equal(layer.weight.grad, ref.weight.grad)
        pm.run_measured_step(ids)
        assert pm.measured is not None and pm.measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()


def _check_close_to_round_trip(
    pm: planner.PlannedModule, model: torch.nn.Module, x: torch.Tensor, budget: int
) -> None:
    """Some frozen weights stored int8; every gradient within rounding of eager's
    over their round trip; one step within the budget under the meter."""
    homes = _quantized_homes(pm)
    assert homes
    reference = quant.round_tripped(_lora()[0], set(homes), "int8").to(x.device)
    reference(x).backward()
    pm(x).backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, msg=name)
    for p in pm.parameters():
        p.grad = None
    pm.run_measured_step(x)
    assert pm.measured is not None and pm.measured.peak_bytes <= budget


def test_compiled_runs_dequantize_the_frozen_base_forward_and_backward() -> None:
    """With Inductor's kernels the same plan holds within the budget under the
    meter, and the gradients equal the round trip's within rounding."""
    model, x = _lora()
    budget = int(0.65 * _frozen_bytes(model))
    pm = _plan(model, x, budget, "int8", kernels="inductor")
    try:
        _check_close_to_round_trip(pm, model, x, budget)
    finally:
        pm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_frozen_base_stored_quantized_on_cuda() -> None:
    """On CUDA the codes are made and read by the Triton kernels (a fused
    dequantize-matmul accumulates in its own order): gradients equal the round
    trip's within rounding, and the step holds within the budget by the caching
    allocator's counters."""
    model, x = _lora()
    model, x = model.cuda(), x.cuda()
    budget = int(0.65 * _frozen_bytes(model))
    pm = _plan(model, x, budget, "int8", profile=None)  # this machine's: CUDA
    try:
        _check_close_to_round_trip(pm, model, x, budget)
    finally:
        pm.close()


class _LMLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss


def test_a_peft_lora_llama_with_dropout_trains_over_its_int4_base() -> None:
    """QLoRA's setting as users build it: PEFT's LoRA (with dropout, replayed
    exactly) on a Llama whose base the plan stores int4. Loss and every adapter
    gradient bit-identical to eager's over the round-tripped base (lookups read
    exact rows: their weight is left exact), within the budget under the meter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        use_cache=False,
    )
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1)
    step = _LMLoss(get_peft_model(LlamaForCausalLM(config), lora)).train()
    pristine = copy.deepcopy(step)
    ids = torch.randint(0, 512, (2, 32))
    peak = planner.analyze(
        step, (ids,), mode="train", profile=QUANTIZE_OVER_DISK
    ).unplanned_peak_bytes
    budget = int(0.5 * peak)
    pm = _plan(step, ids, budget, "int4")
    try:
        assert any("lora" not in name for name in _quantized_homes(pm))
        lossy = {row["tensor"] for row in pm.report.quantized if not row["exact_lookups"]}
        reference = quant.round_tripped(pristine, lossy, "int4")
        torch.manual_seed(5)
        loss = pm(ids)
        loss.backward()
        torch.manual_seed(5)
        expected = reference(ids)
        expected.backward()
        assert torch.equal(loss, expected)
        trained = 0
        for (name, p), r in zip(step.named_parameters(), reference.parameters(), strict=True):
            if r.grad is not None:
                assert torch.equal(p.grad, r.grad), name
                trained += 1
        assert trained == 12  # A and B of 3 projections in 2 layers
        assert_step_within(pm, (ids,), budget)
    finally:
        pm.close()


def test_full_copies_held_by_an_optimizer_built_before_planning_are_warned_of(
    recwarn: pytest.WarningsRecorder, lora_int8_plan: Path
) -> None:
    """An optimizer over every parameter, built before planning, keeps the frozen
    weights' full copies alive beside their codes: planning says so. Built
    after, nothing is held and nothing is said."""
    model, x = _lora()
    budget = int(0.65 * _frozen_bytes(model))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"still held outside the model.*optimizer"):
        pm = _plan(model, x, budget, "int8", plan=lora_int8_plan)
    pm.close()
    del early
    recwarn.clear()
    model, x = _lora()
    pm = _plan(model, x, budget, "int8", plan=lora_int8_plan)
    try:
        assert not [w for w in recwarn.list if "still held" in str(w.message)]
    finally:
        pm.close()
