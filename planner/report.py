"""The placement report: one row per tensor storage plus a summary.

``str(report)`` is a table for people; ``report.to_dict()`` is the JSON of
DESIGN.md for programs. Before a budget is planned every decision is ``keep`` and
the planned figures equal the unplanned ones.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planner.ir.meta import BUFFER_UPDATES, FROZEN_PARAMS, PARAM_GRADS
from planner.ir.program import Program, ValueKind
from planner.passes.pipeline import Analysis
from planner.solver.plan import Plan


def format_bytes(n: int | float | None) -> str:
    """``1536`` -> ``'1.5 KiB'``: binary units, as budgets are usually given."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        if unit == "PiB":  # beyond any device: no wall of digits
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class TensorRow:
    name: str
    bytes: int
    kind: str
    live: tuple[int, int]
    producer: str | None
    shape: tuple[int, ...]
    dtype: str
    decision: str = "keep"
    home: str = "device"
    aliases: list[str] = field(default_factory=list)
    #: training: a parameter that did not require grad when planned (it does not
    #: train, so a lossy plan may store it quantized)
    frozen: bool = False
    #: a buffer each call updates (a key/value cache, BatchNorm statistics in
    #: training): it stays on the device
    updated: bool = False
    #: training: the parameter whose gradient this storage holds (its name
    #: otherwise is the op's, ``mm_3``, which does not say whose); several, comma
    #: separated, where one storage holds the gradients of more than one
    grad_of: str | None = None
    #: the other names of a weight tied under several (GPT-2's embedding and head
    #: share one storage): listed in this row, which is named by the first
    tied: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What the planner knows and decided about one model."""

    mode: str
    num_ops: int
    budget_bytes: int | None
    unplanned_peak_bytes: int
    unplanned_peak_step: int
    planned_peak_bytes: int
    estimated_seconds: float
    unplanned_estimated_seconds: float
    solver: dict[str, Any]
    tensors: list[TensorRow]
    profile: str
    peak_by_kind: dict[str, int]
    peak_op: str | None = None
    measured: dict[str, Any] | None = None
    baselines: dict[str, Any] = field(default_factory=dict)
    #: per tensor stored or moved quantized: format, bytes, bytes saved while
    #: quantized, and the round-trip error measured on the example (when known)
    quantized: list[dict[str, Any]] = field(default_factory=list)
    #: lossy outputs against the lossless run (relative_l2, max_abs, top1_agreement)
    output_error: dict[str, float] | None = None
    #: what ``quantize=`` allowed (format, and the uses: weights, activations,
    #: transfers, gradients), None when lossless; said even when the plan
    #: quantizes nothing, so a user sees the option was taken and not needed
    lossy_allowed: dict[str, Any] | None = None
    #: which rates disk copies were priced at, and why (``DeviceProfile.disk_rates``)
    disk_rates: str | None = None
    #: kernels="inductor": runs of ops compiled, left eager (and why), ops in each
    kernels: dict[str, Any] | None = None
    #: kernels="inductor": the peak with runs compiled (``Plan.compiled_peak_bytes``),
    #: and the budget the schedule was solved for op by op if above the budget
    compiled_peak_bytes: int | None = None
    op_level_budget_bytes: int | None = None
    #: a module planned for several input shapes: the inputs (shape, dtype) of
    #: the plan this report shows, and a summary of each other shape's plan
    #: (``PlannedModule.other_shapes``: their own reports have their tensors)
    inputs: list[Any] | None = None
    other_shapes: list[dict[str, Any]] = field(default_factory=list)
    #: weights read from their checkpoint where they lie, not copied into the
    #: offload store (``DiskStore.link``): how many, their bytes, the files
    read_in_place: dict[str, Any] | None = None

    @classmethod
    def from_analysis(cls, analysis: Analysis) -> Report:
        program = analysis.program
        timeline = analysis.timeline
        peak_op = None
        if program.ops:
            op = program.ops[timeline.peak_step]
            peak_op = f"{op.name} ({op.target})" + (f" at {op.stack}" if op.stack else "")
        return cls(
            mode=program.mode,
            num_ops=program.num_steps,
            budget_bytes=None,
            unplanned_peak_bytes=timeline.peak_bytes,
            unplanned_peak_step=timeline.peak_step,
            planned_peak_bytes=timeline.peak_bytes,
            estimated_seconds=analysis.estimated_seconds,
            unplanned_estimated_seconds=analysis.estimated_seconds,
            solver={
                "name": None,
                "status": "not run (no budget)",
                "seconds": 0.0,
                "objective": None,
                "bound": None,
            },
            tensors=tensor_rows(program),
            profile=analysis.profile.name,
            peak_by_kind=dict(timeline.peak_by_kind),
            peak_op=peak_op,
        )

    @classmethod
    def from_plan(cls, analysis: Analysis, plan: Plan) -> Report:
        """The report of a solved plan: decisions per tensor, predicted figures."""
        from planner.solver.translate import storage_names

        report = cls.from_analysis(analysis)
        decisions = {d.name: d for d in plan.tensors}
        # a row per storage, in order; the plan names a storage as translate does
        # (a gradient "grad of <parameter>", where its row shows its op's name):
        # matched by row name, every gradient read as kept, delivered or not
        names = storage_names(analysis.program)
        plan_names = [names[s.index] for s in analysis.program.storages]
        for row, plan_name in zip(report.tensors, plan_names):
            decision = decisions.get(plan_name)
            if decision is not None:
                row.decision = decision.decision
                row.home = decision.home
        report.budget_bytes = plan.budget_bytes
        report.planned_peak_bytes = plan.predicted_peak_bytes
        report.compiled_peak_bytes = plan.compiled_peak_bytes
        report.op_level_budget_bytes = plan.op_level_budget_bytes
        report.estimated_seconds = plan.estimated_seconds
        report.unplanned_estimated_seconds = plan.unplanned_estimated_seconds
        report.solver = {
            "name": plan.solver.name,
            "status": plan.solver.status,
            "seconds": plan.solver.seconds,
            "objective": plan.solver.objective,
            "bound": plan.solver.bound,
            "gap": plan.solver.gap,
        }
        report.baselines = dict(plan.baselines)
        report.quantized = quantized_rows(plan, report.tensors, plan_names)
        return report

    def add_quantization_errors(
        self, errors: dict[str, dict[str, float]], output: dict[str, float] | None
    ) -> None:
        for row in self.quantized:
            row.update(errors.get(row["tensor"], {}))
        self.output_error = output

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["tensors"]:
            row["live"] = list(row["live"])
            row["shape"] = list(row["shape"])
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return render_text(self)


def quantized_rows(
    plan: Plan, tensors: list[TensorRow], plan_names: list[str]
) -> list[dict[str, Any]]:
    """One row per tensor the plan quantizes (stored quantized, or quantized in
    some gap between uses), with the bytes it saves while quantized.
    ``plan_names``: each row's name in the plan (``storage_names``)."""
    from planner.solver.problem import QUANT_BITS, quantized_bytes
    from planner.solver.validate import ITEMSIZE

    named = list(zip(plan_names, tensors))
    dtypes = {name: row.dtype for name, row in named}
    last_dims = {name: (row.shape[-1] if row.shape else 1) for name, row in named}
    rows = []
    for d in plan.tensors:
        formats = [p.split(":", 1)[1] for p in d.decision.split("+") if p.startswith("quantize:")]
        if not formats or formats[0] not in QUANT_BITS:
            continue
        fmt = formats[0]
        size = ITEMSIZE.get(dtypes.get(d.name, "float32").removeprefix("torch."), 4)
        q = quantized_bytes(d.nbytes, size, fmt, last_dims.get(d.name))
        rows.append(
            {
                "tensor": d.name,
                "kind": d.kind,
                "format": fmt,
                "bytes": d.nbytes,
                "saved_bytes": d.nbytes - q,
            }
        )
    return rows


def tensor_rows(program: Program) -> list[TensorRow]:
    """One row per storage (a view adds no bytes: it is listed as an alias)."""
    frozen = program.meta.get(FROZEN_PARAMS, frozenset())
    updated = set(program.meta.get(BUFFER_UPDATES, ()))
    # a storage may hold several parameters' gradients (views of one buffer: the
    # gradient of torch.cat([a, b]) split in two): each is named, not the last
    grads: dict[int, list[str]] = {}
    for v, fqn in program.meta.get(PARAM_GRADS, {}).items():
        grads.setdefault(program.values[v].storage, []).append(fqn)
    grad_of = {s: ", ".join(names) for s, names in grads.items()}
    rows = []
    for storage in program.storages:
        base = program.values[storage.base]
        producer = None
        if base.producer is not None:
            op = program.ops[base.producer]
            producer = f"{op.name} ({op.target})"
        rows.append(
            TensorRow(
                name=base.source or base.name,
                bytes=storage.nbytes,
                kind=base.kind.value,
                live=storage.live or (0, 0),
                producer=producer,
                shape=base.shape,
                dtype=base.dtype,
                aliases=[program.values[v].name for v in storage.values[1:]],
                frozen=base.kind is ValueKind.PARAM and base.source in frozen,
                updated=base.kind is ValueKind.BUFFER and base.source in updated,
                grad_of=grad_of.get(storage.index),
                tied=[
                    source
                    for v in storage.values[1:]
                    if (source := program.values[v].source) and source != base.source
                ],
            )
        )
    return rows


def _kind_label(row: TensorRow) -> str:
    if row.frozen:
        return f"{row.kind} (frozen)"
    if row.updated:
        return f"{row.kind} (updated)"
    return row.kind


#: tensor names up to this long are never broken across lines in the text table
NAME_WIDTH = 60
#: the least the producer column is given beside them
PRODUCER_WIDTH = 10


def render_text(report: Report, width: int = 140) -> str:
    """Rich table and summary, rendered to plain text (no colour codes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"planner report ({report.mode}, {report.num_ops} ops)", title_justify="left"
    )
    # a tensor's name is what users search for and paste: whole on one line up to
    # NAME_WIDTH characters (longer ones fold), the producer column folds instead;
    # as far as the width allows with every other column whole and the producer's
    # at least PRODUCER_WIDTH (rich crops what does not fit: a 53-character name
    # beside "offload:disk:late+quantize:int4" left no producer column at all)
    cells = [
        (
            row.name,
            format_bytes(row.bytes),
            _kind_label(row),
            f"{row.live[0]}..{row.live[1]}",
            row.decision,
            (row.producer or "-")
            + (f"; grad of {row.grad_of}" if row.grad_of else "")
            + (f"; tied: {', '.join(row.tied)}" if row.tied else ""),
        )
        for row in report.tensors
    ]
    columns = ("tensor", "bytes", "kind", "live", "decision", "producer")
    whole = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    overhead = 3 * len(columns) + 1  # each column's padding and left border, the right one
    widths: list[int | None] = [None] * len(columns)  # None: rich's (all fit)
    if overhead + sum(whole) > width:
        room = width - overhead - sum(whole[1:5]) - PRODUCER_WIDTH
        if room >= len("tensor"):  # else every column folds, as rich chooses
            name_width = min(whole[0], NAME_WIDTH, room)
            widths[0] = name_width
            widths[5] = width - overhead - sum(whole[1:5]) - name_width
            widths[1:5] = whole[1:5]
    for i, (column, justify) in enumerate(
        zip(columns, ("left", "right", "left", "right", "left", "left"))
    ):
        table.add_column(
            column,
            justify=justify,  # type: ignore[arg-type]
            overflow="fold",
            width=widths[i],
        )
    for row_cells in cells:
        table.add_row(*row_cells)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(table)
    for line in summary_lines(report):  # not wrapped: "grad 136 B" stays one item
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return buffer.getvalue()


def _solver_line(solver: dict[str, Any]) -> str:
    name = solver.get("name") or "-"
    status = solver.get("status")
    solver_name, _, kept = name.partition(" (kept baseline ")
    if kept and status not in ("OPTIMAL", "FEASIBLE"):
        # the solver found nothing (its model is stricter than the validator): the
        # plan is the baseline's, which fits; "cp-sat (kept baseline greedy)
        # INFEASIBLE" read as if the plan did not
        line = f"solver:             {solver_name} found no plan ({status}"
        if solver.get("seconds"):
            line += f" in {solver['seconds']:.1f} s"
        return line + f"); the plan is baseline {kept.rstrip(')')}'s, validated within the budget"
    line = f"solver:             {name} {status}"
    if solver.get("seconds"):
        line += f" in {solver['seconds']:.1f} s"
    if solver.get("objective") is not None and solver.get("bound") is not None:
        # the objective is the solver's own cost model, not the replayed schedule
        # the estimated time shows: the two differ (37 ms "added" to an estimate
        # only 27 ms above the unplanned one)
        line += (
            f", objective {solver['objective'] * 1e3:.3f} ms "
            f"(its cost model, not the estimated time above), "
            f"bound {solver['bound'] * 1e3:.3f} ms"
        )
        if solver.get("gap") is not None:
            line += f", gap {solver['gap'] * 100:.1f}%"
    return line


def _planned_peak_line(report: Report) -> str:
    line = f"planned peak:       {format_bytes(report.planned_peak_bytes)}"
    if report.compiled_peak_bytes is None:
        return line
    line = (
        f"planned peak:       {format_bytes(report.compiled_peak_bytes)} with runs compiled "
        f"({format_bytes(report.planned_peak_bytes)} op by op"
    )
    if report.op_level_budget_bytes:
        line += f"; schedule solved for {format_bytes(report.op_level_budget_bytes)}: measured room"
    return line + ")"


def _other_shapes_lines(report: Report) -> list[str]:
    """A module planned for several input shapes: which one this report shows and
    each other's plan in a line."""
    if not report.other_shapes:
        return []
    lines = [
        f"input shape 0:      {_inputs_text(report.inputs)} (the plan above)",
        "other input shapes: each its own plan, the weights homed alike "
        "(pm.other_shapes[k - 1].report: its tensors)",
    ]
    for shape in report.other_shapes:
        line = (
            f"  shape {shape['shape']}: {_inputs_text(shape['inputs'])}: planned peak "
            f"{format_bytes(shape['planned_peak_bytes'])}, estimated "
            f"{shape['estimated_seconds'] * 1e3:.2f} ms, solver {shape['solver_status']}"
        )
        if shape.get("measured_peak_bytes") is not None:
            line += f", measured peak {format_bytes(shape['measured_peak_bytes'])}"
        lines.append(line)
    return lines


def _decision_totals(rows: list[TensorRow]) -> str:
    """``keep 29 tensors (3.2 MiB), offload:disk 7 (7.0 MiB)``: per decision, in
    the order first met, how many tensors and their bytes."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        count = totals.setdefault(row.decision, [0, 0])
        count[0] += 1
        count[1] += row.bytes
    return ", ".join(
        f"{d} {n}{' tensors' if i == 0 else ''} ({format_bytes(b)})"
        for i, (d, (n, b)) in enumerate(totals.items())
    )


def _inputs_text(inputs: list[Any] | None) -> str:
    if not inputs:
        return "-"
    return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in inputs)


def _lossy_line(report: Report) -> str:
    """What quantize= allowed, and how much of it the plan took: "none" means the
    plan is lossless, computing what it would without quantize=."""
    allowed = report.lossy_allowed or {}
    uses = ", ".join(allowed.get("uses", ()))
    head = f"lossy storage:      {allowed.get('format')} allowed" + (f" ({uses})" if uses else "")
    if not report.quantized:
        return head + "; none chosen: the plan fits without it (lossless)"
    n = len(report.quantized)
    return head + f"; {n} tensor{'s' if n != 1 else ''} quantized (below)"


def summary_lines(report: Report) -> list[str]:
    kinds = ", ".join(f"{k} {format_bytes(b)}" for k, b in report.peak_by_kind.items())
    budget = format_bytes(report.budget_bytes) if report.budget_bytes else "none"
    lines = [
        f"budget:             {budget}",
        f"unplanned peak:     {format_bytes(report.unplanned_peak_bytes)} at step "
        f"{report.unplanned_peak_step}" + (f": {report.peak_op}" if report.peak_op else ""),
        f"  resident then:    {kinds}",
        _planned_peak_line(report),
        f"estimated time:     {report.estimated_seconds * 1e3:.2f} ms "
        f"(unplanned {report.unplanned_estimated_seconds * 1e3:.2f} ms, profile {report.profile})",
        _solver_line(report.solver),
    ]
    if report.budget_bytes:  # what moved, at a glance: hundreds of rows above
        lines.append("decisions:          " + _decision_totals(report.tensors))
    if report.disk_rates:
        lines.append(f"disk copies priced: {report.disk_rates}")
    if report.read_in_place:
        r = report.read_in_place
        files = ", ".join(Path(f).name for f in r["files"])
        lines.append(
            f"read in place:      {r['weights']} weights ({format_bytes(r['bytes'])}) from "
            f"{files}, not copied to the offload store"
        )
    if report.kernels:
        k = report.kernels
        lines.append(
            f"kernels:            inductor: {k['compiled']} of {k['runs']} runs of ops compiled "
            f"({k['compiled_ops']} of {k['ops']} ops); the rest eager"
        )
        if k.get("in_parts"):
            lines.append(
                f"  compiled in parts ({k['in_parts']}): compiled whole, they allocate more "
                f"than the plan has room for"
            )
        for reason, count in k["eager_reasons"].items():
            lines.append(f"  left eager ({count}): {reason}")
    if report.baselines:
        lines.append("plans compared (estimated time, peak):")
    for name, result in report.baselines.items():
        if result.get("fits"):
            lines.append(
                f"  {name + ':':20s}{result['seconds'] * 1e3:9.2f} ms  "
                f"{format_bytes(result['peak_bytes'])}"
            )
        else:
            lines.append(f"  {name + ':':20s}does not fit the budget")
    if report.lossy_allowed:
        lines.append(_lossy_line(report))
    for row in report.quantized:
        line = (
            f"quantized:          {row['tensor']} {row['format']}, saves "
            f"{format_bytes(row['saved_bytes'])} of {format_bytes(row['bytes'])}"
        )
        if "relative_l2" in row:
            line += f", error {row['relative_l2']:.2e} rel L2, {row['max_abs']:.2e} max"
        lines.append(line)
        if row.get("exact_lookups"):
            lines.append(
                "  lookups:          exact rows, read from its full copy on disk "
                "(other reads, a tied head's: the round trip)"
            )
    if report.output_error:
        e = report.output_error
        line = f"output error:       {e['relative_l2']:.2e} rel L2, {e['max_abs']:.2e} max"
        if "top1_agreement" in e:
            line += f", top-1 agreement {e['top1_agreement'] * 100:.2f}%"
        lines.append(line + " (vs the lossless run)")
    lines += _other_shapes_lines(report)
    if report.measured:
        m = report.measured
        # a compiled plan's prediction is its composed peak (runs compiled)
        predicted = report.compiled_peak_bytes or report.planned_peak_bytes
        # a measured peak of 0 (zero-size inputs, nothing held) has no ratio
        ratio = f"{predicted / m['peak_bytes']:.3f}" if m["peak_bytes"] else "-"
        line = (
            f"measured peak:      {format_bytes(m['peak_bytes'])} "
            f"(predicted/measured {ratio}, independent meter)"
        )
        if report.budget_bytes:
            line += " within budget" if m["peak_bytes"] <= report.budget_bytes else " OVER BUDGET"
        lines.append(line)
        if m.get("wall_seconds"):
            lines.append(
                f"measured time:      {m['wall_seconds'] * 1e3:.2f} ms "
                f"(median of {m.get('wall_calls') or 'a few'} calls after a warm-up, "
                f"unmetered: a rough figure on a busy machine; estimate/measured "
                f"{report.estimated_seconds / m['wall_seconds']:.2f})"
            )
    return lines
