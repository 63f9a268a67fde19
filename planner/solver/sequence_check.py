"""Independent validator of rematerialization sequences.

Deliberately shares no code with the solvers (no RematProblem, no indexing): it
replays the sequence on the networkx graph itself, so a bug in the solvers'
accounting cannot hide in a shared helper.

Semantics replayed: a node runs only if every predecessor has been evaluated
before (its latest copy is then resident, because a copy lives until its last
read); a copy lives from its evaluation to its last read before the node is
evaluated again; the final copy of a node without successors lives to the end;
memory at a step = bytes of live copies, the one being produced included.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import networkx as nx

from planner.errors import InvalidPlan


@dataclass(frozen=True)
class SequenceStats:
    """What a replay measured."""

    peak_bytes: int
    cost: float
    steps: int
    recomputations: int
    peak_step: int


def check_sequence(
    G: nx.DiGraph, seq: Sequence[Hashable], budget_bytes: int | None = None
) -> SequenceStats:
    """Replay ``seq`` on ``G``; raise InvalidPlan naming the first offending step."""
    # copies: [node, first step, last step]
    copies: list[list] = []
    latest: dict[Hashable, int] = {}
    for step, v in enumerate(seq):
        if v not in G:
            raise InvalidPlan(f"step {step}: {v!r} is not a node of the graph")
        for u in G.predecessors(v):
            c = latest.get(u)
            if c is None:
                raise InvalidPlan(
                    f"step {step}: {v!r} reads {u!r}, which is not resident "
                    "(never evaluated before this step)"
                )
            copies[c][2] = step
        latest[v] = len(copies)
        copies.append([v, step, step])
    missing = [v for v in G.nodes if v not in latest]
    if missing:
        raise InvalidPlan(
            f"step {len(seq)} (end): {len(missing)} node(s) never evaluated, e.g. {missing[0]!r}"
        )
    end = len(seq) - 1
    for v in G.nodes:
        if G.out_degree(v) == 0:
            copies[latest[v]][2] = end
    # memory per step by a sweep over copy start/end events
    change = [0] * (len(seq) + 1)
    for v, first, last in copies:
        size = int(G.nodes[v]["cost_ram"])
        change[first] += size
        change[last + 1] -= size
    peak, peak_step, live = 0, 0, 0
    for step in range(len(seq)):
        live += change[step]
        if budget_bytes is not None and live > budget_bytes:
            raise InvalidPlan(
                f"step {step}: evaluating {seq[step]!r} holds {live} B, over the budget "
                f"{budget_bytes} B"
            )
        if live > peak:
            peak, peak_step = live, step
    cost = float(sum(float(G.nodes[v]["cost_cpu"]) for v in seq))
    return SequenceStats(peak, cost, len(seq), len(seq) - G.number_of_nodes(), peak_step)
