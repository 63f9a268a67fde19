"""Errors the planner raises. Each says what went wrong and what to do about it."""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every error planner raises on purpose."""


class CaptureError(PlannerError):
    """The model could not be traced into a single graph.

    The message names the offending op or source line and suggests a fix.
    """


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
