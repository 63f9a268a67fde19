"""Workspace: bytes an op allocates for itself beyond its outputs, measured.

Requires: a built Program and its FX graph. Ensures: ``Op.workspace_bytes``.

The graph cannot show an op's scratch memory (a convolution on the CPU converts
its input and output to a blocked layout; attention kernels keep tiles), yet the
budget covers it. No formula predicts it across backends, so we measure it once
per distinct call signature on the device we will run on: each op runs on
random tensors of its traced shapes inside one profiler session, and its
workspace is the peak of its own allocations minus what it still holds at the end
(its outputs). Ops whose outputs are all views allocate nothing and are skipped.

The same run checks the outputs' sizes: a kernel may allocate an output larger
than its traced shape says (on a CPU, ``_embedding_bag``'s ``offset2bag`` holds
one element more than the fake kernel's, 8 bytes the meter saw and the plan did
not). Such an output's storage is planned at the size the kernel allocates, and
marked kernel-sized: its readers run on that real output, not a made-up one
(``planner.passes.made_up_inputs``).

It is also the first time the planner runs the model's ops for real: the traced
graph does not check dtypes (torch's fake kernels give ``linear`` of a float64
input and float32 weights a float64 output), so an op that cannot take its
traced dtypes fails here, on every try, where an op refusing made-up values
(``multinomial``'s negative probabilities) is retried or left unmeasured. Such an
op is refused at planning time (``refuse_an_op_that_cannot_run``): a float64
batch for a float32 model planned, even reported BudgetTooSmall, and every call
of the planned module raised torch's bare "mat1 and mat2 must have the same
dtype".
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from planner.alloc_trace import allocations, find_events, peak_and_final, profile_allocations
from planner.ir.build import allocated_bytes
from planner.ir.grad_mode_ops import as_run
from planner.ir.meta import FX_NODE_NAMES
from planner.ir.program import Program
from planner.passes.made_up_inputs import (
    MadeUpInputs,
    OpCannotRun,
    refuse_an_op_that_cannot_run,
    signature,
)

log = logging.getLogger(__name__)

_MARK = "planner.workspace#"


def annotate_workspace(
    program: Program, graph_module: torch.fx.GraphModule, device: str = "cpu"
) -> None:
    signature_of, calls = distinct_calls(program, graph_module)
    if not calls:
        return
    keys = list(calls)
    output_bytes: dict[str, list[tuple[int, int]]] = {}
    made_up = MadeUpInputs()

    def run_each() -> None:
        for i, sig in enumerate(keys):
            output_bytes[sig] = _run_marked(calls[sig], f"{_MARK}{i}", device, made_up)

    try:
        _, events = profile_allocations(run_each)
    except OpCannotRun as failed:
        op_index = next(i for i, sig in signature_of.items() if calls[sig] is failed.node)
        raise refuse_an_op_that_cannot_run(program, op_index, failed.error) from failed.error
    workspace: dict[int, int] = {}
    for event in find_events(events, _MARK):
        peak, final = peak_and_final(allocations([event], device))
        # a call retried on other inputs (``_run_marked``) has two blocks: the larger
        i = int(event.name[len(_MARK) :])
        workspace[i] = max(workspace.get(i, 0), peak - final)
    index = {sig: i for i, sig in enumerate(keys)}
    for op_index, sig in signature_of.items():
        program.ops[op_index].workspace_bytes = workspace.get(index[sig], 0)
        _grow_to_allocated(program, op_index, output_bytes.get(sig, []), torch.device(device))


def _grow_to_allocated(
    program: Program, op_index: int, allocated: list[tuple[int, int]], device: torch.device
) -> None:
    """Plan each output storage the op makes at least at the bytes its kernel
    allocated for the outputs in it (``allocated``: per tensor output, in the
    op's output order, its real storage's address and bytes). The fake kernel
    can alias outputs the real one makes apart: ``mkldnn_rnn_layer_backward``
    traces its two bias gradients as one tensor and returns two (512 bytes each
    for an LSTM of hidden size 32, a plan 512 bytes over its budget). Where the
    kernel shares one buffer between outputs the trace keeps apart, each is
    planned at that whole buffer (it lives while either does)."""
    op = program.ops[op_index]
    if len(allocated) != len(op.outputs):
        return
    made: dict[int, dict[int, int]] = {}  # storage the op makes -> its real buffers
    for vi, (address, nbytes) in zip(op.outputs, allocated):
        s = program.values[vi].storage
        if program.storages[s].base in op.outputs:  # not a view of an input
            made.setdefault(s, {})[address] = allocated_bytes(nbytes, device)
    for s, buffers in made.items():
        nbytes = sum(buffers.values())
        storage = program.storages[s]
        if nbytes > storage.nbytes:
            storage.nbytes = nbytes
            storage.kernel_sized = True


def distinct_calls(
    program: Program, graph_module: torch.fx.GraphModule
) -> tuple[dict[int, str], dict[str, torch.fx.Node]]:
    """The ops worth running to measure: ATen calls that allocate (not views),
    keyed by call signature so that repeated layers run once. Returns each such op's
    signature, and one FX node per signature."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    signature_of: dict[int, str] = {}
    calls: dict[str, torch.fx.Node] = {}
    for op, name in zip(program.ops, program.meta[FX_NODE_NAMES]):
        node = nodes[name]
        if not op.outputs or all(program.values[v].is_view for v in op.outputs):
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        sig = signature(node)
        signature_of[op.index] = sig
        calls.setdefault(sig, node)
    return signature_of, calls


def _run_marked(
    node: torch.fx.Node, mark: str, device: str, made_up: MadeUpInputs
) -> list[tuple[int, int]]:
    """Run one op on random inputs inside a named profiler block. Its outputs
    are still referenced when the block closes, so they count as held, not as
    workspace. Returns each tensor output's storage address and bytes (in output
    order; empty if the op did not run)."""
    from torch.profiler import record_function

    # normal floats first; an op that refuses negative values (multinomial's
    # probabilities: unmeasured, its 404 bytes of scratch went over a 3030-byte
    # budget) gets floats in [0, 1) instead
    error: Exception | None = None
    for nonnegative in (False, True):
        try:
            args, kwargs = made_up.inputs(node, device, nonnegative=nonnegative)
        except Exception as exc:  # unusual argument types: assume no workspace
            log.debug("workspace: cannot build inputs for %s: %s", node.format_node(), exc)
            return []
        try:
            with torch.no_grad(), record_function(mark):
                result = as_run(node)(*args, **kwargs)
        except Exception as exc:
            log.debug("workspace: %s failed on random inputs: %s", node.format_node(), exc)
            error = exc
            continue
        return made_up.ran(node, result)
    if error is not None and OpCannotRun.for_its_dtypes(error):  # on any values
        raise OpCannotRun(node, error)
    return []
