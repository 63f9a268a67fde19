"""planner: a compiler-style graph optimizer and memory planner for PyTorch.

See README.md. The stages: ``planner.ir`` (capture, IR) -> ``planner.passes``
(lifetimes, costs, memory timeline) -> ``planner.solver`` -> ``planner.codegen``
-> ``planner.runtime``.
"""

from planner.api import analyze, measure_unplanned, report
from planner.budget import parse_budget
from planner.errors import BudgetTooSmall, CaptureError, InvalidPlan, PlannerError
from planner.passes.device_profile import DeviceProfile, get_profile
from planner.report import Report

__version__ = "0.1.0"

__all__ = [
    "BudgetTooSmall",
    "CaptureError",
    "DeviceProfile",
    "InvalidPlan",
    "PlannerError",
    "Report",
    "analyze",
    "get_profile",
    "measure_unplanned",
    "parse_budget",
    "report",
]
