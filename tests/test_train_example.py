"""examples/train_gpt2.py: an AdamW loop on the planned GPT-2 training step.

Two steps at a tight budget (below the smallest feasible one, so the example's
BudgetTooSmall fallback runs too), against the same loop run eagerly from the same
seed: each step's loss must match eager's, be finite, and go down; the metered peak
of a step must stay within the budget the example planned at."""

from __future__ import annotations

import importlib.util
import math
import sys

from conftest import EXAMPLES


def _load_train_example():
    spec = importlib.util.spec_from_file_location("train_gpt2", EXAMPLES / "train_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt2"] = module
    spec.loader.exec_module(module)
    return module


def test_planned_training_loop_matches_eager() -> None:
    main = _load_train_example().main
    # batch 4 keeps the test short; 10% is below GPT-2's smallest feasible budget
    result = main(
        ["--steps", "2", "--budget", "10%", "--batch", "4", "--time-limit", "5", "--quiet"]
    )
    planned, eager = result["planned"], result["eager"]
    assert result["budget_too_small"], "10% was feasible: the fallback path went untested"
    assert result["budget_bytes"] < result["unplanned_peak_bytes"]
    assert len(planned["losses"]) == len(eager["losses"]) == 2
    assert all(math.isfinite(x) for x in planned["losses"])
    # bit for bit, as the --last-batch test below and the README promise
    assert planned["losses"] == eager["losses"], (planned["losses"], eager["losses"])
    assert planned["losses"][1] < planned["losses"][0]
    assert planned["peak_bytes"] <= result["budget_bytes"], (
        f"measured {planned['peak_bytes']} > budget {result['budget_bytes']}"
    )


def test_a_last_smaller_batch_trains_through_its_own_plan() -> None:
    """--last-batch: steps alternate a batch of 4 and one of 2 sequences, both
    shapes planned in one call; losses match the eager loop's on both and each
    shape's first step is metered within the budget."""
    main = _load_train_example().main
    result = main(
        ["--steps", "4", "--budget", "40%", "--batch", "4", "--last-batch", "2",
         "--time-limit", "5", "--quiet"]
    )  # fmt: skip
    planned, eager = result["planned"], result["eager"]
    assert not result["budget_too_small"]
    assert len(planned["losses"]) == len(eager["losses"]) == 4
    assert planned["losses"] == eager["losses"], (planned["losses"], eager["losses"])
    assert planned["peak_bytes"] <= result["budget_bytes"]
