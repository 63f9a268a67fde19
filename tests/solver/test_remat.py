"""Tests of the rematerialization scheduler; every schedule goes through the checker."""

from __future__ import annotations

import time

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.errors import BudgetTooSmall, InvalidPlan
from planner.solver import remat_schedule
from planner.solver.remat import solve_remat
from planner.solver.remat_dtr import HEURISTICS, dtr_schedule
from planner.solver.remat_graphs import chain_graph, diamond_graph, layered_dag, unet_graph
from planner.solver.remat_order import search_orders
from planner.solver.remat_portfolio import heuristic_schedules
from planner.solver.remat_problem import RematProblem, topological_peak
from planner.solver.sequence_check import check_sequence


def _peak(g: nx.DiGraph) -> int:
    return topological_peak(RematProblem.from_graph(g))


def _total(g: nx.DiGraph) -> float:
    return sum(float(g.nodes[v]["cost_cpu"]) for v in g.nodes)


def _schedule_ok(g: nx.DiGraph, budget: int, **kw) -> float:
    seq = remat_schedule(g, budget, **kw)
    stats = check_sequence(g, seq, budget)
    assert stats.peak_bytes <= budget
    assert stats.cost >= _total(g) - 1e-9
    return stats.cost


# ---- checker -------------------------------------------------------------------


def test_checker_accepts_topological_order_and_measures_peak() -> None:
    g = chain_graph(3, backward=False, ram=10)
    stats = check_sequence(g, ["f0", "f1", "f2"], 20)
    assert stats.peak_bytes == 20 and stats.cost == 3.0 and stats.recomputations == 0


@pytest.mark.parametrize(
    "seq,budget,match",
    [
        (["f1", "f0", "f2"], None, "step 0: 'f1' reads 'f0'"),
        (["f0", "f1"], None, "never evaluated"),
        (["f0", "f1", "nope"], None, "step 2: 'nope' is not a node"),
        (["f0", "f1", "f2"], 15, "step 1: .* over the budget"),
    ],
)
def test_checker_rejects_bad_sequences(seq: list[str], budget: int | None, match: str) -> None:
    g = chain_graph(3, backward=False, ram=10)
    with pytest.raises(InvalidPlan, match=match):
        check_sequence(g, seq, budget)


def test_checker_counts_outputs_until_the_end() -> None:
    g = nx.DiGraph()
    for v, r in (("a", 5), ("o1", 7), ("b", 3), ("o2", 1)):
        g.add_node(v, cost_cpu=1.0, cost_ram=r)
    g.add_edges_from([("a", "o1"), ("a", "b"), ("b", "o2")])
    # o1 stays resident to the end: at "o2", o1 + b + o2 are live (a freed after b)
    assert check_sequence(g, ["a", "o1", "b", "o2"]).peak_bytes == 5 + 7 + 3


# ---- structured graphs -----------------------------------------------------------


@pytest.mark.parametrize("n", [5, 20, 60])
@pytest.mark.parametrize("frac", [1.0, 0.6, 0.35])
def test_training_chain(n: int, frac: float) -> None:
    g = chain_graph(n)
    budget = max(RematProblem.from_graph(g).lower_bound(), int(_peak(g) * frac))
    cost = _schedule_ok(g, budget, time_limit=10)
    if frac == 1.0:
        assert cost == pytest.approx(_total(g))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_diamonds(k: int) -> None:
    g = diamond_graph(k, width=3)
    for frac in (1.0, 0.9):
        budget = max(RematProblem.from_graph(g).lower_bound(), int(_peak(g) * frac))
        _schedule_ok(g, budget, time_limit=5)


@pytest.mark.parametrize("levels,blocks", [(3, 1), (4, 3)])
def test_unet_training_graph(levels: int, blocks: int) -> None:
    g = unet_graph(levels, blocks, backward=True)
    prob = RematProblem.from_graph(g)
    budget = max(prob.lower_bound(), int(topological_peak(prob) * 0.7))
    _schedule_ok(g, budget, time_limit=10)


@pytest.mark.parametrize("n", [30, 100])
@pytest.mark.parametrize("frac", [1.0, 0.9])
def test_layered_dags(n: int, frac: float) -> None:
    g = layered_dag(n, seed=n)
    _schedule_ok(g, int(_peak(g) * frac), time_limit=10)


# ---- bounds and errors -------------------------------------------------------------


def test_budget_below_lower_bound_raises_with_usable_min_budget() -> None:
    g = chain_graph(10)
    lb = RematProblem.from_graph(g).lower_bound()
    with pytest.raises(BudgetTooSmall) as info:
        remat_schedule(g, lb - 1)
    found = info.value.min_budget
    assert found is not None and found >= lb
    _schedule_ok(g, found, time_limit=5)  # the reported budget really works


def test_generous_budget_means_no_recompute() -> None:
    g = layered_dag(80, seed=3)
    seq = remat_schedule(g, _peak(g))
    assert len(seq) == g.number_of_nodes()


# ---- exact vs default ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make,frac",
    [
        (lambda: chain_graph(8), 0.5),
        (lambda: layered_dag(24, seed=1), 0.85),
        (lambda: diamond_graph(4, 3), 0.8),
    ],
)
def test_default_matches_exact_on_small_graphs(make, frac: float) -> None:
    g = make()
    prob = RematProblem.from_graph(g)
    budget = max(prob.lower_bound(), int(topological_peak(prob) * frac))
    exact = solve_remat(g, budget, time_limit=30, exact=True)
    default = solve_remat(g, budget, time_limit=30)
    for sol in (exact, default):
        assert check_sequence(g, sol.sequence, budget).cost == pytest.approx(sol.cost)
    if exact.status == "OPTIMAL":
        assert default.cost <= exact.cost * 1.01 + 1e-9


# ---- properties on random small DAGs ------------------------------------------------


@st.composite
def small_dags(draw: st.DrawFn) -> nx.DiGraph:
    n = draw(st.integers(1, 9))
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, cost_cpu=draw(st.floats(0.5, 10.0)), cost_ram=draw(st.integers(1, 50)))
    for j in range(1, n):
        for i in range(j):
            if draw(st.booleans()):
                g.add_edge(i, j)
    return g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=small_dags(), frac=st.floats(0.3, 1.2))
def test_random_dags_valid_or_budget_too_small(g: nx.DiGraph, frac: float) -> None:
    prob = RematProblem.from_graph(g)
    peak = topological_peak(prob)
    budget = int(peak * frac)
    try:
        seq = remat_schedule(g, budget, time_limit=2)
    except BudgetTooSmall as err:
        assert err.min_budget is not None and err.min_budget > budget
        assert err.min_budget >= prob.lower_bound()
        check_sequence(g, remat_schedule(g, err.min_budget, time_limit=2), err.min_budget)
        return
    stats = check_sequence(g, seq, budget)
    assert stats.cost >= prob.total_cpu - 1e-9
    if budget >= peak:
        assert stats.cost == pytest.approx(prob.total_cpu)


# ---- scale ------------------------------------------------------------------------------


def test_layered_300_nodes_at_80_percent_within_time() -> None:
    """A smaller version of the 1000-node / 60 s requirement (see benchmarks/remat_bench.py)."""
    g = layered_dag(300, seed=7)
    prob = RematProblem.from_graph(g)
    budget = int(_peak(g) * 0.8)
    assert budget >= prob.lower_bound()  # 80% is above the local lower bound here
    t0 = time.perf_counter()
    _schedule_ok(g, budget, time_limit=20)
    assert time.perf_counter() - t0 < 25


# ---- the heuristics on their own ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_dtr_and_order_search_fit_layered_dag_at_80_percent(seed: int) -> None:
    """Index-order DTR gets stuck here; over a searched order it fits (the old greedy did not)."""
    g = layered_dag(200, seed=seed)
    prob = RematProblem.from_graph(g)
    budget = int(topological_peak(prob) * 0.8)
    found = heuristic_schedules(prob, budget, time.perf_counter() + 30, seed=0)
    assert found, "no heuristic schedule at 80%"
    for cand in found:
        stats = check_sequence(g, prob.sequence_nodes(cand.sequence), budget)
        assert stats.cost == pytest.approx(cand.cost)


def test_order_search_never_worse_than_index_order() -> None:
    prob = RematProblem.from_graph(layered_dag(150, seed=4))
    budget = int(topological_peak(prob) * 0.8)
    best = search_orders(prob, budget, time_limit=1.0)[0]
    assert best.peak <= topological_peak(prob)
    assert sorted(best.order) == list(range(prob.n))
    pos = {v: k for k, v in enumerate(best.order)}
    assert all(pos[u] < pos[v] for v in range(prob.n) for u in prob.preds[v])


@pytest.mark.parametrize("heuristic", HEURISTICS)
def test_dtr_schedules_are_valid_on_chains(heuristic: str) -> None:
    g = chain_graph(30)
    prob = RematProblem.from_graph(g)
    budget = max(prob.lower_bound(), int(topological_peak(prob) * 0.4))
    res = dtr_schedule(prob, budget, None, heuristic)
    if res is None:  # a single rule may get stuck; the portfolio must not
        assert heuristic_schedules(prob, budget, time.perf_counter() + 5)
        return
    stats = check_sequence(g, prob.sequence_nodes(res.sequence), budget)
    assert stats.peak_bytes == res.peak and stats.cost == pytest.approx(res.cost)
