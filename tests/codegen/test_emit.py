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
