from __future__ import annotations

import numpy as np
import pytest

from planner.budget import parse_budget


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (1024, 1024),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("100", 100),
        ("60%", 600),
        (" 25 % ", 250),
        (np.int64(4096), 4096),  # a size computed with numpy
        (np.float32(2048.0), 2048),
    ],
)
def test_parse(spec: object, expected: int) -> None:
    assert parse_budget(spec, unplanned_peak=1000) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        "lots",
        "12 parsecs",
        "",
        "-5MB",
        -1,
        0,
        "0%",
        True,
        None,
        "-3%",
        "1e400",
        "1e400MiB",
        float("inf"),
    ],
)
def test_rejects_bad_budgets(spec: object) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(spec, unplanned_peak=1000)  # type: ignore[arg-type]


def test_percent_needs_a_peak() -> None:
    with pytest.raises(ValueError, match="unplanned peak"):
        parse_budget("50%")


def test_a_fraction_is_not_taken_for_bytes() -> None:
    """0.5 meant half: it was planned as a budget of 0 bytes, which failed as too small."""
    with pytest.raises(ValueError, match=r"less than one byte.*'50%'"):
        parse_budget(0.5, unplanned_peak=1000)
    assert parse_budget(1.5e9) == 1_500_000_000  # a computed byte count stays bytes


def test_a_share_of_less_than_one_byte_is_refused() -> None:
    """'0.00001%' of a megabyte was planned as a budget of 0 bytes, which failed as
    too small, where '0%' was refused as a bad budget."""
    with pytest.raises(ValueError, match=r"less than one byte: give a larger share"):
        parse_budget("0.00001%", unplanned_peak=1_000_000)
    assert parse_budget("0.0001%", unplanned_peak=1_000_000) == 1


def _mlp_and_batch():  # noqa: ANN202
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    return model, torch.randn(32, 64)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_min_plans_at_the_smallest_budget_in_one_capture(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """budget="min" is BudgetTooSmall's min_budget, planned without tracing the
    model again (catching the error and planning at min_budget captures twice),
    and the meter holds it."""
    import copy

    import torch

    import planner
    import planner.api as api

    model, x = _mlp_and_batch()
    with pytest.raises(planner.BudgetTooSmall) as info:
        planner.plan(copy.deepcopy(model), 1, example_inputs=(x,), mode=mode)
    captures = []
    original = api.capture

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        captures.append(1)
        return original(*args, **kwargs)

    unplanned = planner.analyze(model, (x,), mode).unplanned_peak_bytes
    monkeypatch.setattr(api, "capture", counted)
    expected = model(x)
    with planner.plan(model, " MIN ", example_inputs=(x,), mode=mode) as pm:
        assert captures == [1]
        assert pm.plan.budget_bytes == info.value.min_budget < unplanned
        out = pm.run_measured(x)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        assert torch.equal(out, expected)


def test_min_with_several_shapes_is_the_largest_of_their_smallest() -> None:
    import copy

    import planner

    model, x = _mlp_and_batch()
    smallest = []
    for batch in (x, x[:8]):
        with pytest.raises(planner.BudgetTooSmall) as info:
            planner.plan(copy.deepcopy(model), 1, example_inputs=(batch,))
        smallest.append(info.value.min_budget)
    with planner.plan(model, "min", (x,), extra_example_inputs=[(x[:8],)]) as pm:
        assert pm.plan.budget_bytes == max(smallest)
        assert pm.other_shapes[0].plan.budget_bytes == max(smallest)


def test_min_with_a_saved_plan_is_refused() -> None:
    import planner

    model, x = _mlp_and_batch()
    with planner.plan(model, "100%", (x,)) as pm:
        saved = pm.plan
    with pytest.raises(planner.PlannerError, match=r"budget='min'.*saved plan's budget"):
        planner.plan(_mlp_and_batch()[0], "min", (x,), plan=saved)


def test_min_with_a_saved_plan_to_reuse_is_refused_by_make_plan_too() -> None:
    """make_plan(..., "min", reuse=saved) solved anew and returned another plan,
    the saved one silently ignored (plan(..., plan=saved) refused it)."""
    import planner

    model, x = _mlp_and_batch()
    _, saved = planner.make_plan(model, "100%", (x,), time_limit=1)
    with pytest.raises(planner.PlannerError, match=r"budget='min' .* with reuse= give"):
        planner.make_plan(model, "min", (x,), reuse=saved, time_limit=1)


def test_parse_budget_says_min_is_for_planning() -> None:
    """parse_budget("min") said 'cannot read', then listed 'min' as a budget."""
    with pytest.raises(ValueError, match="budget 'min' is the smallest .* pass it to planner.plan"):
        parse_budget("min", unplanned_peak=1000)
