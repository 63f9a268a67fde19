"""``planner.runtime.copy_engine``'s CUDA engine: the ordering its copies need
where the host runs ahead of the GPU. (The CPU engine runs under every plan in
the suite.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.runtime.copy_engine import CudaCopyEngine
from planner.runtime.store import DiskStore


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_key_read_twice_waits_for_the_last_upload_from_its_staging_buffer(
    tmp_path: Path,
) -> None:
    """A disk key's reads share one pinned staging buffer. With the first upload
    from it held back on the GPU (behind a long kernel), the second read must not
    overwrite the buffer before that upload has left: each read gets the bytes
    the file held when it was read."""
    engine = CudaCopyEngine(DiskStore(tmp_path), torch.device("cuda"))
    try:
        first, second = torch.full((1 << 20,), 1.0), torch.full((1 << 20,), 2.0)
        engine.store_now("w", "disk", first)
        torch.cuda._sleep(500_000_000)  # a few hundred ms of GPU time ahead of the copies
        a = engine.prefetch("w", "disk")
        assert a.future is not None
        a.future.result()  # read into the staging buffer; its upload waits behind the sleep
        engine.disk.write("w", second)  # the file changes, then is read again
        b = engine.prefetch("w", "disk")
        assert torch.equal(engine.wait(a).cpu(), first)
        assert torch.equal(engine.wait(b).cpu(), second)
    finally:
        engine.drain()
        engine.close()
        engine.disk.close()
