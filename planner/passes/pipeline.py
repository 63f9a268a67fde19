"""The analysis pipeline: one straight list of passes, each with its reason."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from planner.ir.build import build_program
from planner.ir.capture import CapturedGraph
from planner.ir.program import Program
from planner.passes.costs import annotate_costs
from planner.passes.device_profile import DeviceProfile
from planner.passes.lifetimes import annotate_lifetimes
from planner.passes.timeline import MemoryTimeline, memory_timeline
from planner.passes.timing import annotate_measured_seconds
from planner.passes.workspace import annotate_workspace

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Everything known about a captured program before planning."""

    captured: CapturedGraph
    program: Program
    profile: DeviceProfile
    timeline: MemoryTimeline
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def unplanned_peak_bytes(self) -> int:
        return self.timeline.peak_bytes

    @property
    def estimated_seconds(self) -> float:
        return sum(op.cost.seconds for op in self.program.ops)


def analyze(
    captured: CapturedGraph,
    profile: DeviceProfile,
    measure_workspace: bool | None = None,
    measure_time: bool | None = None,
) -> Analysis:
    """Run every pass. ``measure_workspace`` defaults to on when the profile
    describes this machine's kind of device (a workspace measured on the CPU says
    nothing about a GPU's); ``measure_time`` when the profile was calibrated here."""
    local = profile.device_type == _local_device_type()
    if measure_workspace is None:
        measure_workspace = local
    if measure_time is None:
        measure_time = local and profile.name.startswith("calibrated")
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - start
        log.debug("pass %s: %.3fs", name, timings[name])
        return out

    # FX -> IR: ops in schedule order, values, storages (views share their base's).
    program = timed("build_program", build_program, captured)
    # When each storage is resident if nothing is planned.
    timed("lifetimes", annotate_lifetimes, program)
    # Op wall times on this machine, when the profile describes it.
    if measure_time:
        timed(
            "timing", annotate_measured_seconds, program, captured.graph_module, profile.device_type
        )
    # FLOPs, bytes and seconds per op on the target device.
    timed("costs", annotate_costs, program, captured.graph_module, profile)
    # Scratch memory each op allocates beyond its outputs, measured on this device.
    if measure_workspace:
        timed("workspace", annotate_workspace, program, captured.graph_module, profile.device_type)
    # Resident bytes per step; the unplanned peak.
    timeline = timed("timeline", memory_timeline, program)
    return Analysis(captured, program, profile, timeline, timings)


def _local_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
