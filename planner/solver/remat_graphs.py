"""Small factories of rematerialization test graphs (shared by tests and benchmarks).

Each returns a networkx DiGraph whose nodes carry ``cost_cpu`` and ``cost_ram``.
They live in the package, not in tests/, so the benchmark and the tests build the
very same instances from a size and a seed.
"""

from __future__ import annotations

import random

import networkx as nx


def _node(g: nx.DiGraph, name: str, cpu: float, ram: int) -> str:
    g.add_node(name, cost_cpu=float(cpu), cost_ram=int(ram))
    return name


def chain_graph(n: int, backward: bool = True, cpu: float = 1.0, ram: int = 1024) -> nx.DiGraph:
    """A chain of n forward ops; with ``backward`` also the gradient chain reading each f_i.

    The training chain is where checkpoint-every-k (Chen et al.) applies: b_i reads
    f_i and b_{i+1}, so keeping every activation costs O(n) memory.
    """
    g = nx.DiGraph()
    prev = None
    for i in range(n):
        _node(g, f"f{i}", cpu, ram)
        if prev is not None:
            g.add_edge(prev, f"f{i}")
        prev = f"f{i}"
    if backward:
        for i in reversed(range(n)):
            _node(g, f"b{i}", 2 * cpu, ram)
            g.add_edge(f"f{i}", f"b{i}")
            if prev is not None:
                g.add_edge(prev, f"b{i}")
            prev = f"b{i}"
    return g


def diamond_graph(k: int, width: int = 2, ram: int = 1024) -> nx.DiGraph:
    """k stacked diamonds: a fan-out of ``width`` branches that join again."""
    g = nx.DiGraph()
    top = _node(g, "in", 1.0, ram)
    for d in range(k):
        branches = [_node(g, f"d{d}_b{b}", 1.0 + b, ram * (1 + b)) for b in range(width)]
        join = _node(g, f"d{d}_join", 1.0, ram)
        for b in branches:
            g.add_edge(top, b)
            g.add_edge(b, join)
        top = join
    return g


def unet_graph(
    levels: int, blocks: int = 1, backward: bool = False, ram: int = 1 << 16
) -> nx.DiGraph:
    """A U-Net: an encoder path, a decoder path, and a skip edge per level.

    Resolution halves per level, so activations shrink and compute drops with depth;
    the long skip edges keep early, large activations alive across the whole graph.
    """
    g = nx.DiGraph()
    prev = _node(g, "input", 1.0, ram)
    skips = []
    for lvl in range(levels):
        size = max(1, ram >> lvl)
        for b in range(blocks):
            cur = _node(g, f"enc{lvl}_{b}", 2.0 + b, size)
            g.add_edge(prev, cur)
            prev = cur
        skips.append(prev)
    for lvl in reversed(range(levels)):
        size = max(1, ram >> lvl)
        for b in range(blocks):
            cur = _node(g, f"dec{lvl}_{b}", 2.0 + b, size)
            g.add_edge(prev, cur)
            if b == 0:
                g.add_edge(skips[lvl], cur)
            prev = cur
    if backward:
        _add_backward(g)
    return g


def unet_of_size(n: int, seed: int = 0) -> nx.DiGraph:
    """A U-Net training graph (forward + backward) with about n nodes.

    Forward-only U-Nets have no slack (a decoder node with its skip input is the
    peak), so the backward pass is what makes rematerialization matter.
    """
    levels = max(2, min(8, int((n / 2) ** 0.5 / 2)))
    blocks = max(1, n // (4 * levels) - 1)
    g = unet_graph(levels, blocks, backward=True)
    rng = random.Random(seed)
    for v in g.nodes:
        g.nodes[v]["cost_cpu"] = float(g.nodes[v]["cost_cpu"]) * rng.uniform(0.5, 1.5)
    return g


def _add_backward(g: nx.DiGraph) -> None:
    """Append a reverse-mode gradient node per forward node (reads its forward value)."""
    fwd = list(nx.topological_sort(g))
    for v in reversed(fwd):
        gv = _node(g, f"grad_{v}", 2 * g.nodes[v]["cost_cpu"], g.nodes[v]["cost_ram"])
        g.add_edge(v, gv)
        for w in list(g.successors(v)):
            if not str(w).startswith("grad_"):
                g.add_edge(f"grad_{w}", gv)


def layered_dag(
    n: int,
    seed: int = 0,
    mean_width: int = 8,
    p_prev: float = 0.25,
    p_skip: float = 0.02,
    max_skip: int = 4,
) -> nx.DiGraph:
    """A random layered DAG in the style of Gagrani et al. (Neural Topological Ordering
    for Computation Graphs, 2022, Appendix A): layers of random width; each node takes
    edges from the previous layer with probability ``p_prev`` (at least one) and from up
    to ``max_skip`` earlier layers with probability ``p_skip``; random compute costs and
    output sizes. Every node outside the last layer has a successor (real networks
    have few outputs; dangling nodes would all have to stay resident to the end).
    """
    rng = random.Random(seed)
    g = nx.DiGraph()
    layers: list[list[str]] = []
    count = 0
    while count < n:
        width = min(n - count, rng.randint(1, 2 * mean_width - 1))
        layer = []
        for _ in range(width):
            name = _node(g, f"v{count}", rng.uniform(1.0, 10.0), rng.randint(1, 64) * 1024)
            count += 1
            if layers:
                prev = layers[-1]
                chosen = [u for u in prev if rng.random() < p_prev] or [rng.choice(prev)]
                for u in chosen:
                    g.add_edge(u, name)
                for back in layers[-1 - max_skip : -1]:
                    for u in back:
                        if rng.random() < p_skip:
                            g.add_edge(u, name)
            layer.append(name)
        if layers:  # nodes of the previous layer that nobody reads feed one node here
            for u in layers[-1]:
                if g.out_degree(u) == 0:
                    g.add_edge(u, rng.choice(layer))
        layers.append(layer)
    return g
