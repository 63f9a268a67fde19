"""planner/ir/aliased_state.py: a buffer that forward reaches through another
object (a static key/value cache) is one input of the captured program, and the
plan writes its updates back into it."""

from __future__ import annotations

import copy

import pytest
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
        self.head = nn.Linear(64, 64)
        self.register_buffer("cache", torch.zeros(16, 64), persistent=False)
        self.holder = _Holder(self.cache)

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.holder.tensor.index_copy_(0, position, self.lin(x))
        return self.head(self.holder.tensor.sum(0))


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
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, _inputs(0), profile="cpu")
    pm = planner.plan(model, smallest.value.min_budget, _inputs(0), profile="cpu")
    assert any(t.decision != "keep" for t in pm.plan.tensors)
    with torch.no_grad():
        for k in range(5):
            assert torch.equal(pm(*_inputs(k)), reference(*_inputs(k)))
            assert torch.equal(pm.state_tensor("cache"), reference.cache)
    cache = pm.state_tensor("cache")
    assert cache[:5].abs().sum() > 0 and not cache[5:].any()
    pm.close()


class _LongCache(_Cached):
    """A cache much larger than the rest, as a long context's is."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(4096, 64), persistent=False)
        self.holder = _Holder(self.cache)


def test_the_update_is_written_into_the_cache_not_beside_it() -> None:
    """The traced step makes the updated cache as a new tensor, which the planned
    module copied back after the step: two caches at once. Written in place (an
    ``out=`` call into the buffer), a plan holds one, well below that peak."""
    torch.manual_seed(0)
    model = _LongCache().eval()
    reference = copy.deepcopy(model)
    reference.holder = _Holder(reference.cache)
    cache_bytes = model.cache.numel() * model.cache.element_size()
    peak = planner.analyze(model, _inputs(0), profile="cpu").unplanned_peak_bytes
    assert peak > 2 * cache_bytes  # the functional step: old and new cache
    pm = planner.plan(model, int(peak * 0.6), _inputs(0), profile="cpu")
    assert "index_copy_out(b_cache" in pm.code and "out=b_cache" in pm.code
    with torch.no_grad():
        for k in range(3):
            assert torch.equal(pm(*_inputs(k)), reference(*_inputs(k)))
    assert torch.equal(pm.state_tensor("cache"), reference.cache)
    pm.run_measured(*_inputs(3))
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes < 1.25 * cache_bytes
    pm.close()


class _ReadLater(_LongCache):
    """Reads the updated cache after a step that needs as much memory again: a
    plan short of room would move the cache's update away in between."""

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.holder.tensor.index_copy_(0, position, self.lin(x))
        wide = torch.relu(self.head(x).expand(4096, 64) * 2.0)
        return self.holder.tensor.sum(0) + wide.sum(0)


def test_an_update_moved_away_in_between_is_written_back_to_the_cache() -> None:
    """At the smallest budget the cache lives in the offload store: the update's
    new row is written over the cache's copy there as it is made (the next call
    reads it). Moved away while the wide step runs, the update is read back from
    there too, not written a second time under a key of its own."""
    torch.manual_seed(0)
    model = _ReadLater().eval()
    reference = copy.deepcopy(model)
    reference.holder = _Holder(reference.cache)
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, _inputs(0), profile="cpu")
    pm = planner.plan(model, smallest.value.min_budget, _inputs(0), profile="cpu")
    assert "rt.write_rows('cache', 'disk', " in pm.code
    assert "rt.read_now('cache', 'disk')" in pm.code and "'index_copy', 'disk'" not in pm.code
    with torch.no_grad():
        for k in range(3):
            assert torch.equal(pm(*_inputs(k)), reference(*_inputs(k)))
    assert torch.equal(pm.state_tensor("cache"), reference.cache)
    pm.run_measured(*_inputs(3))
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes
    pm.close()


class _TwoLayers(nn.Module):
    """Two layers, each with its own cache, as a decoder's: each writes the call's
    row into its cache and reads the whole of it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_LongCache() for _ in range(2))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, position).unsqueeze(0)
        return x


def test_the_caches_take_turns_on_the_device() -> None:
    """Each layer's cache is fetched from the offload store before its layer and
    its update written back after its last read: the smallest budget holds about
    one cache where, the caches pinned, it held both."""
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    reference = copy.deepcopy(model)
    for layer in reference.layers:
        layer.holder = _Holder(layer.cache)
    cache_bytes = model.layers[0].cache.numel() * model.layers[0].cache.element_size()
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, _inputs(0), profile="cpu")
    assert smallest.value.min_budget < 1.2 * cache_bytes
    pm = planner.plan(model, smallest.value.min_budget, _inputs(0), profile="cpu")
    for i in range(2):
        assert f"rt.write_rows('layers.{i}.cache', 'disk', " in pm.code
    with torch.no_grad():
        for k in range(4):
            assert torch.equal(pm(*_inputs(k)), reference(*_inputs(k)))
    for i, layer in enumerate(reference.layers):
        assert torch.equal(pm.state_tensor(f"layers.{i}.cache"), layer.cache)
    assert [t.decision for t in pm.report.tensors if t.name.endswith("cache")]  # listed
    pm.run_measured(*_inputs(4))
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes
    pm.close()


def test_training_a_model_that_writes_activations_into_a_buffer_says_what_to_do() -> None:
    model = _model().train()
    with pytest.raises(planner.PlannerError, match=r"writes values that require grad into cache"):
        planner.plan(model, "100%", _inputs(0), mode="train", profile="cpu")


def test_tracing_leaves_the_buffer_as_it_was() -> None:
    """The trace writes a value that requires grad into the real buffer (reached
    through the holder); the buffer then required grad, and the model's own forward
    failed outside no_grad (an in-place write into a leaf that requires grad)."""
    model = _model()
    planner.analyze(model, _inputs(0), profile="cpu")
    assert not model.cache.requires_grad and model.cache.is_leaf
    model(*_inputs(1))  # outside no_grad, as a caller may
    assert model.cache[1].abs().sum() > 0
