"""The rematerialization problem as plain indexed data, shared by every remat solver.

A networkx DAG is turned once into integer-indexed arrays in a fixed topological
order, so that the greedy, the CP-SAT models and the bounds all agree on what
"stage t" and "node i" mean and none of them touches networkx in a hot loop.

Semantics (Checkmate / Moccasin): a node runs when all its predecessors' values
are resident; a value is resident from its evaluation until its last read before
the node is evaluated again; outputs (no successors) stay resident until the end.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import networkx as nx

from planner.errors import InvalidPlan


@dataclass(frozen=True)
class RematProblem:
    """A DAG in topological order: node ``i`` is ``nodes[i]``; edges point forward."""

    nodes: tuple[Hashable, ...]
    cpu: tuple[float, ...]
    ram: tuple[int, ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return len(self.nodes)

    @property
    def outputs(self) -> tuple[int, ...]:
        """Nodes without successors: they must stay resident until the end."""
        return tuple(i for i in range(self.n) if not self.succs[i])

    @property
    def total_cpu(self) -> float:
        """Cost of evaluating every node once: a lower bound on any schedule's cost."""
        return float(sum(self.cpu))

    @classmethod
    def from_graph(cls, graph: nx.DiGraph, order: Sequence[Hashable] | None = None) -> RematProblem:
        """Index ``graph`` in ``order`` or a deterministic topological order (ties by
        insertion order)."""
        if not nx.is_directed_acyclic_graph(graph):
            raise InvalidPlan("remat: the graph has a cycle; a schedule needs a DAG")
        if order is None:
            rank = {v: k for k, v in enumerate(graph.nodes)}
            order = list(nx.lexicographical_topological_sort(graph, key=rank.__getitem__))
        index = {v: i for i, v in enumerate(order)}
        for v in order:
            data = graph.nodes[v]
            if "cost_cpu" not in data or "cost_ram" not in data:
                raise InvalidPlan(f"remat: node {v!r} lacks cost_cpu or cost_ram")
        return cls(
            nodes=tuple(order),
            cpu=tuple(float(graph.nodes[v]["cost_cpu"]) for v in order),
            ram=tuple(int(graph.nodes[v]["cost_ram"]) for v in order),
            preds=tuple(tuple(sorted(index[u] for u in graph.predecessors(v))) for v in order),
            succs=tuple(tuple(sorted(index[w] for w in graph.successors(v))) for v in order),
        )

    def lower_bound(self) -> int:
        """A budget below which no schedule exists, from two facts.

        (1) A node runs with its inputs and its output resident. (2) At the last step
        every output is resident, together with the last node and its inputs.
        """
        if self.n == 0:
            return 0
        step = max(self.ram[i] + sum(self.ram[p] for p in self.preds[i]) for i in range(self.n))
        outs = set(self.outputs)
        out_bytes = sum(self.ram[o] for o in outs)
        last = min(
            sum(self.ram[j] for j in {i, *self.preds[i]} if j not in outs) for i in range(self.n)
        )
        return max(step, out_bytes + last)

    def sequence_nodes(self, seq: Sequence[int]) -> list[Hashable]:
        return [self.nodes[i] for i in seq]


def simulate_indexed(problem: RematProblem, seq: Sequence[int]) -> tuple[int, float]:
    """Peak bytes and cost of an indexed sequence (the solvers' own fast accounting).

    The independent validator is :func:`planner.solver.sequence_check.check_sequence`;
    this one exists so solvers can rank candidates without converting to graph nodes.
    Raises ValueError on a read of a never-evaluated value.
    """
    n_steps = len(seq)
    start: list[int] = []
    end: list[int] = []
    size: list[int] = []
    copy_of = [-1] * problem.n
    for step, v in enumerate(seq):
        for p in problem.preds[v]:
            c = copy_of[p]
            if c < 0:
                raise ValueError(f"step {step}: node {v} reads {p} before it is evaluated")
            end[c] = step
        copy_of[v] = len(start)
        start.append(step)
        end.append(step)
        size.append(problem.ram[v])
    for o in problem.outputs:
        if copy_of[o] >= 0:
            end[copy_of[o]] = n_steps - 1
    delta = [0] * (n_steps + 1)
    for s, e, b in zip(start, end, size):
        delta[s] += b
        delta[e + 1] -= b
    peak = cur = 0
    for d in delta[:n_steps]:
        cur += d
        peak = max(peak, cur)
    return peak, float(sum(problem.cpu[v] for v in seq))


def topological_peak(problem: RematProblem) -> int:
    """Peak of evaluating every node once in the fixed order, keeping values until last read."""
    return simulate_indexed(problem, list(range(problem.n)))[0]
