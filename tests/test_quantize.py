"""Lossy storage end to end (``quantize=``): the solver stores tensors quantized
only where the budget needs it, the executor reads quantized weights through
fused ops, the meter stays within the budget, and the error is reported."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import load_example

import planner
from planner.runtime import quant
from planner.runtime.checkpoint import is_file_backed
from planner.solver.validate import validate

#: Top-1 agreement of the planned GPT-2 logits with the lossless run over the
#: benchmark's 32 random token batches (seeds 100-131, 16,384 positions); int8 must
#: reach the issue's 99% (measured 99.04%; 98.9% before lookups read exact rows),
#: int4 is reported (87.8%). The example's weights are random (std 0.02), so its
#: logits are nearly flat over 8192 tokens and 7% of positions have a top-1/top-2
#: gap under 0.01 (see BENCHMARKS_quantize.md): a few batches alone vary by +-0.3%.
AGREEMENT_FLOOR = {"int8": 0.99, "int4": 0.85}
AGREEMENT_SEEDS = range(100, 132)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@functools.cache
def _too_small_without_quantizing(budget: int) -> bool:
    """Whether planning GPT-2 at ``budget`` without ``quantize=`` raises
    BudgetTooSmall: the same for both formats, so tried once for the two."""
    model, inputs = load_example("gpt2")
    try:
        planner.make_plan(model, budget, example_inputs=inputs, time_limit=5)
    except planner.BudgetTooSmall:
        return True
    return False


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpt2_below_its_weight_bytes(fmt: str) -> None:
    reference, inputs = load_example("gpt2")
    model, _ = load_example("gpt2")
    budget = int(0.95 * _weight_bytes(model))  # below the fp32 weights alone
    assert _too_small_without_quantizing(budget), "planned without quantize="
    pm = planner.plan(
        model, budget, example_inputs=inputs, quantize=fmt, time_limit=10, profile="cpu"
    )
    try:
        validate(pm.problem, pm.plan)
        stored = [d for d in pm.plan.tensors if d.home == f"device:{fmt}"]
        assert stored and all(d.decision == f"quantize:{fmt}" for d in stored)
        assert "rt.fused('aten.linear.default'" in pm.code  # no full weight for the head
        # the tied embedding looks up exact rows from the weight's copy on disk
        lookup = next(line for line in pm.code.splitlines() if "rt.fused('aten.embedding" in line)
        assert "exact rows" in lookup
        out = pm.run_measured(*inputs)
        assert pm.measured is not None and pm.measured.peak_bytes <= budget
        # the tied head reads the codes and the lookup exact rows: eager over the
        # weight untied that way computes the same bits; rounding it for both reads,
        # or for neither, does not
        names = {d.name for d in stored}
        with torch.no_grad():
            untied = quant.round_tripped(reference, names, fmt, exact_lookups=names)(*inputs)
            both_rounded = quant.round_tripped(reference, names, fmt)(*inputs)
            neither = reference(*inputs)
        assert torch.equal(out, untied)
        assert not torch.equal(out, both_rounded) and not torch.equal(out, neither)
        quantized = [s for s in pm._state if hasattr(s, "exact_rows")]
        assert len(quantized) == 1 and quantized[0].exact_rows is not None
        exact = quantized[0].exact_rows
        assert is_file_backed(exact)  # in the offload directory, not device memory
        assert torch.equal(exact, reference.model.transformer.wte.weight)
        agreements = []
        for seed in AGREEMENT_SEEDS:
            ids = torch.randint(
                0, 8192, inputs[0].shape, generator=torch.Generator().manual_seed(seed)
            )
            with torch.no_grad():
                expected = reference(ids)
            agreements.append(float((pm(ids).argmax(-1) == expected.argmax(-1)).float().mean()))
        assert sum(agreements) / len(agreements) >= AGREEMENT_FLOOR[fmt], agreements
        with torch.no_grad():
            lossless = reference(*inputs)
        assert out.shape == lossless.shape
        errors = pm.measure_quantization_error(*inputs, reference=lossless)
        report = pm.report
        rows = {row["tensor"]: row for row in report.quantized}
        assert set(rows) == {d.name for d in stored}
        for row in rows.values():
            assert row["format"] == fmt and 0 < row["saved_bytes"] < row["bytes"]
            assert 0 < row["relative_l2"] < (0.02 if fmt == "int8" else 0.2)
        direct = float((out.argmax(-1) == lossless.argmax(-1)).float().mean())
        assert errors["output"]["top1_agreement"] == pytest.approx(direct)
        text = str(report)
        assert "output error:" in text and f"{fmt}, saves" in text
        assert [row["exact_lookups"] for row in rows.values()] == [True]
        assert (
            "lookups:          exact rows, read from its full copy on disk "
            "(other reads, a tied head's: the round trip)"
        ) in text
    finally:
        pm.close()


def test_no_quantization_when_the_budget_does_not_need_it() -> None:
    """Lossy options cost time in the model (every use dequantizes), so a budget
    that lossless placement meets leaves every tensor in full precision."""
    model, inputs = load_example("gpt2")
    budget = int(1.5 * _weight_bytes(model))
    _, plan = planner.make_plan(
        model, budget, example_inputs=inputs, quantize="int8", time_limit=10
    )
    assert not any("quantize" in d.decision for d in plan.tensors)


#: The CPU profile with (de)quantization priced at memory speed, as the Triton
#: kernels run on a GPU. The torch kernels on this CPU are slow enough (about 0.2
#: GB/s) that the solver rightly prefers a lossless plan wherever one fits, now
#: down to ~27% of the CNN's training peak; the training tests below exercise the
#: lossy path itself, so they price it as a GPU would.
FAST_QUANTIZE = dataclasses.replace(
    planner.get_profile("cpu"),
    quantize_bandwidth=planner.get_profile("cpu").memory_bandwidth,
    dequantize_bandwidth=planner.get_profile("cpu").memory_bandwidth,
)


def test_weights_travel_quantized_from_disk() -> None:
    """MLP inference at 20% of its weight bytes, quantizers priced as on a GPU: the
    plan gives some weights a disk home holding their int8 codes (written once at
    plan time, no full copy), reads the codes before each use and feeds them to the
    fused linear. Within budget under the meter, output close to eager's, each such
    weight's error in the report, and the files gone after ``close``."""
    reference, inputs = load_example("mlp")
    model, _ = load_example("mlp")
    budget = int(0.2 * _weight_bytes(model))
    pm = planner.plan(
        model, budget, example_inputs=inputs, quantize="int8", time_limit=10, profile=FAST_QUANTIZE
    )
    root = pm._disk.root
    try:
        validate(pm.problem, pm.plan)
        fetched = [d for d in pm.plan.tensors if d.home == "disk:int8"]
        assert fetched and all(d.decision == "offload:disk+quantize:int8" for d in fetched)
        files = {path.name for path in root.iterdir()}
        for d in fetched:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in d.name)
            assert any(f.startswith(f"{safe}_codes") for f in files), (d.name, files)
            assert not any(f.startswith(f"{safe}-") for f in files)  # no full copy
        code = pm.code
        assert "back, quantized" in code and "rt.fused('aten.linear.default'" in code
        out = pm.run_measured(*inputs)
        assert pm.measured is not None and pm.measured.peak_bytes <= budget
        with torch.no_grad():
            expected = reference(*inputs)
        rel = float((out - expected).norm() / expected.norm())
        assert 0 < rel < 0.02
        pm.measure_quantization_error(*inputs, reference=expected)
        rows = {row["tensor"]: row for row in pm.report.quantized}
        for d in fetched:
            assert 0 < rows[d.name]["relative_l2"] < 0.01 and not rows[d.name]["exact_lookups"]
    finally:
        pm.close()
    assert not root.exists()


def _resnet_lossy_training(fraction: float, quantize: object):  # type: ignore[no-untyped-def]
    """A planned CNN training step at ``fraction`` of its unplanned peak (the
    quantizers priced as on a GPU: ``FAST_QUANTIZE``), with an untouched twin of
    the model as the reference."""
    reference, inputs = load_example("resnet")
    model, _ = load_example("resnet")
    peak = planner.analyze(model, inputs, mode="train", profile="cpu").unplanned_peak_bytes
    budget = int(fraction * peak)
    pm = planner.plan(
        model,
        budget,
        example_inputs=inputs,
        mode="train",
        quantize=quantize,
        time_limit=20,
        profile=FAST_QUANTIZE,
    )
    return pm, model, reference, inputs, budget


def _check_lossy_step(pm, model, reference, inputs, budget: int) -> None:  # type: ignore[no-untyped-def]
    """Lossy storage of saved activations leaves the forward exact (loss equal to
    eager's), keeps every gradient within cosine 0.99 of eager's, and the step
    stays within the budget under the meter."""
    loss = pm(*inputs).pow(2).mean()
    loss.backward()
    expected = reference(*inputs).pow(2).mean()
    expected.backward()
    assert torch.equal(loss, expected), (loss, expected)  # the forward is untouched: exact
    for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        cos = torch.nn.functional.cosine_similarity(
            p.grad.flatten().double(), r.grad.flatten().double(), dim=0
        )
        assert cos >= 0.99, name
    for p in model.parameters():
        p.grad = None
    pm.run_measured_step(*inputs)
    assert pm.measured is not None and pm.measured.peak_bytes <= budget


def test_training_with_int8_saved_activations() -> None:
    """Below where lossless placement plans, int8 storage of saved activations
    fits; the forward is untouched (loss exact) and every gradient stays close."""
    pm, model, reference, inputs, budget = _resnet_lossy_training(0.38, "int8")
    try:
        assert any("quantize:int8" in d.decision for d in pm.plan.tensors)
        assert not any(d.home.startswith("device:") for d in pm.plan.tensors)  # weights: train
        _check_lossy_step(pm, model, reference, inputs, budget)
    finally:
        pm.close()


def test_training_at_30_percent_with_int8_saved_activations() -> None:
    """int8 saved activations at 30% of the CNN's training peak (where a lossless
    plan also fits, now that parameters and gradients can leave the device): some
    saved activations are stored int8, the loss stays within 1% of eager (here:
    equal, only the backward reads them) and every gradient within cosine 0.99,
    under the meter."""
    pm, model, reference, inputs, budget = _resnet_lossy_training(0.30, {"activations": "int8"})
    try:
        validate(pm.problem, pm.plan)
        lossy = [d for d in pm.plan.tensors if "quantize:int8" in d.decision]
        assert lossy and all(d.kind in ("saved-for-backward", "activation") for d in lossy)
        _check_lossy_step(pm, model, reference, inputs, budget)
    finally:
        pm.close()


def test_training_with_int8_transfers() -> None:
    """``{"transfers": "int8"}``: activations may only travel quantized (offload
    and read back int8), never stay quantized on the device; at a budget below the
    lossless plans' reach some do, and gradients stay close."""
    pm, model, reference, inputs, budget = _resnet_lossy_training(0.36, {"transfers": "int8"})
    try:
        validate(pm.problem, pm.plan)
        decisions = {d.decision for d in pm.plan.tensors}
        assert "offload:disk+quantize:int8" in decisions
        assert "quantize:int8" not in decisions  # not kept quantized on the device
        assert "rt.offload(" in pm.code and ", q_" in pm.code  # a Quantized is written
        _check_lossy_step(pm, model, reference, inputs, budget)
    finally:
        pm.close()


def test_the_report_says_what_quantize_allowed_when_nothing_is_quantized() -> None:
    """At a budget the model fits, quantize= is not needed: the report says it was
    allowed and none chosen, and the outputs are the lossless run's, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(8, 64)
    expected = model(x)
    with planner.plan(model, "100%", example_inputs=(x,), quantize="int8") as pm:
        assert torch.equal(pm(x), expected)
        lines = [line for line in str(pm.report).splitlines() if "lossy storage:" in line]
        assert lines == [
            "lossy storage:      int8 allowed (activations, transfers, weights); "
            "none chosen: the plan fits without it (lossless)"
        ]
        assert pm.report.to_dict()["lossy_allowed"]["format"] == "int8"
