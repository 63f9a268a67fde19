"""IR + device profile -> Problem: the one place the solver side reads the IR."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from planner.errors import PlannerValueError
from planner.ir.build import allocated_bytes
from planner.ir.meta import BUFFER_UPDATES, FROZEN_PARAMS, HOOKED_PARAMS, PARAM_GRADS
from planner.ir.program import Program, Value, ValueKind
from planner.passes.device_profile import DeviceProfile, free_memory_bytes
from planner.passes.fused_costs import fused_replay_seconds, fused_step_seconds, is_fusible
from planner.passes.nonfinite import may_hold_nonfinite
from planner.runtime import fused
from planner.solver.problem import DISK, HOST, Bandwidths, Problem, Recompute, Step, Tensor

#: Ops that may write their output into the buffer of their input at this position
#: when that input dies at the op (``out=`` aliasing it; bit-identical, see
#: tests/solver/test_reuse.py): each reads an element (softmax backwards: a
#: row, reduced before any write) before writing it. The fused cross-entropy
#: backward (``planner.ir.fused_loss``) writes into the saved log-softmax.
REUSE_INPUT = {
    "planner.log_softmax_nll_backward.default": 1,
    "aten._log_softmax_backward_data.default": 0,
    "aten._softmax_backward_data.default": 0,
    "aten.add.Tensor": 0,
    "aten.mul.Tensor": 0,
    "aten.gelu_backward.default": 0,
    "aten.threshold_backward.default": 0,
}

#: Ops that make a buffer's update and may write it into the buffer itself, at the
#: input in this position, when the buffer's old value is read for the last time
#: there (``out=`` aliasing it: each copies its input into ``out``, a no-op when
#: they are one tensor, then writes the new elements). A static key/value cache is
#: updated so at every decoding step (``index_copy``); functional, each step held
#: a second copy of every layer's cache and copied it back after the step.
UPDATE_IN_PLACE = {
    "aten.index_copy.default": 0,
    "aten.index_put.default": 0,
    "aten.slice_scatter.default": 0,
    "aten.select_scatter.default": 0,
    "aten.copy.default": 0,
}

#: Ops that read a tensor for its sign (ReLU's backward masks the gradient where
#: the saved output is zero): quantization rounds small positives to zero and
#: flips the mask, so tensors they read are never quantized.
_SIGN_READERS = ("aten.threshold_backward.default",)

#: Tensors smaller than this are pinned: moving them costs more in bookkeeping
#: than it saves, and pinning keeps the optimization model small.
MIN_MOVABLE_BYTES = 64 * 1024

#: What a ``quantize=`` mapping may name, and which tensor kinds each covers:
#: weights stored quantized, activations kept quantized on the device between
#: uses, and transfers (activations offloaded, and read back, quantized).
#: ``gradients`` widens the last two to the values a training step's backward
#: computes (gradients and their intermediates), which they otherwise leave alone.
QUANTIZE_KINDS = {
    "weights": (ValueKind.PARAM.value, ValueKind.BUFFER.value),
    "activations": (ValueKind.SAVED.value, ValueKind.ACTIVATION.value),
    "transfers": (ValueKind.SAVED.value, ValueKind.ACTIVATION.value),
    "gradients": (ValueKind.ACTIVATION.value,),
}

#: What a plain ``quantize="int8"`` allows: everything but the backward's values.
#: A gradient stream quantized loses far more than a saved activation does, since
#: every later gradient is computed from it: one int4 gradient of a random-weight
#: DINOv2 left a parameter's gradient at cosine 0.40 to eager's; leaving the
#: backward's values alone, its int4 plan at the same budget keeps all above 0.91
#: (ActNN and GACT compress saved activations only, for the same reason).
DEFAULT_QUANTIZE_USES = ("weights", "activations", "transfers")


def from_program(
    program: Program,
    budget_bytes: int,
    profile: DeviceProfile,
    quantize: str | dict[str, str] | None = None,
    min_movable_bytes: int = MIN_MOVABLE_BYTES,
    kernels: str = "eager",
) -> Problem:
    """``kernels``: how the executor will run the ops (see ``planner.plan``); with
    ``"inductor"`` fusible ops and recomputes are priced as compiled runs run
    them (``planner.passes.fused_costs``)."""
    returned_storages = {program.values[v].storage for v in program.outputs}
    compiled = kernels == "inductor"
    fused_bandwidth = profile.memory_bandwidth if compiled else None
    updates = buffer_updates(program)
    steps = [
        Step(
            op.index,
            op.name,
            fused_step_seconds(op) if compiled else op.cost.seconds,
            op.workspace_bytes,
            reuse=_reused_input(program, op.index, returned_storages)
            or updated_in_place(program, op.index, updates),
            source=op.stack,
        )
        for op in program.ops
    ]
    # a buffer whose update takes over its memory ends there; the update, in the
    # buffer's memory, is pinned unless the buffer may have a home (below): moved
    # away, the model would still hold its bytes
    in_place = {s.reuse for s in steps if s.reuse and s.reuse[0] in updates.values()}
    written_in_place = {buffer for buffer, _ in in_place}
    in_the_buffer = {update for _, update in in_place}
    fmt, kinds, lossy_uses = _quantize_spec(quantize)
    nonfinite = may_hold_nonfinite(program) if fmt else set()
    # tiny tensors stay put: moving them costs more bookkeeping than it saves
    # (scaled to the program, not the budget, so the same model always yields the
    # same problem and a reported min_budget stays plannable)
    total = sum(s.nbytes for s in program.storages)
    min_movable = max(4096, min(min_movable_bytes, total // 4096))
    # A buffer updated in place (a key/value cache) may live off the device between
    # calls, as a weight does (FlexGen offloads its cache): fetched before the step
    # that writes the update into it, its update written back to its home
    # (``writes_home_of``: an ``index_copy``'s rows as the op makes them, else all
    # of it once read for the last time). Only where the update is
    # the buffer's own memory: another is a new tensor the caller copies in at the end.
    # Not a slice of a larger storage: it stays on the device (moved, it would free
    # nothing), so there is no home to write its update back to.
    homed_update_of = {
        buffer: update
        for buffer, update in in_place
        if program.storages[buffer].nbytes >= min_movable
        and not program.storages[buffer].in_larger_storage
    }
    home_written_by = {update: buffer for buffer, update in homed_update_of.items()}
    backward_start = program.backward_start()
    returned = {program.values[v].storage for v in program.outputs}
    # Training: the forward's outputs are handed to the caller when the forward
    # ends, and the caller holds them through the backward (the loss is computed
    # from them), so they stay where they are made: a plan that moved one away
    # after it was made would have nothing to return (a Llama's 512 KiB logits
    # were offloaded after the last forward op and read back at the end).
    handed_over = (
        {program.values[v].storage for v in program.outputs[: program.num_forward_outputs]}
        if program.mode == "train"
        else set()
    )
    names = storage_names(program)
    updated_buffers = set(program.meta.get(BUFFER_UPDATES, ()))
    frozen = program.meta.get(FROZEN_PARAMS, frozenset())
    # Training: parameters get a home tier like inference weights (ZeRO-Offload's
    # idea): the model's parameter becomes the tier's copy (a file-backed map, or on
    # CUDA a pinned host buffer), which the optimizer updates in place. Their
    # gradients may be delivered as soon as they are made (ZeRO-Offload's gradient
    # offload): on a CPU device into a file-backed .grad; on CUDA, where a .grad
    # lives on its parameter's device, to host memory, only for a parameter whose
    # home is a tier (``delivery_needs_home_of``); the others return at the end.
    deliver = program.mode == "train"
    grad_storages = _deliverable_grads(program) if deliver else set()
    on_cuda = profile.device_type != "cpu"
    param_of_grad = _movable_grad_params(program, min_movable) if deliver and on_cuda else {}
    view_steps = _view_steps(program)
    uses_of = [
        sorted({u for vi in s.values for u in program.values[vi].uses} - view_steps)
        for s in program.storages
    ]
    last_use = [u[-1] if u else -1 for u in uses_of]
    tensors = []
    for storage in program.storages:
        base = program.values[storage.base]
        kind = base.kind
        uses = uses_of[storage.index]
        if base.producer is not None:
            appears_at, by_op = base.producer, True
        elif kind is ValueKind.TANGENT:
            appears_at, by_op = min(backward_start, max(program.num_steps - 1, 0)), False
        else:
            appears_at, by_op = 0, False
        weight = kind in (ValueKind.PARAM, ValueKind.BUFFER)
        # Training: the autograd engine holds the tangents for the whole backward, and
        # buffers (BatchNorm statistics) are updated in place after the step, so
        # neither leaves the device; nor, in inference, does a buffer each call
        # updates (a BatchNorm left in training mode: 1280 running means of a
        # MobileNet were given a home on disk, where no update could reach them),
        # or a parameter it writes in place (weight clipping, nn.Embedding's
        # max_norm: homed on disk, the call's update had nowhere to go).
        # Parameters (and inference weights) have a home.
        stays_on_device = (
            weight
            and (
                (kind is ValueKind.BUFFER and program.mode == "train")
                or base.source in updated_buffers
            )
            and storage.index not in homed_update_of
        )
        persistent = weight and not stays_on_device
        writes_home_of = home_written_by.get(storage.index)
        pinned = (
            kind in (ValueKind.INPUT, ValueKind.TANGENT)
            or stays_on_device
            or storage.index in handed_over
            # a weight the forward returns ends the call resident, which a home off
            # the device cannot (the smallest-budget search's replay once failed
            # on one: "'second.weight' (home disk) is still on the device")
            or (weight and storage.index in returned)
            or (storage.index in in_the_buffer and writes_home_of is None)
            or storage.nbytes < min_movable
            or storage.in_larger_storage  # moved, it would free nothing
        )
        caller_held = kind in (ValueKind.INPUT, ValueKind.TANGENT) or stays_on_device
        floating = base.dtype.startswith(("float", "bfloat"))
        computed_by_backward = (
            program.mode == "train"
            and kind is ValueKind.ACTIVATION
            and appears_at >= backward_start
        )
        quantizable = (
            bool(fmt)
            and floating
            and kind.value in kinds
            and (not computed_by_backward or "gradients" in lossy_uses)
            and not pinned
            # written into in place each call: never held as codes
            and storage.index not in homed_update_of
            and writes_home_of is None
            # a parameter being trained changes every step: never stored quantized
            # (a frozen one, a fine-tune's base, may be: QLoRA's idea)
            and not (program.mode == "train" and weight and base.source not in frozen)
            and not any(program.ops[u].target in _SIGN_READERS for u in uses)
            # codes cannot hold -inf: a quantized mask came back NaN
            and storage.index not in nonfinite
        )
        fused_uses = _fused_uses(program, storage.index, fmt) if quantizable and persistent else ()
        tensors.append(
            Tensor(
                index=storage.index,
                name=names[storage.index],
                nbytes=storage.nbytes,
                kind=kind.value,
                dtype=base.dtype,
                appears_at=appears_at,
                by_op=by_op,
                uses=tuple(uses),
                until_end=(storage.index in returned or caller_held)
                and storage.index not in written_in_place,
                persistent=persistent,
                pinned=pinned,
                recompute=(
                    _recompute_recipe(program, storage.index, last_use, fused_bandwidth)
                    if by_op and writes_home_of is None  # made from its buffer, now gone
                    else None
                ),
                quantizable=quantizable,
                last_dim=base.shape[-1] if base.shape else 1,
                fused_uses=fused_uses,
                fused_lookups=_lookup_rows(program, storage.index, fused_uses),
                deliverable=(
                    storage.index in grad_storages
                    and not pinned
                    and (not on_cuda or storage.index in param_of_grad)
                )
                or writes_home_of is not None,
                delivery_needs_home_of=param_of_grad.get(storage.index)
                if writes_home_of is None
                else (writes_home_of if on_cuda else None),
                writes_home_of=writes_home_of,
                write_back_bytes=written_rows_bytes(program, base.producer)
                if writes_home_of is not None and base.producer is not None
                else 0,
            )
        )
    if on_cuda:  # the rows are gathered on the device to go down to the host
        for tensor in tensors:
            if tensor.write_back_bytes:
                step = steps[tensor.appears_at]
                steps[tensor.appears_at] = dataclasses.replace(
                    step,
                    workspace_bytes=step.workspace_bytes
                    + gathered_rows_bytes(program, tensor.appears_at),
                )
    may_write = sum(t.nbytes for t in tensors if not t.pinned)
    disk = profile.disk_rates(may_write, free_memory_bytes())
    bandwidths = Bandwidths(
        disk_read=disk.read,
        disk_write=disk.write,
        host_to_device=profile.host_bandwidth,
        device_to_host=profile.host_bandwidth,
        memory=profile.memory_bandwidth,
        quantize=profile.quantize_throughput,
        dequantize=profile.dequantize_throughput,
        disk_read_latency=profile.disk_read_latency_seconds,
        disk_write_latency=profile.disk_write_latency_seconds,
        copy_compute_share=profile.compute_lost_to_copies,
        copy_issue=profile.copy_issue_seconds,
        disk_read_work=disk.read_work,
    )
    return Problem(
        mode=program.mode,
        steps=steps,
        tensors=tensors,
        budget_bytes=int(budget_bytes),
        bandwidths=bandwidths,
        tiers=(HOST, DISK) if profile.has_host_tier else (DISK,),
        quantize=fmt,
        quantize_kinds=tuple(sorted(kinds)),
        quantize_uses=tuple(sorted(lossy_uses)),
        meta={"backward_start": backward_start, "disk_rates": disk.reason},
    )


def _view_steps(program: Program) -> set[int]:
    """Steps whose op only makes views (``detach``, ``view``, ``t``): they read no
    data, so they are not uses that need the storage on the device. The executor
    makes such a view where the op stands if its storage is there, else when the
    view is first read (AOTAutograd's ``detach`` of each saved ReLU output at the
    end of the forward would otherwise hold every one of them until then)."""
    return {op.index for op in program.ops if program.makes_only_views(op)}


def _reused_input(program: Program, step: int, returned: set[int]) -> tuple[int, int] | None:
    """(input storage, output storage) if op ``step`` can write its output into
    that input's buffer: the input is an op's dense output of the same shape and
    dtype (or a view of all of one, as ``detach`` makes: the joint graph passes
    the saved log-softmax to the backward through two), read for the last time
    here, by no other argument, and not returned. The test is on the storage's
    base: a view has a producer of its own (the ``detach``), also over the memory
    of an input, parameter or buffer, which no op may take over."""
    operands = _input_and_output(program, step, REUSE_INPUT)
    if operands is None:
        return None
    vin, vout = operands
    if (
        program.values[program.storages[vin.storage].base].producer is None
        or vin.storage in returned
        or vin.storage == vout.storage
        or not _may_write_into(program, step, vin, vout)
    ):
        return None
    return vin.storage, vout.storage


def _input_and_output(
    program: Program, step: int, positions: dict[str, int]
) -> tuple[Value, Value] | None:
    """(the input at the position ``positions`` gives op ``step``'s target, its one
    output), or None: another op, several outputs, or no input there."""
    op = program.ops[step]
    position = positions.get(op.target)
    if position is None or len(op.outputs) != 1 or position >= len(op.inputs):
        return None
    return program.values[op.inputs[position]], program.values[op.outputs[0]]


def _may_write_into(program: Program, step: int, vin: Value, vout: Value) -> bool:
    """Whether op ``step`` may write its output ``vout`` into the buffer of its
    input ``vin``: ``vin`` is all of that buffer, laid out as ``vout``, read for
    the last time here, by this argument alone."""
    source = program.storages[vin.storage]
    base = program.values[source.base]
    return not (
        (vin.is_view and not _whole_alias(vin, base))
        or vout.is_view
        or not (vin.contiguous and vout.contiguous)
        or (vin.shape, vin.dtype) != (vout.shape, vout.dtype)
        or source.nbytes != program.storages[vout.storage].nbytes
        or sum(program.values[v].storage == vin.storage for v in program.ops[step].inputs) != 1
        or max(u for v in source.values for u in program.values[v].uses) != step
    )


def buffer_updates(program: Program) -> dict[int, int]:
    """Inference: the storage of each buffer's update (a forward output) -> the
    buffer's storage. Not in training, where the updates (BatchNorm statistics)
    are made beside autograd's saved values and left to the functional form."""
    if program.mode != "infer":
        return {}
    names = program.meta.get(BUFFER_UPDATES, ())
    buffer_of = {
        program.values[s.base].source: s.index
        for s in program.storages
        if program.values[s.base].kind is ValueKind.BUFFER
    }
    out = {}
    for name, v in zip(names, program.outputs):
        if name in buffer_of:
            out[program.values[v].storage] = buffer_of[name]
    return out


def updated_in_place(
    program: Program, step: int, updates: dict[int, int]
) -> tuple[int, int] | None:
    """(buffer storage, update storage) if op ``step`` makes a buffer's update from
    the buffer (``UPDATE_IN_PLACE``) and may write it into the buffer: the buffer is
    read for the last time here, by this argument alone, all of it, laid out as
    the update, which the step returns once (as the update, not also to the
    caller)."""
    operands = _input_and_output(program, step, UPDATE_IN_PLACE)
    if operands is None:
        return None
    vin, vout = operands
    if (
        updates.get(vout.storage) != vin.storage
        or sum(program.values[v].storage == vout.storage for v in program.outputs) != 1
        or not _may_write_into(program, step, vin, vout)
    ):
        return None
    return vin.storage, vout.storage


#: Updates whose rows the executor writes back alone: op target ->
#: (position of the dim argument, of the index) in the op's arguments
ROWS_WRITTEN = {"aten.index_copy.default": (1, 2)}


def written_rows_bytes(program: Program, step: int) -> int:
    """Bytes of the rows op ``step`` writes into a buffer's update (its source),
    for an op in ``ROWS_WRITTEN``; 0 (the whole update) for any other."""
    op = program.ops[step]
    if op.target not in ROWS_WRITTEN:
        return 0
    source = program.values[op.inputs[-1]]  # (self, index, source): the tensor args
    return source.nbytes


def gathered_rows_bytes(program: Program, step: int) -> int:
    """What ``CudaCopyEngine.write_rows`` allocates on the GPU at op ``step`` to
    send its rows down: the rows and an int64 copy of their positions, each a block
    of the allocator's (a 128-byte row and its one position hold 1 KiB, where the
    rows' bytes alone were charged)."""
    index = program.values[program.ops[step].inputs[-2]]  # (self, index, source)
    cuda = torch.device("cuda")
    rows = written_rows_bytes(program, step)
    return allocated_bytes(rows, cuda) + allocated_bytes(8 * index.numel, cuda)


def _whole_alias(view: Value, base: Value) -> bool:
    """Whether ``view`` is all of ``base``'s storage, laid out as ``base`` is."""
    return (
        not base.is_view
        and view.contiguous
        and base.contiguous
        and (view.shape, view.dtype) == (base.shape, base.dtype)
    )


def _deliverable_grads(program: Program) -> set[int]:
    """Storages holding exactly one returned value, a parameter's gradient, that
    nothing else returns and no op reads after that value is made (a view of an
    op's output, such as a transposed matmul result, may be the gradient). Not the
    gradient of a parameter with tensor hooks: only autograd runs them."""
    returned: dict[int, int] = {}
    for v in program.outputs:
        s = program.values[v].storage
        returned[s] = returned.get(s, 0) + 1
    hooked = program.meta.get(HOOKED_PARAMS, frozenset())
    out = set()
    for v, fqn in program.meta.get(PARAM_GRADS, {}).items():
        if fqn in hooked:
            continue
        value = program.values[v]
        storage = program.storages[value.storage]
        uses = [u for vi in storage.values for u in program.values[vi].uses]
        made = value.producer
        if returned[value.storage] == 1 and made is not None and all(u <= made for u in uses):
            out.add(value.storage)
    return out


def _movable_grad_params(program: Program, min_movable: int) -> dict[int, int]:
    """Each parameter gradient's storage -> its parameter's storage, for the
    parameters big enough to move (one pinned to the device keeps its gradient)."""
    param_storage = {
        program.values[s.base].source: s.index
        for s in program.storages
        if program.values[s.base].kind is ValueKind.PARAM and s.nbytes >= min_movable
    }
    out = {}
    for v, fqn in program.meta.get(PARAM_GRADS, {}).items():
        if fqn in param_storage:
            out[program.values[v].storage] = param_storage[fqn]
    return out


def storage_names(program: Program) -> dict[int, str]:
    """Each storage's name in plans and reports: its source (a parameter's name),
    ``grad of <parameter>`` for a parameter's gradient, else its value's name."""
    grads = {
        program.values[v].storage: f"grad of {fqn}"
        for v, fqn in program.meta.get(PARAM_GRADS, {}).items()
    }
    names: dict[int, str] = {}
    seen: set[str] = set()
    for storage in program.storages:
        base = program.values[storage.base]
        name = base.source or grads.get(storage.index) or base.name
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}#{n}"
        seen.add(candidate)
        names[storage.index] = candidate
    return names


def _fused_uses(
    program: Program, storage_index: int, fmt: str | None
) -> tuple[tuple[int, int], ...]:
    """Uses at which a weight stored quantized is read by a fused op (see
    ``planner.runtime.fused``): the op reads the whole storage (its base, or a tied
    weight's second name for it) once, at the op's weight position. Each comes with
    the fused op's scratch bytes."""
    storage = program.storages[storage_index]
    base = program.values[storage.base]
    if fmt is None or not base.contiguous:
        return ()  # a permuted weight's codes are in memory order (runtime.quant)
    out = []
    for step in sorted({u for v in storage.values for u in program.values[v].uses}):
        op = program.ops[step]
        position = fused.WEIGHT_POSITION.get(op.target)
        if position is None or not fused.fusable(op.target, base.shape, fmt):
            continue
        reads = [v for v in op.inputs if program.values[v].storage == storage_index]
        if len(reads) != 1 or op.inputs.index(reads[0]) != position:
            continue
        read = program.values[reads[0]]
        if read.index != base.index and (read.producer is not None or read.shape != base.shape):
            continue  # a view of part of it
        other = program.values[op.inputs[1 if position == 0 else position - 1]]
        rows = other.numel if position == 0 else other.numel // max(other.shape[-1], 1)
        temp = fused.temp_bytes(op.target, base.shape, rows, base.itemsize, fmt)
        out.append((step, temp))
    return tuple(out)


def _lookup_rows(
    program: Program, storage_index: int, fused_uses: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], ...]:
    """(step, bytes of the rows looked up) for the fused uses that are lookups."""
    base = program.values[program.storages[storage_index].base]
    out = []
    for step, _ in fused_uses:
        op = program.ops[step]
        if op.target == fused.LOOKUP:
            ids = program.values[op.inputs[1]]
            out.append((step, ids.numel * base.shape[-1] * base.itemsize))
    return tuple(out)


def _recompute_recipe(
    program: Program, storage_index: int, last_use: list[int], fused_bandwidth: float | None
) -> Recompute | None:
    """Replaying the producer remakes the storage if the op is deterministic and
    the storage is the producer's own output (not a view of one of its inputs).

    An input of the replay that is dead once the storage is made (``last_use``:
    each storage's last reading step) cannot be kept for it, so its producer is
    replayed first, and so on back to inputs that live on (``Recompute.chain``),
    at most ``MAX_REPLAYED_OPS`` ops. With ``fused_bandwidth`` (compiled runs) the
    replay is priced as one fused loop (``fused_replay_seconds``), and it also
    remakes inputs that live on if a fusible op makes them: a compiled run remakes
    a GELU's pieces from the matmul output in registers, so a plan need keep only
    that (TorchInductor's min-cut partitioner saves the same way)."""
    final = program.ops[program.values[program.storages[storage_index].base].producer]  # type: ignore[index]
    if final.draws_random:  # a replay would draw new numbers
        return None
    made_at = final.index
    chain: dict[int, int] = {}  # op index -> the storage it remakes
    leaves: set[int] = set()
    pending = [final.index]
    while pending:
        op = program.ops[pending.pop()]
        for s in sorted({program.values[v].storage for v in op.inputs}):
            if s == storage_index or s in leaves or s in chain.values():
                continue
            producer = _replayable_producer(
                program, s, made_at, last_use, fused=fused_bandwidth is not None
            )
            if producer is None or producer in chain or len(chain) + 1 >= MAX_REPLAYED_OPS:
                leaves.add(s)  # lives on (or cannot be replayed): read as it is
                continue
            chain[producer] = s
            pending.append(producer)
    replayed = [*sorted(chain.items()), (final.index, storage_index)]
    release = _chain_release(program, replayed)
    return Recompute(
        step=final.index,
        inputs=tuple(sorted(leaves)),
        seconds=(
            sum(program.ops[step].cost.seconds for step, _ in replayed)
            if fused_bandwidth is None
            else fused_replay_seconds(program, replayed, fused_bandwidth)
        ),
        extra_bytes=_replay_extra_bytes(program, replayed, release),
        chain=tuple(replayed[:-1]),
        release=release,
    )


#: Most ops one recompute replays (its producer and the dead tensors before it).
MAX_REPLAYED_OPS = 12


def _replayable_producer(
    program: Program, storage_index: int, made_at: int, last_use: list[int], fused: bool
) -> int | None:
    """The op that can remake ``storage_index`` inside a chain: made by a
    deterministic op, and dead by step ``made_at`` (nothing reads it later) or, for
    compiled runs (``fused``), made by an op they fuse."""
    base = program.values[program.storages[storage_index].base]
    if base.producer is None:
        return None
    producer = program.ops[base.producer]
    if producer.draws_random:
        return None
    if last_use[storage_index] > made_at and not (fused and is_fusible(producer)):
        return None
    return base.producer


def _own_bytes(program: Program, step: int) -> int:
    """Bytes op ``step`` allocates when it runs: its outputs that are not views,
    and its workspace."""
    op = program.ops[step]
    made = {program.values[v].storage for v in op.outputs if not program.values[v].is_view}
    return sum(program.storages[s].nbytes for s in made) + op.workspace_bytes


def _chain_release(
    program: Program, replayed: list[tuple[int, int]]
) -> tuple[tuple[int, ...], ...]:
    """For each replayed op, the chain storages whose last reader in the replay it
    is (the executor frees them right after it)."""
    last_reader: dict[int, int] = {}
    chain_storages = {s for _, s in replayed[:-1]}
    for position, (step, _) in enumerate(replayed):
        for v in program.ops[step].inputs:
            if program.values[v].storage in chain_storages:
                last_reader[program.values[v].storage] = position
    # grouped in one pass: a scan of every chain storage per position made this
    # quadratic in the chain's length (0.3 s of a 12-layer GPT-2 training plan)
    released: list[list[int]] = [[] for _ in replayed]
    for s, position in last_reader.items():
        released[position].append(s)
    return tuple(tuple(sorted(storages)) for storages in released)


def _replay_extra_bytes(
    program: Program, replayed: list[tuple[int, int]], release: tuple[tuple[int, ...], ...]
) -> int:
    """Bytes the replay holds beyond the recomputed tensor, at its fullest: chain
    tensors not yet released (``release``, from ``_chain_release``) plus what the
    running op allocates (its other outputs and workspace go when it returns)."""
    target = replayed[-1][1]
    held, extra = 0, 0
    for position, (step, kept) in enumerate(replayed):
        extra = max(extra, held + _own_bytes(program, step) - program.storages[target].nbytes)
        if kept != target:
            held += program.storages[kept].nbytes
        held -= sum(program.storages[s].nbytes for s in release[position])
    return extra


def _quantize_spec(
    quantize: str | dict[str, str] | None,
) -> tuple[str | None, set[str], set[str]]:
    """(format, tensor kinds that may be quantized, QUANTIZE_KINDS keys allowed)."""
    if quantize is None:
        return None, set(), set()
    if isinstance(quantize, str):
        _check_format(quantize)
        return (
            quantize,
            {k for use in DEFAULT_QUANTIZE_USES for k in QUANTIZE_KINDS[use]},
            set(DEFAULT_QUANTIZE_USES),
        )
    if not isinstance(quantize, Mapping):
        raise PlannerValueError(
            f"quantize={quantize!r}: use None, 'int8', 'int4' or a mapping of kinds to one "
            "format, e.g. {'weights': 'int8'}"
        )
    if not quantize:
        raise PlannerValueError(
            "quantize={}: name at least one kind, e.g. {'weights': 'int8'}, or pass None "
            "for a lossless plan"
        )
    for value in quantize.values():
        if not isinstance(value, str):
            raise PlannerValueError(
                f"quantize={quantize!r}: each kind takes a format, 'int8' or 'int4', not "
                f"{value!r}, e.g. {{'weights': 'int8'}}"
            )
    formats = set(quantize.values())
    if len(formats) != 1:
        raise PlannerValueError(
            "quantize: one format for all kinds for now, e.g. {'weights': 'int8'}"
        )
    fmt = formats.pop()
    _check_format(fmt)
    kinds: set[str] = set()
    for key in quantize:
        if key not in QUANTIZE_KINDS:
            raise PlannerValueError(f"quantize: unknown kind {key!r}; use {sorted(QUANTIZE_KINDS)}")
        kinds.update(QUANTIZE_KINDS[key])
    if "gradients" in quantize and not {"activations", "transfers"} & set(quantize):
        raise PlannerValueError(
            "quantize: 'gradients' widens 'activations' and 'transfers' to the backward's "
            "values; name one of them too, e.g. {'activations': 'int8', 'gradients': 'int8'}"
        )
    return fmt, kinds, set(quantize)


def _check_format(fmt: str) -> None:
    if fmt not in ("int8", "int4"):
        raise PlannerValueError(f"quantize={fmt!r}: use None, 'int8' or 'int4'")
