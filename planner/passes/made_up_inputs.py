"""Inputs for running one traced op on its own, and the outputs that must be real.

The workspace and timing passes run each distinct op call on random tensors of
its traced layouts. That is safe for an op whose inputs are plain data, but a
few kernels hand a buffer to their backward whose size and contents only they
know: on a CPU, ``mkldnn_rnn_layer`` (``nn.LSTM``'s forward) returns a
workspace the fake kernel traces as ``(0,)`` bytes, and its real one is
kilobytes. ``mkldnn_rnn_layer_backward`` given an empty buffer read past it and
crashed the process (a 2-layer LSTM of hidden 64, while planning).

So a producer's output whose storage comes out larger than its traced value
says (a kernel-sized buffer: ``Storage.kernel_sized``) is kept, and an op that
reads it is given that real output instead of a made-up one. Calls are keyed by
signature (one run stands for every call of that signature), so the consumer's
producer need not be the node that ran.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from planner.errors import CaptureError, listed
from planner.ir.grad_mode_ops import needs_grad_mode
from planner.ir.meta import fake_value, random_inputs
from planner.ir.program import Program, ValueKind

#: ops whose output is all of their input's buffer, as it is
_WHOLE_ALIASES = (torch.ops.aten.alias.default, torch.ops.aten.detach.default)


#: ops whose scratch grows with the bags that are not empty, by the position of
#: their ``bag_size`` argument: zeros (every bag empty) measured none, where the
#: max-mode backward copies the non-empty bags' rows and maximum indices (600 bytes
#: over a 3512-byte budget for an ``EmbeddingBag(20, 16, mode="max")``); every bag
#: holding one index is the most the kernel copies
_NONEMPTY_BAG_SIZES: dict[object, tuple[int, ...]] = {
    torch.ops.aten._embedding_bag_backward.default: (4,),
    torch.ops.aten._embedding_bag_dense_backward.default: (3,),
}


def signature(node: torch.fx.Node) -> str:
    """What makes two calls the same to run: the target, whether it runs with
    grad mode on (``planner.ir.grad_mode_ops``), and each argument's traced
    shape, strides, dtype and ``requires_grad`` (or its value)."""

    def describe(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            v = fake_value(x)
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype), v.requires_grad)
            return ("N", repr(v))
        return repr(x)

    described = pytree.tree_map(describe, (node.args, node.kwargs))
    return repr((str(node.target), needs_grad_mode(node), described))


def traced_storage_bytes(fake: torch.Tensor) -> int:
    """Bytes of the storage a traced value says its kernel allocates."""
    return int(fake.untyped_storage().nbytes())


class MadeUpInputs:
    """Random inputs for one op at a time, with real outputs of earlier calls
    standing in where a kernel sized a buffer its traced value does not show.
    Call ``inputs`` then ``ran`` for each op, producers before their readers
    (graph order)."""

    def __init__(self) -> None:
        #: (producer's signature, output position) -> the real output
        self._kernel_sized: dict[tuple[str, int], torch.Tensor] = {}
        #: their producers' ops: a reader of any other op's output needs no signature
        self._producers: set[Any] = set()

    def inputs(
        self, node: torch.fx.Node, device: str, nonnegative: bool = False
    ) -> tuple[tuple, dict]:
        args, kwargs = random_inputs(node, device, given=self._given, nonnegative=nonnegative)
        for position in _NONEMPTY_BAG_SIZES.get(node.target, ()):
            if position < len(args) and isinstance(args[position], torch.Tensor):
                args = (*args[:position], torch.ones_like(args[position]), *args[position + 1 :])
        return args, kwargs

    def ran(self, node: torch.fx.Node, result: Any) -> list[tuple[int, int]]:
        """Keep the outputs of ``node``'s call (``result``) that came out larger
        than traced. Returns, per tensor output in order, its storage's address
        and bytes (outputs in one storage share the address: what the call
        allocated is each address's bytes once)."""
        real = result if isinstance(result, (tuple, list)) else [result]
        fake = fake_value(node)
        fakes = fake if isinstance(fake, (tuple, list)) else [fake]
        storages = []
        for position, (r, f) in enumerate(zip(real, fakes)):
            if not isinstance(r, torch.Tensor):
                continue
            storage = r.untyped_storage()
            nbytes = int(storage.nbytes())
            storages.append((int(storage.data_ptr()), nbytes))
            if isinstance(f, torch.Tensor) and nbytes > traced_storage_bytes(f):
                self._kernel_sized[(signature(node), position)] = r
                self._producers.add(node.target)
        return storages

    def _given(self, x: torch.fx.Node) -> torch.Tensor | None:
        if not self._kernel_sized:  # (every argument of every op asks)
            return None
        while x.target in _WHOLE_ALIASES and isinstance(x.args[0], torch.fx.Node):
            x = x.args[0]  # the same buffer, passed on (a detach)
        producer, position = x, 0
        if x.target is operator.getitem and isinstance(x.args[0], torch.fx.Node):
            producer, position = x.args[0], int(x.args[1])  # type: ignore[arg-type]
        if producer.target not in self._producers:
            return None
        return self._kernel_sized.get((signature(producer), position))


#: torch's checks of its arguments' dtypes and devices, made before it reads any
#: value: "mat1 and mat2 must have the same dtype, but got Double and Float"
#: (matmuls), "expected scalar type Double but found Float" (convolutions, bmm),
#: "mixed dtype (CPU): all inputs must share same datatype" (layer_norm), an
#: embedding's "Expected tensor for argument #1 'indices' to have one of the
#: following scalar types", "\"GeluKernelImpl\" not implemented for 'Long'",
#: "Expected all tensors to be on the same device"
_DTYPE_OR_DEVICE_CHECK = re.compile(
    r"same dtype|scalar type|mixed dtype|same datatype|Found dtype|"
    r"not implemented for '|should be the same|same device|to be on the same"
)


class OpCannotRun(Exception):
    """``node`` failed on made-up inputs of its traced dtypes, whatever their
    values: the planned program cannot run it either (``error``: torch's)."""

    def __init__(self, node: torch.fx.Node, error: Exception) -> None:
        super().__init__(str(error))
        self.node = node
        self.error = error

    @staticmethod
    def for_its_dtypes(error: Exception) -> bool:
        """Whether torch refused the op's arguments' dtypes or devices (not their
        values: an index out of range, a negative probability)."""
        return isinstance(error, (RuntimeError, TypeError)) and bool(
            _DTYPE_OR_DEVICE_CHECK.search(str(error))
        )


def _dtypes(program: Program, kinds: tuple[ValueKind, ...]) -> list[str]:
    return sorted({v.dtype for v in program.values if v.kind in kinds})


def refuse_an_op_that_cannot_run(program: Program, op_index: int, error: Exception) -> CaptureError:
    """The error for op ``op_index`` of ``program``, which torch refused to run
    on its traced dtypes (``error``): eager raises it too, but torch's trace does
    not check dtypes, and every call of a plan raised it instead."""
    op = program.ops[op_index]
    where = f" at {op.stack}" if op.stack else ""
    given = ", ".join(
        f"{program.values[v].dtype} {list(program.values[v].shape)}" for v in op.inputs
    )
    inputs = _dtypes(program, (ValueKind.INPUT,))
    # the parameters' dtypes (a BatchNorm's int64 step counter is no parameter:
    # "the model's parameters are float32, int64" sent users looking for one);
    # a model without any: its buffers'
    params = _dtypes(program, (ValueKind.PARAM,))
    buffers = _dtypes(program, (ValueKind.BUFFER,))
    torch_says = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    ours = f"here {listed(inputs) or 'none'}"
    if params:
        ours += f"; the model's parameters are {listed(params)}"
    elif buffers:
        ours += f"; the model's buffers are {listed(buffers)}"
    return CaptureError(
        f"the model does not run on these example inputs: {op.name} ({op.target}{where}, "
        f"given {given}) fails with torch's {type(error).__name__}: {torch_says}. Check "
        f"the example inputs' dtypes ({ours}) and devices: call the model on them "
        f"eagerly first, and give it inputs it takes (x.float(), or convert the model: "
        f"model.double()). If they already match, the forward itself mixes dtypes "
        f"there: convert one side (t.to(x.dtype))"
    )
