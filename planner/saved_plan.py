"""Why a saved plan does not fit the graph it is given, in the caller's terms.

A plan applies to a problem exactly when their fingerprints match
(``Problem.fingerprint``); a mismatch was refused as made "for a different graph
(model, dtypes, input shapes, mode or quantize setting differ)", which left the
caller to guess which (a plan made for an H100's profile, whose tensors go to the
host tier, read as another model). The plan's own data names its mode, every
tensor with its bytes and kind, and the homes and formats it uses: compared with
the problem's, they say what differs, and so what to pass instead.
"""

from __future__ import annotations

import os

from planner.errors import PlannerError
from planner.solver.plan import Plan
from planner.solver.problem import DEVICE, Problem

_WEIGHT_KINDS = ("param", "buffer")
_REPLAN = "plan again without plan= (then save the new plan)"


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _sizes(saved: dict[str, int], ours: dict[str, int], names: list[str], limit: int = 2) -> str:
    shown = "; ".join(
        f"{n!r} is {ours[n]:,} bytes here and {saved[n]:,} in the plan" for n in names[:limit]
    )
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def what_differs(saved: Plan, problem: Problem) -> tuple[str, str]:
    """(what differs between ``saved`` and ``problem``, what to do), for a plan
    whose fingerprint is not the problem's."""
    if saved.mode != problem.mode:
        return (
            f"it was made with mode={saved.mode!r}, and this plan is mode={problem.mode!r}",
            f"pass mode={saved.mode!r}, or {_REPLAN}",
        )
    tiers = {d.home.partition(":")[0] for d in saved.tensors} | {
        a.tier for a in saved.actions if a.kind in ("prefetch", "offload", "deliver") and a.tier
    }
    foreign = sorted(tiers - {DEVICE, *problem.tiers})
    if foreign:
        return (
            f"it moves tensors to the {' and '.join(foreign)} tier, which this device does not "
            f"have (here: {', '.join(problem.tiers) or 'none'}): it was made for another kind "
            f"of device (profile=)",
            "plan again on this device without plan= (then save the new plan)",
        )
    formats = {d.home.partition(":")[2] for d in saved.tensors} | {
        a.tier for a in saved.actions if a.kind == "quantize" and a.tier
    }
    formats.discard("")
    if formats and problem.quantize not in formats:
        return (
            f"it stores tensors as {' and '.join(sorted(formats))}, and quantize= here allows "
            f"{problem.quantize or 'nothing (None)'}",
            f"pass the quantize= it was made with, or {_REPLAN}",
        )
    theirs = {d.name: (d.nbytes, d.kind) for d in saved.tensors}
    ours = {t.name: (t.nbytes, t.kind) for t in problem.tensors}
    for kinds, what, todo in (
        (_WEIGHT_KINDS, "the model's weights and buffers", f"plan this model: {_REPLAN}"),
        (
            ("input",),
            "the example inputs",
            f"give example inputs of the shapes and dtypes it was made for (a plan serves "
            f"one set; extra_example_inputs plans more), or {_REPLAN}",
        ),
        (
            ("grad",),
            "the gradients (which parameters require grad)",
            f"set requires_grad as it was when the plan was made, or {_REPLAN}",
        ),
    ):
        mine = {n: b for n, (b, k) in ours.items() if k in kinds}
        made = {n: b for n, (b, k) in theirs.items() if k in kinds}
        missing = [n for n in made if n not in mine]
        new = [n for n in mine if n not in made]
        if missing or new:
            parts = [f"the plan has {_names(missing)} that this graph lacks"] if missing else []
            parts += [f"this graph has {_names(new)} that the plan lacks"] if new else []
            return f"{what} differ: {'; '.join(parts)}", todo
        resized = [n for n in mine if mine[n] != made[n]]
        if resized:
            why = (
                "their layer or buffer sizes, or dtype"
                if kinds == _WEIGHT_KINDS
                else "their shapes or dtypes"
            )
            return f"{what} differ in size ({why}): {_sizes(made, mine, resized)}", todo
    here = "None"
    if problem.quantize:
        here = f"{problem.quantize!r} for {', '.join(problem.quantize_uses)}"
    return (
        f"its ops or options differ, over weights and inputs of the same sizes: their "
        f"dtypes (float16 and bfloat16 are one size), the quantize= setting (here {here}), "
        f"the tiers of the device profile (profile=), kernels=, or the model's code, config "
        f"or train()/eval() state (or the plan was saved by a planner version that "
        f"fingerprints graphs otherwise)",
        f"pass the settings it was made with, or {_REPLAN}",
    )


def check_saved_plan_given(saved: object, option: str = "plan=") -> None:
    """``saved`` (each of a list's) is a Plan or a path, refused before any work
    otherwise: a plan's ``to_dict()`` or its JSON text was refused after tracing
    as "cannot load plan" followed by the whole plan, kilobytes of it."""
    if saved is None:
        return
    for one in saved if isinstance(saved, (list, tuple)) else (saved,):
        if isinstance(one, Plan):
            continue
        if isinstance(one, dict):
            got = "a dict (a plan's to_dict()? pass planner.Plan.from_dict(it))"
        elif isinstance(one, str) and one.lstrip().startswith("{"):
            got = "JSON text, not a path (pass planner.Plan.from_dict(json.loads(text)))"
        elif isinstance(one, (str, os.PathLike)):
            continue
        else:
            got = f"an object of type {type(one).__name__}"
        raise PlannerError(
            f"{option} takes a saved plan: a planner.Plan (pm.plan) or the path Plan.save "
            f"wrote it to; got {got}"
        )
