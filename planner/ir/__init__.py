"""Capture a model and represent it as the planner IR."""

from planner.ir.build import build_program
from planner.ir.capture import CapturedGraph, capture
from planner.ir.program import Op, Phase, Program, Storage, Value, ValueKind

__all__ = [
    "CapturedGraph",
    "Op",
    "Phase",
    "Program",
    "Storage",
    "Value",
    "ValueKind",
    "build_program",
    "capture",
]
