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
