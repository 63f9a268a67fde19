"""planner: a compiler-style graph optimizer and memory planner for PyTorch.

See README.md. The stages: ``planner.ir`` (capture, IR) -> ``planner.passes``
(lifetimes, costs, memory timeline) -> ``planner.solver`` -> ``planner.codegen``
-> ``planner.runtime``.
"""

from planner.api import analyze, make_plan, measure_unplanned, plan, report
from planner.budget import parse_budget
from planner.errors import BudgetTooSmall, CaptureError, InvalidPlan, PlannerError, PlannerWarning
from planner.passes.device_profile import DeviceProfile, get_profile
from planner.planned_module import PlannedModule
from planner.report import Report
from planner.runtime.checkpoint import attach_checkpoint
from planner.runtime.linked import LinkedFileChanged
from planner.runtime.store import StoreError
from planner.solver.plan import Plan

__version__ = "0.1.0"

__all__ = [
    "BudgetTooSmall",
    "CaptureError",
    "DeviceProfile",
    "InvalidPlan",
    "LinkedFileChanged",
    "Plan",
    "PlannedModule",
    "PlannerError",
    "PlannerWarning",
    "Report",
    "StoreError",
    "analyze",
    "attach_checkpoint",
    "get_profile",
    "make_plan",
    "plan",
    "measure_unplanned",
    "parse_budget",
    "report",
]
