"""``planner.runtime.copy_engine``'s CUDA engine: the ordering and the memory its
copies need where the host runs ahead of the GPU. (The CPU engine runs under
every plan in the suite.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from planner.runtime.copy_engine import CudaCopyEngine
from planner.runtime.store import DiskStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MiB = 2**20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[CudaCopyEngine]:
    engine = CudaCopyEngine(DiskStore(tmp_path), torch.device("cuda"))
    yield engine
    engine.drain()
    engine.close()
    engine.disk.close()


def test_a_key_read_twice_gets_the_bytes_of_each_read(engine: CudaCopyEngine) -> None:
    """With the first read's upload held back on the GPU (behind a long kernel),
    a second read of the same key, after the file changed, must not land in the
    buffer the first upload still reads from: each read gets the bytes the file
    held when it was read."""
    first, second = torch.full((MiB,), 1.0), torch.full((MiB,), 2.0)
    engine.store_now("w", "disk", first)
    torch.cuda._sleep(500_000_000)  # a few hundred ms of GPU time ahead of the copies
    a = engine.prefetch("w", "disk")
    assert a.future is not None
    a.future.result()  # read into its bounce buffer; the upload waits behind the sleep
    engine.disk.write("w", second)
    b = engine.prefetch("w", "disk")
    assert torch.equal(engine.wait(a).cpu(), first)
    assert torch.equal(engine.wait(b).cpu(), second)


def test_disk_copies_pin_no_host_memory_per_key(engine: CudaCopyEngine) -> None:
    """Disk reads and writes go through bounce buffers of their own, which
    torch's pinned cache recycles: the engine keeps none per key (a per-key
    buffer pinned a host copy of everything the disk tier holds)."""
    for i in range(8):
        engine.store_now(f"w{i}", "disk", torch.full((MiB,), float(i)))
        got = engine.wait(engine.prefetch(f"w{i}", "disk"))
        engine.wait(engine.offload(f"a{i}", "disk", got * 2))
        assert torch.equal(engine.read_now(f"a{i}", "disk").cpu(), torch.full((MiB,), 2.0 * i))
    assert not engine.host


def test_reads_come_from_the_compute_streams_memory_pool(engine: CudaCopyEngine) -> None:
    """A read's device tensor is allocated from the compute stream's pool: once
    freed, the next tensor of its size made by an op reuses its block (one made
    from h2d's pool would be held apart for h2d's allocations alone)."""
    engine.store_now("w", "disk", torch.ones(4 * MiB))
    read = engine.wait(engine.prefetch("w", "disk"))
    block = read.data_ptr()
    torch.cuda.synchronize()
    del read
    assert torch.empty(4 * MiB, device="cuda").data_ptr() == block


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_meter_measures_the_device_it_is_given() -> None:
    from planner.runtime.meter import measure

    def fill() -> torch.Tensor:
        return torch.ones(MiB, device="cuda:1")

    torch.cuda.set_device(0)
    _, measured = measure(fill, device="cuda:1")
    assert measured.peak_bytes >= 4 * MiB
