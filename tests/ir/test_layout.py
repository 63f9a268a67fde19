"""planner/ir/layout.py: outputs whose CPU kernel breaks the fake layout are
restrided in the captured graph, and nothing else is touched."""

from __future__ import annotations

import torch
from torch import nn

import planner
from planner.ir.capture import capture
from planner.ir.meta import FX_VAL


class _Norm(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transposed = transposed
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # (batch, length, channels) -> channels first and back
            h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.bn(x).transpose(1, 2)
        return self.fc(h).pow(2).mean()


_BATCH_NORMS = (
    torch.ops.aten._native_batch_norm_legit_functional.default,
    torch.ops.aten.native_batch_norm_backward.default,
)


def _clones(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The restriding copies: clone(permute(<a BatchNorm kernel's output>))."""
    out = []
    for n in gm.graph.nodes:
        if n.target is not torch.ops.aten.clone.default:
            continue
        permute = n.args[0]
        if permute.target is torch.ops.aten.permute.default:
            source = permute.args[0]  # a getitem of the kernel's outputs
            if source.op == "call_function" and source.args[0].target in _BATCH_NORMS:
                out.append(n)
    return out


def test_transposed_batchnorm_output_is_restrided_and_runs() -> None:
    x = torch.randn(2, 3, 4)
    captured = capture(_Norm(transposed=True), (x,), mode="train")
    gm = captured.graph_module
    clones = _clones(gm)
    assert clones, "the BatchNorm output was not restrided"
    for clone in clones:
        # what reads the result (permuted back) is a view of the copy's storage, as
        # the fake values now say (the IR reads storages off them)
        (back,) = clone.users
        copy_storage = clone.meta[FX_VAL].untyped_storage()
        assert back.meta[FX_VAL].untyped_storage()._cdata == copy_storage._cdata
        for user in back.users:
            val = user.meta[FX_VAL]
            if isinstance(val, torch.Tensor) and val._base is not None:
                assert val.untyped_storage()._cdata == copy_storage._cdata
    # and the step runs (it failed with a view error before), gradients as eager's

    model = _Norm(transposed=True)
    eager = _Norm(transposed=True)
    eager(x).backward()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=1)
    try:
        pm(x).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    finally:
        pm.close()


def test_contiguous_batchnorm_input_is_left_alone() -> None:
    captured = capture(_Norm(transposed=False), (torch.randn(2, 4, 3),), mode="train")
    assert not _clones(captured.graph_module)
