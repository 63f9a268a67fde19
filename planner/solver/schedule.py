"""Choices -> an explicit action schedule (the Plan's ``actions``) and the
per-tensor decisions the report prints. See ``plan.py`` for the semantics."""

from __future__ import annotations

from planner.solver.candidates import (
    DELIVER,
    HOME,
    KEEP,
    QFETCH,
    QOFFLOAD,
    STORED,
    Candidates,
    own_steps,
    parse_choice,
    use_runs,
)
from planner.solver.plan import Action, Plan, SolverStats, TensorDecision

#: Order of actions that share a step and a side: allocations before the waits
#: that complete them, and those before the recomputes that read them.
_BEFORE_ORDER = {"prefetch": 0, "wait": 1, "dequantize": 2, "recompute": 3}
_AFTER_ORDER = {"quantize": 0, "offload": 1, "free": 2, "wait": 2, "deliver": 2}


def build_schedule(
    cands: Candidates, choices: list[str]
) -> tuple[list[Action], list[TensorDecision]]:
    problem = cands.problem
    T = problem.num_steps
    before: list[tuple[int, int, int, Action]] = []
    after: list[tuple[int, int, int, Action]] = []
    seq = 0

    def add(step: int, when: str, kind: str, name: str, tier: str | None = None) -> None:
        nonlocal seq
        seq += 1
        action = Action(step, when, kind, name, tier)
        if when == "before":
            before.append((step, _BEFORE_ORDER[kind], seq, action))
        else:
            after.append((step, _AFTER_ORDER[kind], seq, action))

    # inputs whose buffer an op's output takes over: they leave with that op
    consumed = {s.reuse[0] for s in problem.steps if s.reuse is not None}
    decisions = []
    for tensor in problem.tensors:
        name = tensor.name
        events = tensor.events(T)
        gap_ids = cands.gaps_of.get(tensor.index)
        home = "device"
        used: list[str] = []
        gaps_out: list[tuple[int, int, str]] = []
        caller_held = not tensor.by_op and not tensor.persistent and tensor.appears_at == 0
        if gap_ids is None:  # pinned or never needed: alive from appearance to its end
            if (
                not tensor.until_end
                and not tensor.persistent
                and not caller_held
                and events
                and tensor.index not in consumed
            ):
                add(tensor.last_step(T), "after", "free", name)
        elif tensor.persistent and choices[gap_ids[0]].startswith(f"{STORED}:"):
            fmt = parse_choice(choices[gap_ids[0]])[1]
            home = f"device:{fmt}"
            used.append(f"quantize:{fmt}")
            fused = {step for step, _ in tensor.fused_uses}
            for gi in gap_ids:
                gap = cands.gaps[gi]
                gaps_out.append((gap.start, gap.end, choices[gi]))
            for e in events:
                if e not in fused:  # a full copy for this use only
                    add(e, "before", "dequantize", name)
                    add(e, "after", "free", name)
        elif tensor.persistent and choices[gap_ids[0]].startswith(f"{QFETCH}:"):
            tier = parse_choice(choices[gap_ids[0]])[1]
            home = f"{tier}:{problem.quantize}"
            used += [f"fetch:{tier}", f"quantize:{problem.quantize}"]
            gaps_out = [(cands.gaps[gi].start, cands.gaps[gi].end, choices[gi]) for gi in gap_ids]
            option = cands.gaps[gap_ids[0]].option(choices[gap_ids[0]])
            fused = {step for step, _ in tensor.fused_uses}
            for run, read in zip(use_runs(own_steps(tensor, T)), option.transfers):
                add(read.window[0], "before", "prefetch", name, tier)
                add(run[0], "before", "wait", name)
                if any(e not in fused for e in run):  # one full copy for the whole run
                    add(run[0], "before", "dequantize", name)
                add(run[-1], "after", "free", name)
        else:
            for gi in gap_ids:
                gap = cands.gaps[gi]
                choice = choices[gi]
                option = gap.option(choice)
                gaps_out.append((gap.start, gap.end, choice))
                kind, tier = parse_choice(choice)  # type: ignore[assignment]
                if choice in (KEEP, HOME):
                    continue
                used.append(choice)
                a, b = gap.start, gap.end
                if kind == "fetch":
                    if a >= 0:
                        add(a, "after", "free", name)
                    else:
                        home = tier or home
                    add(option.prefetch_at, "before", "prefetch", name, tier)  # type: ignore[arg-type]
                    add(b, "before", "wait", name)
                elif kind == "offload":
                    add(a, "after", "offload", name, tier)
                    add(option.write_done_at, "after", "wait", name)  # type: ignore[arg-type]
                    add(option.write_done_at, "after", "free", name)  # type: ignore[arg-type]
                    add(option.prefetch_at, "before", "prefetch", name, tier)  # type: ignore[arg-type]
                    add(b, "before", "wait", name)
                elif kind == "reload":
                    add(a, "after", "free", name)
                    add(option.prefetch_at, "before", "prefetch", name, tier)  # type: ignore[arg-type]
                    add(b, "before", "wait", name)
                elif kind == "recompute":
                    add(a, "after", "free", name)
                    add(b, "before", "recompute", name)
                elif kind == "quantize":
                    add(a, "after", "quantize", name, tier)
                    add(b, "before", "dequantize", name)
                elif kind == QOFFLOAD:  # quantize, write, free; read, dequantize
                    add(a, "after", "quantize", name, problem.quantize)
                    add(a, "after", "offload", name, tier)
                    add(option.write_done_at, "after", "wait", name)  # type: ignore[arg-type]
                    add(option.write_done_at, "after", "free", name)  # type: ignore[arg-type]
                    add(option.prefetch_at, "before", "prefetch", name, tier)  # type: ignore[arg-type]
                    add(b, "before", "wait", name)
                    add(b, "before", "dequantize", name)
                elif kind == DELIVER:  # leaves the device for the parameter's .grad
                    add(a, "after", "deliver", name, tier)
                    if option.write_done_at is not None:  # CUDA: a copy in the background
                        add(option.write_done_at, "after", "wait", name)
                        add(option.write_done_at, "after", "free", name)
                else:
                    raise ValueError(f"unknown choice {choice!r} for {name}")
            freed_at_end = tensor.until_end or (tensor.persistent and home == "device")
            if not freed_at_end and not caller_held and tensor.index not in consumed:
                add(events[-1], "after", "free", name)
        decisions.append(
            TensorDecision(
                name=name,
                nbytes=tensor.nbytes,
                kind=tensor.kind,
                home=home,
                decision=_summary(used, problem.quantize),
                live=(tensor.appears_at, tensor.last_step(T)),
                gaps=gaps_out,
            )
        )
    ordered = sorted(before, key=lambda e: e[:3]) + sorted(after, key=lambda e: e[:3])
    ordered.sort(key=lambda e: (e[0], e[3].when == "after"))  # stable: keeps the order above
    return [e[3] for e in ordered], decisions


def _summary(choices: list[str], fmt: str | None) -> str:
    labels: list[str] = []
    for choice in choices:
        kind, tier = parse_choice(choice)
        if kind == QOFFLOAD:  # travels quantized
            new = [f"offload:{tier}", f"quantize:{fmt}"]
        else:
            moved = kind in ("offload", "reload", "fetch", DELIVER)
            new = [f"offload:{tier}" if moved else choice]
        for label in new:
            if label not in labels:
                labels.append(label)
    return "+".join(labels) if labels else "keep"


def plan_from_choices(cands: Candidates, choices: list[str], solver: SolverStats) -> Plan:
    """An unvalidated Plan for ``choices``: its figures (peak, time) are filled in
    by whoever replays it."""
    problem = cands.problem
    actions, decisions = build_schedule(cands, choices)
    return Plan(
        mode=problem.mode,
        budget_bytes=problem.budget_bytes,
        fingerprint=problem.fingerprint(),
        tensors=decisions,
        actions=actions,
        predicted_peak_bytes=0,
        estimated_seconds=0.0,
        unplanned_peak_bytes=0,
        unplanned_estimated_seconds=0.0,
        solver=solver,
    )
