"""Memory timeline: bytes resident at every step of unplanned execution.

Requires: lifetimes. The figure at step ``t`` counts every storage whose live
interval contains ``t``: the op's inputs, its outputs, and everything held for
later steps. The op running at ``t`` adds its measured workspace (see ``workspace``).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.ir.program import Program, ValueKind


@dataclass(frozen=True)
class MemoryTimeline:
    """Resident bytes per step and where the peak is."""

    resident_bytes: list[int]
    peak_bytes: int
    peak_step: int
    peak_by_kind: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_step": self.peak_step,
            "peak_by_kind": dict(self.peak_by_kind),
            "resident_bytes": list(self.resident_bytes),
        }


def memory_timeline(program: Program) -> MemoryTimeline:
    steps = max(program.num_steps, 1)
    delta = [0] * (steps + 1)
    for storage in program.storages:
        if storage.live is None:
            raise ValueError("memory_timeline requires annotate_lifetimes to run first")
        start, end = storage.live
        delta[start] += storage.nbytes
        delta[end + 1] -= storage.nbytes
    resident, running = [], 0
    for t in range(steps):
        running += delta[t]
        workspace = program.ops[t].workspace_bytes if t < program.num_steps else 0
        resident.append(running + workspace)
    peak_step = max(range(steps), key=resident.__getitem__)
    by_kind: dict[str, int] = {k.value: 0 for k in ValueKind}
    for storage in program.storages:
        start, end = storage.live  # type: ignore[misc]
        if start <= peak_step <= end:
            by_kind[program.storage_kind(storage).value] += storage.nbytes
    if program.num_steps and program.ops[peak_step].workspace_bytes:
        by_kind["workspace"] = program.ops[peak_step].workspace_bytes
    return MemoryTimeline(
        resident_bytes=resident,
        peak_bytes=resident[peak_step],
        peak_step=peak_step,
        peak_by_kind={k: b for k, b in by_kind.items() if b},
    )
