"""DiskStore: round trips of any layout, and damaged files are errors, not data."""

from __future__ import annotations

import os
import time

import pytest
import torch

from planner.runtime.store import DiskStore, StoreError, empty_like_entry


@pytest.fixture
def store(tmp_path):
    s = DiskStore(tmp_path)
    yield s
    s.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(17, 33),
        lambda: torch.randn(8, 8).t(),
        lambda: torch.arange(100, dtype=torch.int64)[10:50:3],
        lambda: torch.randn(4, 4).to(torch.bfloat16),
    ],
)
def test_round_trip_keeps_layout(store: DiskStore, make) -> None:
    x = make()
    store.write("x", x)
    out = empty_like_entry(store.entries["x"])
    store.read_into("x", out)
    assert out.shape == x.shape and out.stride() == x.stride() and torch.equal(out, x)


def test_missing_truncated_and_corrupted_files(store: DiskStore) -> None:
    x = torch.randn(1000)
    store.write("x", x)
    path = store.path("x")
    out = empty_like_entry(store.entries["x"])
    store.read_into("x", out)  # verified once
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    time.sleep(0.01)
    path.write_bytes(bytes(data))  # same size, new mtime: verified again
    with pytest.raises(StoreError, match="corrupted"):
        store.read_into("x", empty_like_entry(store.entries["x"]))
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="wrong size"):
        store.read_into("x", empty_like_entry(store.entries["x"]))
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.read_into("x", empty_like_entry(store.entries["x"]))


def test_offload_dir_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        DiskStore(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        DiskStore(f)
