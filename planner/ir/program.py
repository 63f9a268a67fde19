"""The planner IR: ops in schedule order and the tensors (values) they read and write.

The IR is plain data, independent of FX, so that every later stage (passes, solver,
report) can read it without knowing how the model was captured. Views are modelled
explicitly: every value belongs to a *storage*, and a view shares its base's storage,
so bytes are counted once per storage, never per view.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class ValueKind(str, enum.Enum):
    """What a tensor is to the model; decides which options the solver may use."""

    PARAM = "param"
    BUFFER = "buffer"
    INPUT = "input"
    TANGENT = "tangent"  # incoming gradient of a model output (train mode)
    ACTIVATION = "activation"
    SAVED = "saved-for-backward"
    GRAD = "grad"
    OUTPUT = "output"


#: Kinds that exist before the first step, held by the module or the caller.
RESIDENT_KINDS = frozenset({ValueKind.PARAM, ValueKind.BUFFER, ValueKind.INPUT})


class Phase(str, enum.Enum):
    """Which half of a training step an op belongs to (inference is all forward)."""

    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass
class Value:
    """One tensor of the program.

    ``producer`` is the index of the op that writes it (None for graph inputs);
    ``uses`` the indices of the ops that read it, in schedule order.
    """

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    kind: ValueKind
    storage: int
    producer: int | None = None
    uses: list[int] = field(default_factory=list)
    is_view: bool = False
    source: str | None = None  # parameter / buffer FQN, or the input's pytree path
    contiguous: bool = True  # row-major dense layout (traced strides)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes this value's own elements span (what an op reads or writes)."""
        return self.numel * self.itemsize


@dataclass
class Storage:
    """A block of memory shared by a base value and all its views.

    ``live`` is filled by the lifetimes pass: the inclusive step interval during
    which the storage is resident in unplanned execution.
    """

    index: int
    nbytes: int
    values: list[int] = field(default_factory=list)
    live: tuple[int, int] | None = None
    #: its kernel allocated more than the traced value says (the workspace pass
    #: measured it: ``nbytes`` is the kernel's), so its contents may be a buffer
    #: only that kernel's readers understand, which made-up inputs cannot stand in
    #: for (``nn.LSTM``'s oneDNN workspace on a CPU)
    kernel_sized: bool = False
    #: a parameter's or buffer's slice of a larger storage the model holds (a
    #: window that is a view of one element more, flat parameter buffers): moving
    #: it frees nothing, so it stays put, and the first such slice of a storage is
    #: charged the bytes no slice covers (``planner.ir.build``)
    in_larger_storage: bool = False

    @property
    def base(self) -> int:
        """The value that owns the storage: the first one created."""
        return self.values[0]


@dataclass
class OpCost:
    """Filled by the costs pass."""

    flops: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    measured_seconds: float | None = None  # wall time measured on this machine, if any
    #: the roofline alone (compute or memory traffic, no launch overhead): what a
    #: fused kernel approaches, where an eager call may run slower (``tanh`` on a CPU)
    roofline_seconds: float = 0.0


@dataclass
class Op:
    """One step of the schedule: a call of an ATen op."""

    index: int
    name: str
    target: str  # e.g. "aten.addmm.default"
    inputs: list[int]
    outputs: list[int]
    phase: Phase = Phase.FORWARD
    stack: str | None = None  # the user's source line that produced the op, if known
    cost: OpCost = field(default_factory=OpCost)
    workspace_bytes: int = 0  # scratch the op allocates beyond its outputs (measured)
    #: whether a call draws random numbers (dropout): replaying it, or letting
    #: Inductor run it, would not give eager's numbers (``meta.draws_random``)
    draws_random: bool = False
    #: whether a non-tensor argument is infinite or NaN (``where(mask, 0, -inf)``):
    #: its outputs may hold such values (``passes.nonfinite``)
    takes_nonfinite: bool = False


@dataclass
class Program:
    """A captured model as the planner sees it.

    ``outputs`` are the values the program returns (for training: the forward
    outputs first, ``num_forward_outputs`` of them, then the gradients).
    """

    mode: str
    ops: list[Op]
    values: list[Value]
    storages: list[Storage]
    inputs: list[int]
    outputs: list[int]
    num_forward_outputs: int
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    def value(self, name: str) -> Value:
        for v in self.values:
            if v.name == name:
                return v
        raise KeyError(f"no value named {name!r} in the program")

    def storage_of(self, value: int) -> Storage:
        return self.storages[self.values[value].storage]

    def values_of_kind(self, *kinds: ValueKind) -> Iterator[Value]:
        return (v for v in self.values if v.kind in kinds)

    def storage_kind(self, storage: Storage) -> ValueKind:
        """A storage's kind is its base value's kind."""
        return self.values[storage.base].kind

    def makes_only_views(self, op: Op) -> bool:
        """Whether ``op`` only makes views (``detach``, ``view``, ``t``) of the
        storage it reads: it reads no data. An op that also takes another tensor
        (a ``type_as`` left whole reads one for its dtype) is not one: that tensor
        must be there when the op runs (see ``ir/metadata_args.py``)."""
        if not op.outputs or not all(self.values[v].is_view for v in op.outputs):
            return False
        viewed = {self.values[v].storage for v in op.outputs}
        return all(self.values[v].storage in viewed for v in op.inputs)

    def backward_start(self) -> int:
        """First backward step (``num_steps`` when there is no backward)."""
        for op in self.ops:
            if op.phase is Phase.BACKWARD:
                return op.index
        return self.num_steps
