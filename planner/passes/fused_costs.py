"""Op seconds as TorchInductor runs them, for plans executed with
``kernels="inductor"``.

Requires: the costs pass (``OpCost.roofline_seconds``, ``bytes_read``). Read by
``translate`` when it builds a Problem for compiled runs; the Program's own costs
stay as eager runs them.

Why: a compiled run fuses the pointwise ops and reductions between two library
kernels (matmuls, convolutions, attention) into a few loops, so they cost about
their memory traffic, where an eager call may cost several times that (a ``tanh``
on a CPU: 1.4 ms against a 0.2 ms roofline). A recompute of such a chain fused
into its consumer's loop costs a pass over what the chain reads and its result,
not each op's traffic (TorchInductor's min-cut partitioner prices recomputation
the same way: fusible ops are nearly free to recompute, library kernels are not).
Pricing them as eager would make the solver recompute a convolution rather than
the BatchNorm + ReLU after it, or keep tensors a compiled run remakes for almost
nothing.

The estimate is a roofline: it is optimistic for compute-heavy pointwise chains
(the tanh-GELU's fused loop measured 0.79 ms for a 0.2 ms roofline on the
2-core machine these were written on) and exact for none; measured compiled times
per op do not exist (a compiled run is timed as a whole).
"""

from __future__ import annotations

from planner.ir.program import Op, Program

#: Ops TorchInductor calls a library kernel for (never fused): their eager time is
#: their compiled time.
LIBRARY_KERNELS = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}
)
#: Name prefixes of the attention kernels, also library calls.
LIBRARY_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn")


def is_fusible(op: Op) -> bool:
    """Whether a compiled run fuses ``op`` into its neighbours' loops rather than
    calling a library kernel for it (random draws stay eager, never compiled)."""
    if op.draws_random:
        return False
    parts = op.target.split(".")
    name = parts[1] if len(parts) == 3 else op.target
    return name not in LIBRARY_KERNELS and not name.startswith(LIBRARY_PREFIXES)


def fused_step_seconds(op: Op) -> float:
    """Seconds of ``op`` in a compiled run: its roofline if fusible (never more
    than eager), else its eager time."""
    if is_fusible(op):
        return min(op.cost.seconds, op.cost.roofline_seconds)
    return op.cost.seconds


def fused_replay_seconds(
    program: Program, replayed: list[tuple[int, int]], memory_bandwidth: float
) -> float:
    """Seconds of replaying ``replayed`` (``(step, storage it remakes)``, the
    recomputed storage last) in a compiled run: library kernels as eager, the
    fusible ops as one loop that reads what it takes from outside itself and writes
    what leaves it (the recomputed tensor, or an input of a library kernel)."""
    values = program.values
    fused_made: set[int] = set()
    fused_reads: set[int] = set()
    library_reads: set[int] = set()
    seconds = 0.0
    for step, _ in replayed:
        op = program.ops[step]
        reads = {values[v].storage for v in op.inputs}
        if is_fusible(op):
            fused_reads |= reads - fused_made
            fused_made |= {values[v].storage for v in op.outputs if not values[v].is_view}
        else:
            seconds += op.cost.seconds
            library_reads |= reads
    written = (library_reads | {replayed[-1][1]}) & fused_made
    traffic = sum(program.storages[s].nbytes for s in fused_reads | written)
    return seconds + traffic / memory_bandwidth
