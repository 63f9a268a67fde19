"""Which tensors may hold infinities or NaNs, read off the graph.

An additive attention mask is ``where(mask, 0.0, -inf)``: quantized, a row
holding -inf gets an infinite scale, and -inf / inf and 0 * inf come back NaN
(int8: 12 of 16 elements; int4: all). A GPT-2 training plan stored its mask as
int8 between the forward and the backward, and every gradient below that layer
was NaN, silently. So a tensor that may hold such values is never quantized.

A tensor may hold them when it is an input that held one when planned (a mask
buffer filled with -inf, an example input: ``planner.ir.nonfinite_sources``), when
its op was given an infinite or NaN constant (``Op.takes_nonfinite``), or when it
reads one that may, except through ops that make finite values of them: a softmax
(masked scores become zero probabilities) and attention, whose outputs are made
from those probabilities. Values that overflow at run time, and infinities in a
later call's inputs that the example inputs did not have, cannot be seen here.
"""

from __future__ import annotations

from planner.ir.meta import NONFINITE_SOURCES
from planner.ir.program import Program

#: op name parts whose outputs are finite whatever -inf their inputs hold
_FINITE_MAKERS = ("softmax", "scaled_dot_product", "attention")


def may_hold_nonfinite(program: Program) -> set[int]:
    """The storages (``Program.storages`` indices) whose values may be infinite
    or NaN."""
    held = program.meta.get(NONFINITE_SOURCES, frozenset())
    values = {vi for vi in program.inputs if program.values[vi].source in held}
    for op in program.ops:  # in order: every input's producer comes first
        if any(part in op.target for part in _FINITE_MAKERS):
            continue
        if op.takes_nonfinite or any(vi in values for vi in op.inputs):
            values.update(op.outputs)
    return {program.values[vi].storage for vi in values}
