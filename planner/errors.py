"""Errors the planner raises. Each says what went wrong and what to do about it."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised where this is called at the
    first frame outside the planner package: the user's ``planner.plan(...)`` or
    ``planner.analyze(...)`` line, however deep inside the warning is raised."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def listed(names: list[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` names, and how many more: what a message names when
    many things are at fault (a model's hundred parameters)."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return sep.join(names[:limit]) + more


def first_line(exc: BaseException) -> str:
    """``Type: the message's first line`` (at most 200 characters): an error met
    while trying something optional (a compiled run, a layout rewrite), said in
    one line of a log or a report."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}"


class PlannerWarning(UserWarning):
    """What the planner warns about (a model planned in training mode for
    inference, hooks a planned call does not run, memory held outside the plan):
    its own category, so ``planner report`` shows these and hides libraries'
    warnings, and a caller can filter them (``warnings.simplefilter("error",
    planner.PlannerWarning)``)."""


class PlannerError(Exception):
    """Base class of every error planner raises on purpose."""


class PlannerValueError(PlannerError, ValueError):
    """A bad argument value (a budget, mode, quantize=, time_limit=, kernels=,
    profile=): a PlannerError, so ``except planner.PlannerError`` catches every
    error of a bad input, and a ValueError as it always was."""


class PlannerTypeError(PlannerError, TypeError):
    """An argument of the wrong kind (example inputs that are no tensors, a model
    that is no nn.Module): a PlannerError, and a TypeError as it always was."""


class CaptureError(PlannerError):
    """The model could not be traced into a single graph.

    The message names the offending op or source line and suggests a fix.
    """

    #: torch.export's graph traced before the failure, where it made one (it used
    #: to print it to stderr: a thousand lines for a Longformer)
    partial_graph: str | None = None


class BudgetTooSmall(PlannerError):
    """No plan fits the budget.

    ``min_budget`` is the smallest budget (bytes) for which a plan was found to
    exist, so a caller can retry with it.
    """

    def __init__(self, message: str, min_budget: int | None = None) -> None:
        super().__init__(message)
        self.min_budget = min_budget


class InvalidPlan(PlannerError):
    """A plan failed independent validation (reads a value that is not resident,
    exceeds its budget, or does not match the graph it is applied to)."""
