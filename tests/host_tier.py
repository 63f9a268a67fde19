"""A stand-in for CUDA's copy engine on the CPU, so that plans solved for a GPU
profile (host tier, gradients delivered to the host) run in tests here."""

from __future__ import annotations

import pytest
import torch
from conftest import WithLoss
from torch import nn

import planner
from planner import api, planned_module
from planner.runtime.copy_engine import Pending, ThreadCopyEngine
from planner.runtime.store import DiskStore


class HostTierInMemory(ThreadCopyEngine):
    """CUDA's copy engine as the executor sees it, on the CPU: a ``host`` tier held
    in a dict, copies made at once (no streams). Lets a plan solved for a GPU
    profile run here, down to its deliveries to the host (``copy_to_host``)."""

    def __init__(self, disk: DiskStore) -> None:
        super().__init__(disk)
        self.host: dict[str, torch.Tensor] = {}
        self.copied_to_host = 0
        self.rows_written_to_host = 0

    def _check_tier(self, tier: str) -> None:
        assert tier == "disk", tier

    def prefetch(self, key: str, tier: str) -> Pending:
        return Pending(self.host[key].clone()) if tier == "host" else super().prefetch(key, tier)

    def read_now(self, key: str, tier: str) -> torch.Tensor:
        return self.host[key].clone() if tier == "host" else super().read_now(key, tier)

    def offload(self, key: str, tier: str, tensor: torch.Tensor) -> Pending:
        if tier != "host":
            return super().offload(key, tier, tensor)
        self.host[key] = tensor.clone()
        return Pending(tensor)

    def write_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        self.wait(self.offload(key, tier, tensor))

    def write_rows(
        self, key: str, tier: str, tensor: torch.Tensor, dim: int, index: torch.Tensor
    ) -> None:
        if tier != "host":
            super().write_rows(key, tier, tensor, dim, index)
            return
        self.rows_written_to_host += 1
        self.host[key].index_copy_(dim, index, tensor.index_select(dim, index))

    def store_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        if tier == "host":
            self.host[key] = tensor.clone()
        else:
            super().store_now(key, tier, tensor)

    def home_tensor(self, key: str, tier: str) -> torch.Tensor:
        return self.host[key] if tier == "host" else super().home_tensor(key, tier)

    def copy_to_host(self, key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        self.copied_to_host += 1
        return tensor.clone(memory_format=torch.preserve_format), Pending(tensor)


def run_gpu_plans_here(monkeypatch: pytest.MonkeyPatch) -> list[HostTierInMemory]:
    """Make ``planner.plan`` build its modules on ``HostTierInMemory`` engines
    (returned as they are made) and accept a GPU profile for CPU inputs, which it
    refuses otherwise (its executor could not run the plan)."""
    engines: list[HostTierInMemory] = []

    def engine(device: torch.device, disk: DiskStore) -> HostTierInMemory:
        engines.append(HostTierInMemory(disk))
        return engines[-1]

    monkeypatch.setattr(planned_module, "make_engine", engine)
    monkeypatch.setattr(api, "_profile_for_device", lambda spec, device: planner.get_profile(spec))
    return engines


def linear_layers() -> tuple[nn.Module, torch.Tensor]:
    """Six 256-wide linear layers with a loss and a batch of 64; the same each call."""
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    torch.manual_seed(0)
    return WithLoss(nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])), x
