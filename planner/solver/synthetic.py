"""Synthetic placement problems from networkx DAGs (shared by tests and benchmarks).

``problem_from_dag`` turns a DAG whose nodes carry ``cost_cpu`` and ``cost_ram``
(the rematerialization graphs of ``remat_graphs``: chains, U-Nets, random layered
DAGs) into a ``Problem``: one step per node in a deterministic topological order,
one tensor per node output, optionally one weight per node. It lets the placement
solver be measured on thousands of ops without capturing a model.
"""

from __future__ import annotations

import dataclasses
import random

import networkx as nx

from planner.solver.baselines import keep_all
from planner.solver.candidates import build_candidates
from planner.solver.plan import Plan, SolverStats
from planner.solver.problem import DISK, HOST, Bandwidths, Problem, Recompute, Step, Tensor
from planner.solver.schedule import plan_from_choices
from planner.solver.solve import lower_bound_bytes
from planner.solver.validate import validate

#: Seconds of compute per unit of ``cost_cpu`` (remat graphs use 1..10 per node), so
#: that a node takes tens of microseconds, about what its output takes on the disk.
SECONDS_PER_COST = 5e-6

#: The ``cpu`` device profile's disk (a modest cloud SSD).
DISK_READ, DISK_WRITE = 1.0e9, 0.5e9


def problem_from_dag(
    graph: nx.DiGraph,
    budget_bytes: int,
    *,
    weights: bool = True,
    backward: bool = False,
    seconds_per_cost: float = SECONDS_PER_COST,
    disk_read: float = DISK_READ,
    disk_write: float = DISK_WRITE,
    host: float | None = None,
    seed: int = 0,
) -> Problem:
    """A Problem with one step per node of ``graph`` and one tensor per output.

    - Steps follow a topological order that breaks ties by the graph's insertion
      order, so the same graph always gives the same problem.
    - A node's output is read by its successors' steps and replayed from its
      predecessors' outputs (and its weight) when recomputed; sinks are returned.
    - ``weights``: every node also reads a persistent weight (home on the device
      unless the plan moves it) of a size drawn from ``seed``, between a quarter and
      twice its output. A node's gradient (``grad_<v>`` of ``remat_graphs``, or
      ``b<i>`` for ``f<i>`` in a chain) reads the same weight.
    - ``backward``: append a reverse-mode gradient node per node first (the graph
      is copied, not changed); the problem's mode is then "train".
    - ``host``: bytes/s of a host tier in both directions; None: disk only.
    """
    if backward:
        graph = _with_backward(graph)
    if not nx.is_directed_acyclic_graph(graph):
        raise ValueError("problem_from_dag: the graph has a cycle")
    position = {v: k for k, v in enumerate(graph.nodes)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    step_of = {v: i for i, v in enumerate(order)}
    steps = [
        Step(i, str(v), float(graph.nodes[v]["cost_cpu"]) * seconds_per_cost)
        for i, v in enumerate(order)
    ]
    tensors = [
        Tensor(
            index=i,
            name=str(v),
            nbytes=int(graph.nodes[v]["cost_ram"]),
            kind="activation",
            dtype="float32",
            appears_at=i,
            by_op=True,
            uses=tuple(sorted(step_of[w] for w in graph.successors(v))),
            until_end=graph.out_degree(v) == 0,
        )
        for i, v in enumerate(order)
    ]
    weight_of: dict[str, int] = {}
    if weights:
        rng = random.Random(seed)
        readers: dict[str, list[int]] = {}
        for i, v in enumerate(order):
            owner = _forward_of(graph, str(v))
            readers.setdefault(owner, []).append(i)
        for owner, users in readers.items():
            nbytes = max(1, int(graph.nodes[owner]["cost_ram"] * rng.uniform(0.25, 2.0)))
            index = len(tensors)
            tensors.append(
                Tensor(
                    index,
                    f"{owner}.weight",
                    nbytes,
                    "param",
                    "float32",
                    0,
                    False,
                    tuple(sorted(users)),
                    persistent=True,
                )
            )
            for i in users:
                weight_of[str(order[i])] = index
    for i, v in enumerate(order):
        inputs = [step_of[u] for u in graph.predecessors(v)]
        if str(v) in weight_of:
            inputs.append(weight_of[str(v)])
        tensors[i] = dataclasses.replace(
            tensors[i], recompute=Recompute(i, tuple(sorted(inputs)), steps[i].seconds)
        )
    bandwidths = Bandwidths(
        disk_read=disk_read, disk_write=disk_write, host_to_device=host, device_to_host=host
    )
    train = backward or any(_is_gradient(graph, str(v)) for v in graph.nodes)
    return Problem(
        mode="train" if train else "infer",
        steps=steps,
        tensors=tensors,
        budget_bytes=int(budget_bytes),
        bandwidths=bandwidths,
        tiers=(HOST, DISK) if host is not None else (DISK,),
        meta={"source": "synthetic", "nodes": graph.number_of_nodes(), "seed": seed},
    )


def with_budget(problem: Problem, budget_bytes: int) -> Problem:
    """The same problem (same fingerprint) under another budget."""
    return dataclasses.replace(problem, budget_bytes=int(budget_bytes), meta=dict(problem.meta))


def keep_all_plan(problem: Problem) -> Plan:
    """The unplanned plan (nothing moves) as an explicit schedule."""
    cands = build_candidates(problem)
    return plan_from_choices(
        cands, keep_all(cands), SolverStats(name="keep-all", status="BASELINE", seconds=0.0)
    )


def unplanned_peak(problem: Problem) -> int:
    """Peak bytes of the keep-all plan, replayed by the validator with no budget."""
    roomy = with_budget(problem, 2**62)
    return validate(roomy, keep_all_plan(roomy)).peak_bytes


def unplanned_seconds(problem: Problem) -> float:
    """Estimated seconds of the keep-all plan (the sum of the steps' seconds)."""
    roomy = with_budget(problem, 2**62)
    return validate(roomy, keep_all_plan(roomy)).seconds


def lower_bound(problem: Problem) -> int:
    """No plan for ``problem`` can peak below this (see ``solve.lower_bound_bytes``)."""
    return lower_bound_bytes(build_candidates(problem))


def _with_backward(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy with a gradient node ``grad_<v>`` per node, as ``remat_graphs`` builds."""
    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes(data=True))
    g.add_edges_from(graph.edges)
    forward = list(
        nx.lexicographical_topological_sort(
            g, key={v: k for k, v in enumerate(g.nodes)}.__getitem__
        )
    )
    for v in reversed(forward):
        gv = f"grad_{v}"
        g.add_node(
            gv, cost_cpu=2 * float(g.nodes[v]["cost_cpu"]), cost_ram=int(g.nodes[v]["cost_ram"])
        )
        g.add_edge(v, gv)
        for w in graph.successors(v):
            g.add_edge(f"grad_{w}", gv)
    return g


def _is_gradient(graph: nx.DiGraph, name: str) -> bool:
    return _forward_of(graph, name) != name


def _forward_of(graph: nx.DiGraph, name: str) -> str:
    """The forward node whose weight ``name`` reads: itself, or the node it is the
    gradient of (``grad_<v>``, or ``b<i>`` of a chain's ``f<i>``)."""
    if name.startswith("grad_") and name[5:] in graph:
        return name[5:]
    if name[:1] == "b" and name[1:].isdigit() and f"f{name[1:]}" in graph:
        return f"f{name[1:]}"
    return name


__all__ = [
    "keep_all_plan",
    "lower_bound",
    "problem_from_dag",
    "unplanned_peak",
    "unplanned_seconds",
    "with_budget",
]
