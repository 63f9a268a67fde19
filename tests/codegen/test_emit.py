"""The executor's emitter (planner.codegen.emit): which op calls may join a
compiled run."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from planner.codegen.emit import touches_host_tensors


def test_ops_reading_a_cpu_scalar_stay_eager_on_cuda() -> None:
    """On CUDA an ATen op may take a CPU scalar tensor (``x / torch.tensor(8.0)``
    made in ``forward``); a compiled run is specialized to inputs on its device,
    so such an op stays out of runs. Fake CUDA tensors need no GPU."""
    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
        scale = torch.empty((), device="cpu")
    traced = make_fx(lambda x, s: ((x * 2).div(s), x + 1), tracing_mode="fake")(x, scale)
    ops = {str(n.target): n for n in traced.graph.nodes if n.op == "call_function"}
    cuda = torch.device("cuda", 0)
    assert touches_host_tensors(ops["aten.div.Tensor"], cuda)
    assert not touches_host_tensors(ops["aten.mul.Tensor"], cuda)
    assert not touches_host_tensors(ops["aten.add.Tensor"], cuda)
    # on a CPU executor every tensor is a host tensor: nothing changes there
    assert not any(touches_host_tensors(n, torch.device("cpu")) for n in ops.values())


class _Twiddle(torch.nn.Module):
    """A phase rotation in the frequency domain: ``torch.exp(1j * t)`` puts a
    Python complex constant (``1j``) into the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfft(self.lin(x), dim=-1)
        f = f * torch.exp(1j * torch.linspace(0, 1, f.shape[-1]))
        return torch.fft.irfft(f, n=16, dim=-1)


def test_a_complex_constant_is_emitted() -> None:
    """It raised ``TypeError: cannot emit argument 1j of type complex``."""
    import planner

    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = _Twiddle().eval()(x)
    pm = planner.plan(_Twiddle().eval(), "100%", (x,), time_limit=3)
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
    model = _Twiddle()
    pm = planner.plan(model, "100%", (x,), mode="train", time_limit=3)
    pm(x).sum().backward()
    eager = _Twiddle()
    eager(x).sum().backward()
    assert torch.equal(model.lin.weight.grad, eager.lin.weight.grad)


class _Positions(torch.nn.Module):
    """``torch.arange(..., device=x.device)`` puts a device into the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.arange(8, device=x.device, dtype=x.dtype)


def test_a_device_argument_is_bound_once_not_built_at_each_call() -> None:
    """The executor read ``torch.device('cpu')``, made again at every call (0.2 us
    each); it reads a global bound to it when the executor is made."""
    import planner

    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = _Positions()(x)
    pm = planner.plan(_Positions(), "100%", (x,), time_limit=3)
    assert "torch.device(" not in pm.code and "device=device_cpu" in pm.code
    assert pm._fn.__globals__["device_cpu"] == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(pm(x), expected)
    pm.close()


def test_a_constants_name_never_takes_a_values() -> None:
    """A value's own name (a local, which would hide the global) is never the
    constant's; one device has one name."""
    from planner.codegen.emit import _Emitter, format_arg

    emitter = _Emitter.__new__(_Emitter)
    emitter.reserved, emitter.used, emitter.ops = {"device_cpu"}, set(), {}
    cpu = torch.device("cpu")
    assert emitter._constant(cpu) == "device_cpu_" == emitter._constant(cpu)
    assert emitter.ops == {"device_cpu_": cpu} and "device_cpu_" in emitter.used
    assert format_arg([cpu], None, emitter._constant) == "[device_cpu_]"
    assert format_arg(cpu, None) == "torch.device('cpu')"  # no binding given: as before
