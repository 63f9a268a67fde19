"""What small copies to and from the offload store cost, counted, not timed.

A read made at once (``ThreadCopyEngine.read_now``, the ``rt.read_now`` of every
small weight a CPU plan homes on disk) allocates its destination once: the bytes it
reads into come from that allocation (``empty_for_read``), not from a second uint8
view of the destination's storage (``_storage_bytes``), which cost 2.3 of a 4 KiB
weight's 13.5 us read. Counted, not timed."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import planner
from planner.runtime import store as store_module
from planner.runtime.copy_engine import ThreadCopyEngine
from planner.runtime.store import DiskStore


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[ThreadCopyEngine]:
    engine = ThreadCopyEngine(DiskStore(tmp_path))
    yield engine
    engine.close()
    engine.disk.close()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def storage_views(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``_storage_bytes`` calls (the second view of a read's destination)."""
    calls: list[int] = []
    original = store_module._storage_bytes

    def counted(tensor: torch.Tensor) -> memoryview:
        calls.append(1)
        return original(tensor)

    monkeypatch.setattr(store_module, "_storage_bytes", counted)
    return calls


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(40, 30).to(torch.bfloat16)
    return {
        "float": torch.randn(32, 32),
        "strided view of a larger storage": base[5:, 2:].t(),  # offset, own strides
        "bool": torch.rand(17) > 0.5,
        "empty": torch.empty(0, 3),
    }


@pytest.mark.parametrize("name", list(_tensors()))
def test_read_now_reads_into_its_one_allocation(
    engine: ThreadCopyEngine, storage_views: list[int], name: str
) -> None:
    x = _tensors()[name]
    engine.store_now("k", "disk", x)  # checksummed: read through a fresh open
    engine.write_now("t", "disk", x)  # transient: read through the kept-open file
    del storage_views[:]  # the writes' own views
    for key in ("k", "t", "k"):
        got = engine.read_now(key, "disk")
        assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == x.stride()
        assert got.storage_offset() == x.storage_offset()
        assert torch.equal(got, x)
    assert storage_views == []


def test_a_planned_call_reading_its_weights_from_disk_makes_no_second_view(
    storage_views: list[int],
) -> None:
    """Every weight of the MLP homed on disk (its smallest budget) and read at
    once: the call is eager's bit for bit, and its reads make no second view."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    try:
        planner.plan(copy.deepcopy(model), "1%", example_inputs=(x,))
        raise AssertionError("1% should not fit")
    except planner.BudgetTooSmall as e:
        budget = e.min_budget
    pm = planner.plan(model, budget, example_inputs=(x,))
    try:
        reads = pm.code.count("rt.read_now(")
        assert reads >= 6 and "rt.write" not in pm.code and "rt.prefetch" not in pm.code
        with torch.no_grad():
            pm(x)
            del storage_views[:]
            out = pm(x)
        assert torch.equal(out, expected)
        assert storage_views == []  # was one per read
    finally:
        pm.close()


@pytest.fixture
def torch_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the byte copies ``_copy_bytes`` hands to torch (``torch.from_numpy``
    of the map), not to numpy."""
    calls: list[int] = []
    original = torch.from_numpy

    def counted(array):  # noqa: ANN001, ANN202
        calls.append(1)
        return original(array)

    monkeypatch.setattr(store_module.torch, "from_numpy", counted)
    return calls


def test_a_small_spill_is_copied_through_its_map_by_numpy(
    engine: ThreadCopyEngine, torch_copies: list[int]
) -> None:
    """A spill of 2 KiB (a tiny GPT-2's activations) written and read back through
    its file's map: the same bytes, and no torch copy (1.4 us to start against a
    0.26 us memcpy); one of 512 KiB still goes through torch's."""
    small, large = torch.randn(2, 8, 32), torch.randn(128, 1024)
    for x in (small, large):
        engine.write_now("s", "disk", x)  # first write: opens, sizes and maps the file
    if "s" not in engine.disk._maps:
        pytest.skip("this file system's offload files are not mapped")
    del torch_copies[:]
    for _ in range(2):
        engine.write_now("s", "disk", small)
        assert torch.equal(engine.read_now("s", "disk"), small)
    assert torch_copies == []
    engine.write_now("s", "disk", large)
    assert torch.equal(engine.read_now("s", "disk"), large)
    assert len(torch_copies) >= 2  # the large write's and read's copies
