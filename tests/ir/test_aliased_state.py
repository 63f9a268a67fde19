"""planner/ir/aliased_state.py: a buffer that forward reaches through another
object (a static key/value cache) is one input of the captured program, and the
plan writes its updates back into it."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.export.graph_signature import InputKind

import planner
from planner.ir.aliased_state import merge_constants_that_are_state


class _Holder:
    """Not a module: export does not swap what it holds for a fake."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _Cached(nn.Module):
    """Writes each call's row into a buffer it reaches through a holder, as
    transformers' exportable static cache does, and reads the whole buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.register_buffer("cache", torch.zeros(16, 64), persistent=False)
        self.holder = _Holder(self.cache)

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.holder.tensor.index_copy_(0, position, self.lin(x))
        return self.holder.tensor.sum(0)


def _model() -> _Cached:
    torch.manual_seed(0)
    return _Cached().eval()


def _inputs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 64, generator=torch.Generator().manual_seed(k)), torch.tensor([k])


def test_the_constant_is_routed_to_the_buffer() -> None:
    ep = torch.export.export(_model(), _inputs(0), strict=False)
    kinds = [s.kind for s in ep.graph_signature.input_specs]
    assert InputKind.CONSTANT_TENSOR in kinds  # the cache, a second time
    merged = merge_constants_that_are_state(ep)
    assert InputKind.CONSTANT_TENSOR not in [s.kind for s in merged.graph_signature.input_specs]
    functional = merged.run_decompositions({})  # refused while one tensor was two inputs
    assert list(functional.graph_signature.buffers_to_mutate.values()) == ["cache"]


def test_a_plan_updates_the_buffer_at_each_call_as_eager_does() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    reference.holder = _Holder(reference.cache)
    peak = planner.analyze(model, _inputs(0), profile="cpu").unplanned_peak_bytes
    pm = planner.plan(model, int(peak * 0.85), _inputs(0), profile="cpu")
    assert any(t.decision != "keep" for t in pm.plan.tensors)
    with torch.no_grad():
        for k in range(5):
            assert torch.equal(pm(*_inputs(k)), reference(*_inputs(k)))
            assert torch.equal(model.cache, reference.cache)
    assert model.cache[:5].abs().sum() > 0 and not model.cache[5:].any()
    pm.close()
