"""Weights homed on disk read from their checkpoint in place (``DiskStore.link``,
``planner/runtime/linked.py``): nothing written for them, the same bytes read, the
checkpoint never written, and a checkpoint rewritten after planning an error."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import planner
from planner.runtime import copy_engine
from planner.runtime.checkpoint import open_safetensors
from planner.runtime.linked import LinkedFileChanged
from planner.runtime.store import DiskStore, StoreError, empty_like_entry, fault_in


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_bytes(root) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _saved(make, tmp_path) -> tuple[nn.Module, Any, str]:
    """``make()`` (seeded), saved to ``model.safetensors``: (it, the path, its SHA-256)."""
    torch.manual_seed(0)
    eager = make()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    return eager, path, _sha256(path)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.arange(12.0).reshape(3, 4), "b": torch.arange(5, dtype=torch.int64)}, path
    )
    return path


@pytest.fixture
def store(tmp_path):
    (tmp_path / "offload").mkdir()
    s = DiskStore(tmp_path / "offload")
    yield s
    s.close()


def test_a_linked_key_reads_the_checkpoints_bytes_and_writes_nothing(checkpoint, store) -> None:
    tensors = open_safetensors(checkpoint)
    assert store.link("a", tensors["a"]) and store.link("b", tensors["b"])
    out = store.read_into("b", empty_like_entry(store.entries["b"]))
    assert torch.equal(out, torch.arange(5))  # read at its own offset in the file
    mapped = store.map_private("a")
    assert torch.equal(mapped, torch.arange(12.0).reshape(3, 4))
    fault_in(mapped)  # only the view's pages: the map is the whole file's
    assert torch.equal(mapped, torch.arange(12.0).reshape(3, 4))
    assert _files_bytes(store.root) == 0
    with pytest.raises(StoreError, match="read in place"):
        store.map_shared("a")  # writes through it would reach the checkpoint
    before = _sha256(checkpoint)
    store.write("a", torch.zeros(3, 4))  # a write makes it the store's own again
    assert torch.equal(
        store.read_into("a", empty_like_entry(store.entries["a"])), torch.zeros(3, 4)
    )
    assert _sha256(checkpoint) == before
    store.discard("b")
    store.close()
    assert checkpoint.exists() and _sha256(checkpoint) == before


def test_only_a_dense_view_of_a_files_map_is_linked(checkpoint, store) -> None:
    tensors = open_safetensors(checkpoint)
    assert not store.link("x", torch.arange(4.0))  # in memory: the caller writes it
    assert not store.link("t", tensors["a"].t())  # not dense in the file
    assert "x" not in store.entries and "t" not in store.entries


def test_a_checkpoint_rewritten_after_linking_is_an_error_replaced_is_not(
    checkpoint, store
) -> None:
    tensors = open_safetensors(checkpoint)
    assert store.link("a", tensors["a"])
    replacement = checkpoint.with_name("new.safetensors")
    save_file({"a": torch.ones(3, 4), "b": torch.ones(5, dtype=torch.int64)}, replacement)
    os.replace(replacement, checkpoint)  # a new file under the name: the old bytes stay read
    assert torch.equal(
        store.read_into("a", empty_like_entry(store.entries["a"])),
        torch.arange(12.0).reshape(3, 4),
    )
    checkpoint.unlink()  # deleted: the open descriptor still holds them
    assert torch.equal(store.map_private("a"), torch.arange(12.0).reshape(3, 4))

    path = checkpoint.with_name("w2.safetensors")
    save_file({"a": torch.arange(12.0).reshape(3, 4)}, path)
    assert store.link("c", open_safetensors(path)["a"])
    with open(path, "r+b") as f:  # rewritten in place: its bytes may have changed
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    os.utime(path, ns=(0, 0))  # whatever the clock's resolution
    with pytest.raises(LinkedFileChanged, match="written after planning.*plan the model again"):
        store.read_into("c", empty_like_entry(store.entries["c"]))
    with pytest.raises(LinkedFileChanged):
        store.map_private("c")


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(8)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("read", ["copied", "mapped"])
def test_inference_reads_disk_home_weights_from_the_checkpoint(tmp_path, monkeypatch, read) -> None:
    """Planned from a checkpoint at 40%: the weights homed on disk are read from
    the checkpoint (the offload directory holds none of their bytes), outputs are
    eager's bit for bit within the budget by the meter, the checkpoint is never
    written, and replacing it (then writing the new file) leaves the module's
    outputs as they were. ``mapped``: read as views of its map (the path for
    weights of ``MAP_MIN_BYTES`` or more)."""
    if read == "mapped":
        monkeypatch.setattr(copy_engine, "MAP_MIN_BYTES", 0)
    eager, path, digest = _saved(_Blocks, tmp_path)
    x = torch.randn(64, 256)
    with torch.no_grad():
        expected = eager(x)
    offload = tmp_path / "offload"
    offload.mkdir()
    with torch.device("meta"):
        meta = _Blocks()
    pm = planner.plan(
        meta,
        "40%",
        (x,),
        profile="cpu",
        time_limit=5,
        checkpoint=str(path),
        offload_dir=str(offload),
    )
    try:
        on_disk = [d for d in pm.plan.tensors if d.kind == "param" and d.home == "disk"]
        assert on_disk, "the budget must home weights on disk for this test to mean anything"
        assert _files_bytes(offload) < sum(d.nbytes for d in on_disk)
        assert _files_bytes(offload) == 0  # nothing else is offloaded at 40% either
        read = pm.report.read_in_place
        assert read == {
            "weights": len(on_disk),
            "bytes": sum(d.nbytes for d in on_disk),
            "files": [str(path)],
        }
        assert f"read in place:      {len(on_disk)} weights" in str(pm.report)
        out = pm.run_measured(x)
        assert torch.equal(out, expected)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        assert _sha256(path) == digest

        save_file({k: torch.zeros_like(v) for k, v in eager.state_dict().items()}, tmp_path / "n")
        os.replace(tmp_path / "n", path)  # a new checkpoint under the name
        assert torch.equal(pm(x), expected)  # read from the file it was planned with

        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\1\1\1\1")
        os.utime(path, ns=(0, 0))
        assert torch.equal(pm(x), expected), "the new file is not the one read"
    finally:
        pm.close()
    assert _files_bytes(offload) == 0


class _ReturnsAWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x, self.layers[1].weight


def test_a_weight_the_forward_returns_stays_on_the_device(tmp_path) -> None:
    """A returned weight ends the call resident, so it has no home off the device
    (then the caller, who may write into it, never holds a view of the
    checkpoint's map). Before, the smallest-budget search replayed a plan homing
    it on disk and raised ``InvalidPlan`` instead of ``BudgetTooSmall``."""
    eager, path, digest = _saved(_ReturnsAWeight, tmp_path)
    x = torch.randn(8, 256)
    with torch.device("meta"):
        meta = _ReturnsAWeight()
    with pytest.raises(planner.BudgetTooSmall):
        planner.plan(meta, "10%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    pm = planner.plan(meta, "60%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    try:
        homes = {d.name: d.home for d in pm.plan.tensors if d.kind == "param"}
        assert "disk" in homes.values()
        assert homes["layers.1.weight"] == "device"
        out, weight = pm(x)
        with torch.no_grad():
            expected, _ = eager(x)
        assert torch.equal(out, expected)
        with torch.no_grad():
            weight.add_(1.0)
        assert _sha256(path) == digest
    finally:
        pm.close()


def test_lora_training_reads_its_frozen_base_from_the_checkpoint(tmp_path) -> None:
    """LoRA from a checkpoint: the frozen base weights homed on disk are read from
    the checkpoint (the offload directory holds less than them after planning),
    three AdamW steps over the adapters are eager's bit for bit within the budget
    by the meter, and the checkpoint is unchanged. Trained weights, which the
    optimizer writes, are still copied (``test_checkpoint.py``)."""
    from conftest import assert_same_adamw_steps, assert_step_within
    from test_checkpoint import lora_over_a_saved_base

    eager, meta, x, path = lora_over_a_saved_base(tmp_path)
    digest = _sha256(path)
    offload = tmp_path / "offload"
    offload.mkdir()
    budget = int(0.6 * sum(p.numel() * 4 for p in eager.parameters()))
    pm = planner.plan(
        meta, budget, (x,), mode="train", profile="cpu", time_limit=20,
        checkpoint=str(path), offload_dir=str(offload),
    )  # fmt: skip
    try:
        on_disk = [
            d
            for d in pm.plan.tensors
            if d.kind == "param" and d.home == "disk" and ".base." in d.name
        ]
        assert on_disk, "the budget must home frozen weights on disk for this test to mean anything"
        assert _files_bytes(offload) < sum(d.nbytes for d in on_disk)
        assert_same_adamw_steps(pm, eager, [(x,)] * 3)
        assert_step_within(pm, (x,), budget)
    finally:
        pm.close()
    assert _sha256(path) == digest, "training wrote into the checkpoint"
