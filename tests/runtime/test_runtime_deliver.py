"""Runtime.deliver / finish_deliveries: gradients handed to their parameters'
``.grad`` during the backward, as autograd's accumulation would at its end."""

from __future__ import annotations

import gc
import weakref

import torch

from planner.runtime.copy_engine import CopyEngine, Pending
from planner.runtime.runtime import Runtime


class _HostCopies(CopyEngine):
    """A CUDA engine's host side as the runtime sees it: each copy lands in the
    key's one reused buffer (in the gradient's layout) and completes only when
    ``synchronize`` says so."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.synchronized: list[str] = []

    def copy_to_host(self, key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        buf = self.buffers.setdefault(key, torch.empty_strided(tensor.shape, tensor.stride()))
        buf.copy_(tensor)
        pending = Pending(tensor)
        pending.extra.append(key)
        return buf, pending

    def synchronize(self, pending: Pending) -> None:
        self.synchronized.append(pending.extra[0])


def test_host_deliveries_land_in_grad_at_the_end_of_the_backward() -> None:
    """A strided gradient (a transposed matmul result) becomes a .grad of its own,
    in ordinary memory and in the parameter's strides, only once its copy is
    synchronized; the engine's buffer is reused by the next step without touching
    it; a second backward without clearing adds, as autograd does."""
    engine = _HostCopies()
    rt = Runtime(engine)
    param = torch.nn.Parameter(torch.randn(16, 8))
    rt.deliveries["g"] = (param, None)
    grad = torch.randn(8, 16).t()  # the parameter's shape, transposed strides
    assert rt.deliver("g", grad) is not None
    assert param.grad is None  # not before the backward ends
    rt.finish_deliveries()
    assert engine.synchronized == ["g"] and not rt.arriving
    first = param.grad
    assert torch.equal(first, grad) and first.stride() == param.stride()
    assert first.untyped_storage().data_ptr() != engine.buffers["g"].untyped_storage().data_ptr()
    param.grad = None  # zero_grad(set_to_none=True); the user keeps ``first``
    second = torch.randn(8, 16).t()
    rt.deliver("g", second)
    rt.finish_deliveries()
    assert torch.equal(first, grad), "the engine's buffer is reused; a .grad kept is not"
    assert torch.equal(param.grad, second)
    rt.deliver("g", grad)  # not cleared: added
    rt.finish_deliveries()
    assert torch.equal(param.grad, second + grad)


def test_a_delivered_gradient_is_not_held_until_the_backward_ends() -> None:
    """On CUDA the plan frees a delivered gradient's device copy once its copy to
    the host is waited for; the runtime keeps only what ``finish_deliveries``
    needs (the host buffer, the copy's record), so that memory comes back then,
    not when the backward ends (every delivered gradient at once, over the budget)."""
    engine = _HostCopies()
    rt = Runtime(engine)
    param = torch.nn.Parameter(torch.randn(16, 8))
    rt.deliveries["g"] = (param, None)
    grad = torch.randn(16, 8)
    expected = grad.clone()
    device_copy = weakref.ref(grad)
    pending = rt.deliver("g", grad)
    del pending, grad  # as the generated code does after ``rt.wait``
    gc.collect()
    assert device_copy() is None, "the runtime still holds the device gradient"
    rt.finish_deliveries()
    assert engine.synchronized == ["g"]
    assert torch.equal(param.grad, expected)
