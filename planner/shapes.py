"""Plans of one model for several input shapes that share the weights' homes.

A plan is specific to its input shapes, and a generating loop wants two (a chunk
of the prompt and one token), a training loop often two (a data set's last,
smaller batch). Two plans made one after the other cannot share the weights: an
inference plan moves what it keeps off the device into its own store (the model
then no longer holds those values), a training plan points a parameter it keeps
in a tier at its own file (a second one takes it over from the first), and a
plan of a copy of the model holds every weight a second time. So
``planner.plan(..., extra_example_inputs=[...])`` captures and solves each shape,
agrees on one home per weight, and builds one executor per shape over one store
(``PlannedModule.add_other_shapes``). In training the shapes' plans also share
each early-delivered gradient's ``.grad`` buffer and the frozen weights'
stand-ins, and count their spilling forwards together (their activations spill
into the store under the same names).

The weights a module keeps on the device stay there between calls, so they
must leave room for every shape's call: the homes agreed on are those of the
plan that keeps the fewest bytes on the device (the largest shape's, as a rule),
and the other shapes are solved again with them fixed (``Problem.fixed_homes``).
Should that leave a shape without a plan, each weight is on the device only
where every shape's own plan keeps it there, else in the tier a plan moved it
to: moving a weight to a tier never makes a plan infeasible (a plan may fetch it
before the first op and keep it, holding what the device home held). What this
gives up is the joint optimum over the shapes.
"""

from __future__ import annotations

import dataclasses
import logging

from planner.errors import BudgetTooSmall, PlannerError
from planner.solver import Plan, Problem, solve

log = logging.getLogger(__name__)


def homes_of(problem: Problem, plan: Plan) -> dict[str, str]:
    """Each persistent tensor's home in ``plan``, by name."""
    persistent = {t.name for t in problem.tensors if t.persistent}
    return {d.name: d.home for d in plan.tensors if d.name in persistent}


def shared_homes(problems: list[Problem], plans: list[Plan]) -> dict[str, str]:
    """One home per persistent tensor of any shape's problem: "device" if every
    plan that has it keeps it there (whole), else the first other home a plan
    gives it (a tier, or quantized storage)."""
    homes: dict[str, str] = {}
    for problem, plan in zip(problems, plans):
        for name, home in homes_of(problem, plan).items():
            if homes.get(name, "device") == "device":
                homes[name] = home
    return homes


def solve_shapes(problems: list[Problem], time_limit: float) -> tuple[list[Problem], list[Plan]]:
    """Each problem (one per input shape, one budget) solved with one home per
    weight fixed: (the problems as solved, their plans).

    The homes tried first are those of the plan that keeps the fewest bytes on
    the device (the shape with the most to hold while it runs, a prompt beside a
    token): the weights a module keeps on the device must leave room for every
    shape's call, and that plan says which fit beside the largest. Should another
    shape then have no plan, ``shared_homes`` (never infeasible). A shape whose
    own plan already homes every weight so is not solved again."""
    plans = _solved_all(problems, time_limit)
    tightest = min(range(len(plans)), key=lambda k: _device_bytes(problems[k], plans[k]))
    try:
        homes = homes_of(problems[tightest], plans[tightest])
        return _with_homes(problems, plans, homes, time_limit)
    except BudgetTooSmall as exc:
        log.info("the homes of shape %d leave another shape no plan (%s): each weight "
                 "on the device only where every shape keeps it", tightest, exc)  # fmt: skip
        return _with_homes(problems, plans, shared_homes(problems, plans), time_limit)


def check_same_homes(problems: list[Problem], plans: list[Plan]) -> None:
    """PlannerError unless the plans (saved, one per shape) home each weight alike,
    as plans made together do: the modules share one store, so a weight has one
    home whichever shape runs."""
    homes: dict[str, tuple[int, str]] = {}
    for k, (problem, plan) in enumerate(zip(problems, plans)):
        for name, home in homes_of(problem, plan).items():
            first, seen = homes.setdefault(name, (k, home))
            if seen != home:
                raise PlannerError(
                    f"the saved plans home {name!r} differently: {seen!r} in shape {first}'s, "
                    f"{home!r} in shape {k}'s. Plans of several shapes share the weights' "
                    f"homes: save those of one module planned with extra_example_inputs"
                )


def _device_bytes(problem: Problem, plan: Plan) -> int:
    """Bytes of the persistent tensors ``plan`` keeps on the device."""
    homes = homes_of(problem, plan)
    return sum(t.nbytes for t in problem.tensors if homes.get(t.name) == "device")


def _with_homes(
    problems: list[Problem], plans: list[Plan], homes: dict[str, str], time_limit: float
) -> tuple[list[Problem], list[Plan]]:
    fixed_problems, fixed_plans = [], []
    for k, (problem, plan) in enumerate(zip(problems, plans)):
        names = {t.name for t in problem.tensors if t.persistent}
        fixed = {name: home for name, home in homes.items() if name in names}
        problem = dataclasses.replace(problem, fixed_homes=fixed)
        own = homes_of(problem, plan)
        moved = sorted(name for name, home in fixed.items() if own.get(name) != home)
        if moved:
            log.info("shape %d: solving again with %d weight home(s) shared: %s",
                     k, len(moved), ", ".join(moved[:5]))  # fmt: skip
            plan = _solved_all([problem], time_limit, first=k)[0]
        fixed_problems.append(problem)
        fixed_plans.append(plan)
    return fixed_problems, fixed_plans


def _solved_all(problems: list[Problem], time_limit: float, first: int = 0) -> list[Plan]:
    """Each problem's plan; BudgetTooSmall if any shape has none, naming those
    shapes, with the smallest budget that fits them all (the largest of theirs)."""
    plans, too_small = [], []
    for k, problem in enumerate(problems, start=first):
        try:
            plans.append(solve(problem, time_limit=time_limit))
        except BudgetTooSmall as exc:
            too_small.append((k, exc))
    if not too_small:
        return plans
    mins = [exc.min_budget for _, exc in too_small]
    known = [m for m in mins if m is not None]
    raise BudgetTooSmall(
        "; ".join(f"input shape {k} (example input set {k}): {exc}" for k, exc in too_small),
        max(known) if len(known) == len(mins) else None,
    )
