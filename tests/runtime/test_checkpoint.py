"""Meta-device model + safetensors checkpoint: planned without loading the weights
into RAM, outputs equal the eager model's."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import planner
from planner.errors import PlannerError
from planner.runtime.checkpoint import attach_checkpoint, open_safetensors
from planner.runtime.meter import resident_bytes


def _blocks(device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(8)])


def test_meta_model_with_checkpoint_matches_eager(tmp_path) -> None:
    torch.manual_seed(0)
    eager = _blocks()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    x = torch.randn(64, 256)
    with torch.no_grad():
        expected = eager(x)
    meta = _blocks("meta")
    pm = planner.plan(meta, "40%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    try:
        out = pm.run_measured(x)
        assert torch.equal(out, expected)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        weights = sum(p.numel() * 4 for p in eager.parameters())
        # the model's weights are not in RAM: only the plan's device-home share is
        assert resident_bytes(meta) + resident_bytes(pm) < weights
    finally:
        pm.close()
    del pm
    gc.collect()


def test_checkpoint_is_memory_mapped_and_checked(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(path))
    tensors = open_safetensors(path)
    assert resident_bytes(tensors) == 0  # file-backed: not counted as RAM
    meta = nn.Linear(4, 5, device="meta")
    with pytest.raises(PlannerError, match="model expects"):
        attach_checkpoint(meta, path)
    with pytest.raises(PlannerError, match="cannot read"):
        open_safetensors(tmp_path / "missing.safetensors")


class _Scaled(nn.Module):
    """A layer with a non-persistent buffer its constructor computes (as a rotary
    embedding's ``inv_freq``): never in a state_dict, so never in a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class _WithScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Scaled()
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def test_a_non_persistent_meta_buffer_is_an_error_that_says_what_to_do(tmp_path) -> None:
    torch.manual_seed(0)
    eager = _WithScaled()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected = eager(x)
    with torch.device("meta"):
        meta = _WithScaled()
    with pytest.raises(PlannerError) as err:
        planner.plan(meta, "100%", (x,), profile="cpu", checkpoint=str(path))
    message = str(err.value)
    assert "'inner.scale' is a non-persistent buffer" in message
    assert "model.inner = _Scaled(...)" in message
    assert all(t.is_meta for t in meta.state_dict().values())  # nothing half-attached
    # what it says to do: that module made outside the meta device
    with torch.device("meta"):
        meta = _WithScaled()
    real = _Scaled()
    meta.inner = real
    meta.inner.linear = nn.Linear(64, 64, device="meta")  # its weights still from the file
    pm = planner.plan(meta, "100%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    try:
        assert torch.equal(pm(x), expected)
    finally:
        pm.close()
