"""Properties of ``solve`` on random synthetic problems (hypothesis): every plan
the solver returns replays within its budget under the independent validator and
takes at least the compute it replays; BudgetTooSmall only below its min_budget."""

from __future__ import annotations

import random

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.errors import BudgetTooSmall
from planner.solver import Problem, solve, validate
from planner.solver.remat_graphs import chain_graph, diamond_graph, layered_dag, unet_graph
from planner.solver.synthetic import (
    lower_bound,
    problem_from_dag,
    unplanned_peak,
    with_budget,
)

TIME_LIMIT = 2.0


def _graph(kind: str, n: int, seed: int) -> nx.DiGraph:
    """A DAG of about ``n`` nodes with sizes and costs drawn from ``seed``."""
    if kind == "layered":
        g = layered_dag(n, seed=seed, mean_width=3)
    elif kind == "chain":
        g = chain_graph(max(2, n // 2))
    elif kind == "diamond":
        g = diamond_graph(max(1, n // 4), width=2)
    else:
        g = unet_graph(max(2, min(4, n // 6)), blocks=max(1, n // 12), backward=True)
    rng = random.Random(seed)
    for v in g.nodes:
        g.nodes[v]["cost_cpu"] = rng.uniform(0.5, 10.0)
        g.nodes[v]["cost_ram"] = rng.randint(1, 64) * 1024
    return g


@st.composite
def problems(draw: st.DrawFn) -> tuple[Problem, float]:
    kind = draw(st.sampled_from(["layered", "chain", "diamond", "unet"]))
    n = draw(st.integers(5, 40))
    seed = draw(st.integers(0, 10_000))
    backward = kind in ("layered", "diamond") and draw(st.booleans())
    problem = problem_from_dag(
        _graph(kind, n, seed),
        1,
        weights=draw(st.booleans()),
        backward=backward,
        seconds_per_cost=draw(st.sampled_from([1e-6, 5e-6, 5e-5])),
        host=draw(st.sampled_from([None, 4e9])),
        seed=seed,
    )
    return problem, draw(st.floats(0.0, 1.0))


def _check(problem: Problem) -> None:
    try:
        plan = solve(problem, time_limit=TIME_LIMIT)
    except BudgetTooSmall as exc:
        assert exc.min_budget is not None
        assert problem.budget_bytes < exc.min_budget, "raised although min_budget fits"
        assert exc.min_budget >= lower_bound(problem)
        assert exc.min_budget <= unplanned_peak(problem)
        return
    replay = validate(problem, plan)
    assert replay.peak_bytes == plan.predicted_peak_bytes <= problem.budget_bytes
    assert plan.estimated_seconds == pytest.approx(replay.seconds, rel=1e-9)
    compute = sum(s.seconds for s in problem.steps)
    assert plan.estimated_seconds >= compute * (1 - 1e-9)
    assert replay.compute_seconds == pytest.approx(compute)
    for name, entry in plan.baselines.items():
        if entry["fits"]:
            assert plan.estimated_seconds <= entry["seconds"] * (1 + 1e-9), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_plans_between_lower_bound_and_peak(case: tuple[Problem, float]) -> None:
    """Budgets drawn between the lower bound and the unplanned peak."""
    base, share = case
    low, peak = lower_bound(base), unplanned_peak(base)
    assert low <= peak
    _check(with_budget(base, low + int(share * (peak - low))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_keep_all_budget_never_raises(case: tuple[Problem, float]) -> None:
    """At the unplanned peak nothing needs to move: the plan is the unplanned run."""
    base, _ = case
    problem = with_budget(base, unplanned_peak(base))
    plan = solve(problem, time_limit=TIME_LIMIT)
    assert plan.solver.status == "FITS_UNPLANNED"
    assert validate(problem, plan).stall_seconds == 0.0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_below_lower_bound_raises(case: tuple[Problem, float]) -> None:
    base, share = case
    low = lower_bound(base)
    problem = with_budget(base, max(1, int(low * share * 0.99)))
    with pytest.raises(BudgetTooSmall) as info:
        solve(problem, time_limit=TIME_LIMIT)
    assert info.value.min_budget is not None and info.value.min_budget >= low
