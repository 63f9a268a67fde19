"""Parse a memory budget: bytes, a size string, or a share of the unplanned peak;
or ``"min"``, the smallest budget a plan is found for (``is_smallest``)."""

from __future__ import annotations

import math
import numbers
import re

from planner.errors import PlannerValueError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


#: the budget that asks for the smallest a plan is found for: planned in one
#: capture, where catching BudgetTooSmall and planning again at its ``min_budget``
#: traces the model twice (capture is 50-84% of planning time)
SMALLEST = "min"


def is_smallest(budget: object) -> bool:
    """Whether ``budget`` is ``"min"`` (any case, spaces around)."""
    return isinstance(budget, str) and budget.strip().lower() == SMALLEST


def parse_budget(budget: int | float | str, unplanned_peak: int | None = None) -> int:
    """Bytes for ``budget``: an int (bytes), ``"512MiB"``/``"2GB"`` (SI and binary
    units), or ``"60%"`` of ``unplanned_peak``. Raises ValueError saying what is
    accepted for anything else, and for zero or negative budgets."""
    if isinstance(budget, bool):
        raise PlannerValueError(_help(budget))
    if is_smallest(budget):  # no number of bytes: planner.plan finds it
        raise PlannerValueError(
            "budget 'min' is the smallest budget a plan is found for, which planning finds: "
            "pass it to planner.plan, or give bytes here"
        )
    if isinstance(budget, numbers.Real):  # numpy's integers and floats too
        value = float(budget)
    elif isinstance(budget, str):
        percent = _PERCENT.match(budget)
        size = _SIZE.match(budget)
        if percent:
            if unplanned_peak is None:
                raise PlannerValueError(
                    f"budget {budget!r} is a share of the unplanned peak, "
                    "which is not known here; give bytes instead"
                )
            share = float(percent.group(1))
            if share <= 0:
                raise PlannerValueError(
                    f"budget {budget!r} must be a positive percentage, such as '60%'"
                )
            nbytes = int(unplanned_peak * share / 100)
            if nbytes < 1:  # planned for 0 bytes, it failed as "budget 0 bytes"
                raise PlannerValueError(
                    f"budget {budget!r} of the unplanned peak ({unplanned_peak:,} bytes) "
                    f"is less than one byte: give a larger share"
                )
            return nbytes
        if not size or size.group(2).lower() not in _UNITS:
            raise PlannerValueError(_help(budget))
        value = float(size.group(1)) * _UNITS[size.group(2).lower()]
    else:
        raise PlannerValueError(_help(budget))
    if value != value:  # NaN: "must be positive" said nothing of what it is
        raise PlannerValueError(
            f"budget {budget!r} is not a number: give bytes (an int), a size such as "
            f"'512MiB', or a share of the unplanned peak such as '60%'"
        )
    if not value > 0:
        raise PlannerValueError(
            f"budget must be positive, got {budget!r}: give bytes (an int), a size such as "
            f"'512MiB', or a share of the unplanned peak such as '60%'"
        )
    if math.isinf(value):  # "1e400", float("inf"): int() of it overflows
        raise PlannerValueError(f"budget {budget!r} is not a finite number of bytes")
    if value < 1:  # planned for 0 bytes, it failed as too small
        raise PlannerValueError(
            f"budget {budget!r} is less than one byte; for a share of the unplanned peak "
            f"give a percentage such as '{value * 100:g}%'"
        )
    return int(value)


def _help(budget: object) -> str:
    return (
        f"cannot read budget {budget!r}: give bytes (an int), a size such as "
        f"'512MiB' or '2GB', a share of the unplanned peak such as '60%', or 'min' (the "
        f"smallest budget a plan is found for)"
    )
