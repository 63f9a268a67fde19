"""Analyses that annotate the planner IR, one concern per pass."""

from planner.passes.costs import annotate_costs
from planner.passes.device_profile import DeviceProfile, get_profile
from planner.passes.lifetimes import annotate_lifetimes
from planner.passes.pipeline import Analysis, analyze
from planner.passes.timeline import MemoryTimeline, memory_timeline

__all__ = [
    "Analysis",
    "DeviceProfile",
    "MemoryTimeline",
    "analyze",
    "annotate_costs",
    "annotate_lifetimes",
    "get_profile",
    "memory_timeline",
]
