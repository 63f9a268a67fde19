"""CudaCopyEngine's copies in the order a GPU needs, checked on the CPU: plans solved
for the H100 profile (its disk made slow, so that the solver picks the host tier) at
budgets that put tensors in the host tier run through the real engine on simulated
streams (``fake_cuda``), which reports every copy a GPU could run out of order with
another or with the host. Each test also checks the outputs, losses and gradients
against eager, bit for bit. The negative controls at the end leave a wait out of the
engine and check that the simulator reports it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import TwoCaches, WithLoss
from fake_cuda import CopyOrderSimulator
from fake_cuda import fake_cuda_fixture as fake_cuda_fixture  # noqa: F401
from torch import nn

import planner
from planner.runtime.copy_engine import CudaCopyEngine
from planner.runtime.store import Entry, empty_like_entry

WIDTH = 64

#: the H100's profile with a disk slow enough that the solver prefers the host
#: tier, which holds what these tests check (pinned buffers, side streams)
PROFILE = dataclasses.replace(
    planner.get_profile("h100"), disk_read_bandwidth=1e7, disk_write_bandwidth=1e7
)


def _plan(model: nn.Module, budget: str, inputs: tuple, **kw: Any) -> planner.PlannedModule:
    """The plan at ``budget`` or, below the smallest feasible one, at that."""
    try:
        return planner.plan(model, budget, inputs, profile=PROFILE, time_limit=5, **kw)
    except planner.BudgetTooSmall as exc:
        return planner.plan(model, exc.min_budget, inputs, profile=PROFILE, time_limit=5, **kw)


def _assert_uses_host_tier(pm: planner.PlannedModule) -> None:
    """Something lives in the host tier and is read back from it: else the
    simulator would have no copies to order, and a test would pass vacuously."""
    homes = [t.name for t in pm.plan.tensors if t.home.startswith("host")]
    prefetches = [a for a in pm.plan.actions if a.kind == "prefetch" and a.tier == "host"]
    assert homes and prefetches, (homes, len(prefetches))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(3)]
    return WithLoss(nn.Sequential(*layers))


class Detached(nn.Module):
    """``P`` read twice: once through ``.detach()`` (no gradient), once trained."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, WIDTH)
        self.P = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
        self.lin2 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.tanh(self.lin1(x)) @ self.P.detach())
        h = torch.tanh(self.lin2(h))
        return (h @ self.P).pow(2).mean()


def _detached() -> nn.Module:
    torch.manual_seed(0)
    return Detached()


def _train_in_lockstep(
    fake_cuda: CopyOrderSimulator,
    make: Any,
    batches: list[torch.Tensor],
    budget: str,
    validate_before_step: bool = False,
    **plan_kw: Any,
) -> list[str]:
    """Plan ``make()`` for training at ``budget`` and take an SGD step per batch
    with it and with an eager ``make()``, checking loss and every gradient bit for
    bit (and, with ``validate_before_step``, a no_grad forward's output between
    the backward and the step); the hazards the simulator saw."""
    model, eager = make(), make()
    pm = _plan(model, budget, (batches[0],), mode="train", **plan_kw)
    _assert_uses_host_tier(pm)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    fake_cuda.watch_optimizer(optimizers[0])
    for x in batches:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss, eager_loss = pm(x), eager(x)
        loss.backward()
        eager_loss.backward()
        assert torch.equal(loss.detach(), eager_loss.detach())
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad), name
        if validate_before_step:
            with torch.no_grad():
                assert torch.equal(pm(x), eager(x))
        for opt in optimizers:
            opt.step()
    pm._engine.drain()
    return fake_cuda.hazards


def test_training_with_a_validation_forward_before_each_step(
    fake_cuda: CopyOrderSimulator,
) -> None:
    torch.manual_seed(1)
    x = torch.randn(16, WIDTH)
    hazards = _train_in_lockstep(fake_cuda, _mlp, [x, x, x], "35%", validate_before_step=True)
    assert hazards == []


def test_a_parameter_also_read_through_detach(fake_cuda: CopyOrderSimulator) -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 4)
    assert _train_in_lockstep(fake_cuda, _detached, [x, x, x], "50%") == []


def test_training_on_two_shapes(fake_cuda: CopyOrderSimulator) -> None:
    torch.manual_seed(1)
    x, small = torch.randn(16, WIDTH), torch.randn(3, WIDTH)
    batches = [x, small, x, small]
    hazards = _train_in_lockstep(fake_cuda, _mlp, batches, "35%", extra_example_inputs=[(small,)])
    assert hazards == []


def _decode_with_caches(fake_cuda: CopyOrderSimulator, exact: bool = True) -> list[str]:
    """``TwoCaches`` planned for inference, its caches in the host tier and written
    back row by row (``write_rows``), run for four tokens; with ``exact``, each
    output and the caches checked against eager. The hazards the simulator saw."""
    torch.manual_seed(0)
    model, eager = TwoCaches().eval(), TwoCaches().eval()
    eager.load_state_dict(model.state_dict())
    inputs = [(torch.randn(1, 32), torch.tensor([k])) for k in (3, 0, 7, 5)]
    pm = _plan(model, "35%", inputs[0])
    _assert_uses_host_tier(pm)
    with torch.no_grad():
        for args in inputs:
            output, expected = pm(*args), eager(*args)
            assert torch.equal(output, expected) or not exact
    assert any(key.startswith("rows:") for key in pm._engine.host)  # write_rows' buffers
    pm._engine.drain()
    if exact:
        for k in range(2):
            assert torch.equal(pm.state_tensor(f"layers.{k}.cache"), eager.layers[k].cache)
    return fake_cuda.hazards


def test_caches_written_row_by_row_into_the_host_tier(fake_cuda: CopyOrderSimulator) -> None:
    assert _decode_with_caches(fake_cuda) == []


# Negative controls: the simulator sees the hazards of an engine with a wait left out.


def test_without_settle_the_optimizer_races_the_last_upload(
    fake_cuda: CopyOrderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CudaCopyEngine, "settle", lambda self: None)
    torch.manual_seed(1)
    x = torch.randn(16, WIDTH)
    hazards = _train_in_lockstep(fake_cuda, _mlp, [x, x, x], "35%", validate_before_step=True)
    assert hazards and all("optimizer.step()" in h for h in hazards), hazards


def test_without_waiting_for_compute_an_upload_races_the_offload(
    fake_cuda: CopyOrderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def destination_without_wait(self: CudaCopyEngine, entry: Entry) -> torch.Tensor:
        return empty_like_entry(entry, self.device)  # h2d no longer waits for compute

    monkeypatch.setattr(CudaCopyEngine, "_destination", destination_without_wait)
    # nor for the key's last download (which orders it across streams too)
    monkeypatch.setattr(CudaCopyEngine, "_after_writes_of", lambda self, key: None)
    torch.manual_seed(1)
    x = torch.randn(16, WIDTH)
    hazards = _train_in_lockstep(fake_cuda, _mlp, [x, x], "35%")
    assert any("_upload" in h and "offload" in h for h in hazards), hazards


def test_without_synchronize_a_gradient_is_read_before_it_arrives(
    fake_cuda: CopyOrderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CudaCopyEngine, "synchronize", lambda self, pending: None)
    torch.manual_seed(1)
    x = torch.randn(16, WIDTH)
    hazards = _train_in_lockstep(fake_cuda, _mlp, [x], "35%")
    assert any("copy_to_host" in h and "finish_deliveries" in h for h in hazards), hazards


def test_without_waiting_for_put_rows_a_cache_is_read_while_written(
    fake_cuda: CopyOrderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the rows' thread is not waited for: outputs may be wrong, and are not checked
    monkeypatch.setattr(CudaCopyEngine, "_rows_written", lambda self, key: None)
    hazards = _decode_with_caches(fake_cuda, exact=False)
    assert any("put_rows" in h and "_upload" in h for h in hazards), hazards
