"""What the generated executor calls: ``rt.prefetch``, ``rt.offload``, ``rt.wait``,
``rt.quantize``, ``rt.dequantize``, ``rt.fused``. A thin layer over a copy engine, kept out of
the generated code so that code stays a readable list of steps."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from planner.runtime import fused
from planner.runtime.copy_engine import CopyEngine, Pending
from planner.runtime.quant import Quantized, dequantize, memory_order, quantize, restore


@dataclass(frozen=True)
class QuantizedLayout:
    """What a quantized tensor is, without its data (kept per offloaded key)."""

    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[str, ...]
    order: tuple[int, ...] | None = None


@dataclass
class QuantizedCopy:
    """The copies of a quantized tensor's parts, issued together; ``layout`` is
    set for reads (to rebuild the ``Quantized``), None for writes."""

    parts: dict[str, Pending]
    layout: QuantizedLayout | None
    #: a read weight's full copy that lookups gather exact rows from (see
    #: ``Quantized.exact_rows``)
    exact_rows: torch.Tensor | None = None


def _layout(q: Quantized) -> QuantizedLayout:
    return QuantizedLayout(q.fmt, q.shape, q.dtype, tuple(q.parts()), q.order)


class Runtime:
    def __init__(self, engine: CopyEngine, weights_of: Runtime | None = None) -> None:
        """``weights_of``: the runtime of another input shape's module over the same
        store (``PlannedModule(share_store_of=...)``): its tables of the weights
        written at plan time are shared (one store holds them once); what a run
        hands over (gradient deliveries) stays this plan's own."""
        self.engine = engine
        #: set by ``recording_errors``: where ``quantize`` records round-trip errors
        self.errors: dict[str, dict[str, float]] | None = None
        #: keys of weights that require grad in the model: read back as such, so ops
        #: take the same kernel path as eager (matmul's depends on it)
        self.grad_keys: set[str] = set()
        #: keys whose tier copy was written quantized: its layout, to read it back
        self._quantized_copies: dict[str, QuantizedLayout] = {}
        #: weights read quantized whose lookups gather exact rows: key -> full copy
        self.exact_rows: dict[str, torch.Tensor] = {}
        #: training: gradient key -> (its parameter, the file-backed buffer that
        #: becomes the parameter's .grad; None on CUDA, see ``deliver``)
        self.deliveries: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: CUDA: gradients on their way to the host: (parameter, host copy, copy)
        self.arriving: list[tuple[torch.Tensor, torch.Tensor, Pending]] = []
        #: this backward's gradients eager would leave None (``unreached_grads``):
        #: their deliveries hand nothing over
        self.undelivered: frozenset[str] = frozenset()
        if weights_of is not None:
            self.grad_keys = weights_of.grad_keys
            self._quantized_copies = weights_of._quantized_copies
            self.exact_rows = weights_of.exact_rows

    def prefetch(self, key: str, tier: str) -> Pending | QuantizedCopy:
        layout = self._quantized_copies.get(key)
        if layout is not None:
            parts = {p: self.engine.prefetch(f"{key}#{p}", tier) for p in layout.parts}
            return QuantizedCopy(parts, layout, self.exact_rows.get(key))
        pending = self.engine.prefetch(key, tier)
        pending.requires_grad = key in self.grad_keys
        return pending

    def read_now(self, key: str, tier: str) -> torch.Tensor | Quantized | None:
        """``wait(prefetch(key, tier))`` for a read the plan waits for at once."""
        if key in self._quantized_copies:
            return self.wait(self.prefetch(key, tier))
        tensor = self.engine.read_now(key, tier)
        return tensor.requires_grad_() if key in self.grad_keys else tensor

    def store_quantized_now(self, key: str, tier: str, q: Quantized) -> list[str]:
        """Write a weight's quantized copy to its home tier, once, at plan time
        (each part under a key of its own; returned): ``prefetch(key)`` then reads
        the codes."""
        keys = []
        for part, tensor in q.parts().items():
            keys.append(f"{key}#{part}")
            self.engine.store_now(keys[-1], tier, tensor)
        self._quantized_copies[key] = _layout(q)
        return keys

    def offload(
        self, key: str, tier: str, tensor: torch.Tensor | Quantized
    ) -> Pending | QuantizedCopy:
        if isinstance(tensor, Quantized):  # each part is a tensor of its own in the tier
            parts = {
                p: self.engine.offload(f"{key}#{p}", tier, t) for p, t in tensor.parts().items()
            }
            self._quantized_copies[key] = _layout(tensor)
            return QuantizedCopy(parts, None)
        self._quantized_copies.pop(key, None)
        return self.engine.offload(key, tier, tensor)

    def write_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        """``wait(offload(key, tier, tensor))`` for a write made at once (a full
        copy: quantized copies go through ``offload``)."""
        self._quantized_copies.pop(key, None)
        self.engine.write_now(key, tier, tensor)

    def write_rows(
        self, key: str, tier: str, tensor: torch.Tensor, dim: int, index: torch.Tensor
    ) -> None:
        """Write a buffer's update's new rows (``index`` along ``dim``) over the
        buffer's copy in its home tier, which holds the rest already."""
        self.engine.write_rows(key, tier, tensor, dim, index)

    def wait(self, pending: Pending | QuantizedCopy) -> torch.Tensor | Quantized | None:
        if isinstance(pending, QuantizedCopy):
            done = {p: self.engine.wait(part) for p, part in pending.parts.items()}
            if pending.layout is None:  # a write
                return None
            layout = pending.layout
            return Quantized(
                done["codes"],
                done["scale"],
                done.get("zero"),
                layout.fmt,
                layout.shape,
                layout.dtype,
                pending.exact_rows,
                layout.order,
            )
        tensor = self.engine.wait(pending)
        return tensor.requires_grad_() if pending.requires_grad else tensor

    def deliver(self, key: str, grad: torch.Tensor) -> Pending | None:
        """Hand a parameter its gradient now, as autograd's accumulation would at
        the end of the backward. On a CPU device: the first gradient is copied into
        the parameter's file-backed buffer, which becomes its ``.grad``; a later one
        is added to the existing ``.grad`` in place; the device copy can then be
        freed (returns None). On CUDA (the parameter lives on the host): the copy to
        host memory is started and returned, to ``wait`` for before the device copy
        is freed; ``finish_deliveries`` hands it to the parameter."""
        param, buffer = self.deliveries[key]
        if key in self.undelivered:  # nothing to wait for: the plan frees it after
            return None if buffer is not None else Pending(grad)
        if buffer is None:
            host, pending = self.engine.copy_to_host(key, grad)
            # the copy's own record, without the device gradient: the plan frees
            # that after its wait, long before the backward ends
            self.arriving.append((param, host, dataclasses.replace(pending, tensor=host)))
            return pending
        if not param.requires_grad:  # frozen since planning: eager gives it no .grad
            return None
        if param.grad is None:
            buffer.copy_(grad)
            param.grad = buffer
        else:
            param.grad += grad
        return None

    def finish_deliveries(self) -> None:
        """At the end of the backward (CUDA): wait for the gradients copied to the
        host and accumulate each into its parameter's ``.grad`` as autograd does:
        the first becomes it, copied out of the engine's buffer into ordinary
        memory in the parameter's strides (autograd's layout contract); a later one
        is added in place."""
        arriving, self.arriving = self.arriving, []
        for param, host, pending in arriving:
            self.engine.synchronize(pending)
            if not param.requires_grad:  # frozen since planning
                continue
            if param.grad is None:
                param.grad = torch.empty_like(param).copy_(host)
            else:
                param.grad += host

    @contextlib.contextmanager
    def recording_errors(self, errors: dict[str, dict[str, float]]) -> Iterator[None]:
        """Within the block, ``quantize`` records each named tensor's round-trip
        error in ``errors`` (a full-size temporary each: not for metered runs)."""
        self.errors = errors
        try:
            yield
        finally:
            self.errors = None

    def quantize(self, tensor: torch.Tensor, fmt: str, name: str | None = None) -> Quantized:
        """Triton kernels on CUDA, the torch reference elsewhere (they agree bit
        for bit on the codes; see tests/codegen/test_kernels.py)."""
        order = memory_order(tensor)
        source = tensor if order is None else tensor.permute(order)  # contiguous
        if tensor.is_cuda and _triton_ready(tensor.device):
            from planner.codegen import kernels

            q = kernels.quantize_int8(source) if fmt == "int8" else kernels.quantize_int4(source)
        else:
            q = quantize(source, fmt)
        q.order = order
        if self.errors is not None and name is not None:
            self.errors[name] = round_trip_error(tensor, self.dequantize(q))
        return q

    def fused(self, target: str, *args: object, **kwargs: object) -> torch.Tensor:
        """Op ``target`` with a weight argument stored quantized (a ``Quantized``),
        without materializing the full weight (see ``planner.runtime.fused``)."""
        return fused.call(target, *args, **kwargs)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        """The values, in the layout they were quantized from."""
        if q.codes.is_cuda and _triton_ready(q.codes.device):
            from planner.codegen import kernels

            fn = kernels.dequantize_int8 if q.fmt == "int8" else kernels.dequantize_int4
            return restore(q, fn(q))
        return restore(q, dequantize(q))


def round_trip_error(original: torch.Tensor, restored: torch.Tensor) -> dict[str, float]:
    """Relative L2 and largest absolute error of a quantize/dequantize round trip."""
    diff = restored.float() - original.float()
    return {
        "relative_l2": _norm(diff) / max(_norm(original.float()), 1e-30),
        # the largest magnitude by two reductions: diff.abs() was a second copy
        "max_abs": float(torch.maximum(diff.amax(), -diff.amin())) if diff.numel() else 0.0,
    }


def _norm(t: torch.Tensor) -> float:
    """The L2 norm of float32 ``t`` as a Python float. Where float32's sum of
    squares overflows (values near its largest: the report said a relative error
    of 0.0), the norm of ``t`` scaled by its largest magnitude, times it. Not in
    float64: a float64 copy of a weight, made on the device while a plan that saves
    its memory is made, took twice its bytes (and four times with the difference's)."""
    n = t.norm()
    if bool(torch.isfinite(n)):
        return float(n)
    scale = t.abs().amax()
    if not bool(torch.isfinite(scale)):
        return float("inf")  # a value is inf or NaN: the norm is not finite either
    return float((t / scale).norm()) * float(scale)


def output_error(out: Any, reference: Any) -> dict[str, float]:
    """How far lossy outputs are from lossless ones, over all floating-point
    leaves of the two pytrees: relative L2, largest absolute error, and for leaves
    of two or more dims the share of positions whose argmax over the last dim
    agrees (top-1 agreement, for logits)."""
    pairs = [
        (o.detach().float(), r.detach().float())
        for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(reference), strict=True)
        if isinstance(o, torch.Tensor) and o.is_floating_point()
    ]
    if not pairs:
        return {}
    diff2 = sum(float((o - r).pow(2).sum()) for o, r in pairs)
    ref2 = sum(float(r.pow(2).sum()) for _, r in pairs)
    result = {
        "relative_l2": (diff2 / max(ref2, 1e-30)) ** 0.5,
        "max_abs": max(float((o - r).abs().max()) if o.numel() else 0.0 for o, r in pairs),
    }
    ranked = [(o, r) for o, r in pairs if o.dim() >= 2 and o.shape[-1] > 1]
    if ranked:
        same = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in ranked)
        result["top1_agreement"] = same / sum(o[..., 0].numel() for o, _ in ranked)
    return result


def _triton_ready(device: torch.device) -> bool:
    try:
        from planner.codegen.kernels import use_triton
    except ImportError:
        return False
    return use_triton(device)
