"""The predicted unplanned peak agrees with the independent meter (within 10%)
for every example in both modes, and analysis of GPT-2's training graph is fast."""

from __future__ import annotations

import time

import pytest
from conftest import load_example

import planner

EXAMPLES = ["mlp", "resnet", "unet", "gpt2", "llama"]


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_predicted_peak_within_10_percent_of_meter(name: str, mode: str) -> None:
    model, inputs = load_example(name)
    analysis = planner.analyze(model, inputs, mode=mode, profile="cpu")
    measured = planner.measure_unplanned(analysis, model, inputs)
    predicted = analysis.unplanned_peak_bytes
    ratio = predicted / measured.peak_bytes
    assert 0.9 <= ratio <= 1.1, (
        f"{name}/{mode}: predicted {predicted} vs measured {measured.peak_bytes} ({ratio:.3f})"
    )


def test_gpt2_training_analysis_under_10_seconds() -> None:
    model, inputs = load_example("gpt2")
    start = time.perf_counter()
    analysis = planner.analyze(model, inputs, mode="train", profile="cpu")
    seconds = time.perf_counter() - start
    assert analysis.program.num_steps > 300
    assert seconds < 10, f"capture + passes took {seconds:.1f}s"
