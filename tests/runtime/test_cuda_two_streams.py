"""Calls of one planned module on two CUDA streams (threads with a stream each, or
a caller that switches streams between calls). The host tier's pinned buffers are
per key and reused by every call, so a copy into one must follow the last copy out
of it, and the other way round, whatever stream the calls that issued them ran on:
the compute stream orders them only within one stream. Checked on simulated
streams (``fake_cuda``); outputs checked against eager, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fake_cuda import CopyOrderSimulator
from fake_cuda import fake_cuda_fixture as fake_cuda_fixture  # noqa: F401
from torch import nn

import planner
from planner.runtime import copy_engine
from planner.runtime.copy_engine import CudaCopyEngine

#: the H100's profile with a slow disk (the host tier is chosen) and slow matmuls
#: (recomputing ``h`` below costs more than its copies)
PROFILE = dataclasses.replace(
    planner.get_profile("h100"),
    disk_read_bandwidth=1e7,
    disk_write_bandwidth=1e7,
    matmul_flops={k: 1e9 for k in planner.get_profile("h100").matmul_flops},
)


class _Skip(nn.Module):
    """A skip connection around a chain, no weights: at the smallest budget ``h``
    waits through the chain in the host tier and is read back at the end, so a
    call's first copy is a write into ``h``'s pinned buffer, and its last a read."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x @ w
        m = h.sin().cos().exp().sin().cos()
        return m + h


def _alternate_streams(fake_cuda: CopyOrderSimulator) -> list[str]:
    """Four calls, every other one on a second stream; the hazards seen."""
    torch.manual_seed(0)
    model = _Skip().eval()
    x, w = torch.randn(256, 4096), torch.randn(4096, 1024) / 64
    with torch.no_grad():
        expected = model(x, w)
    pm = planner.plan(model, "min", (x, w), profile=PROFILE, time_limit=5)
    assert any(a.kind == "offload" and a.tier == "host" for a in pm.plan.actions), pm.code
    cuda = copy_engine.torch.cuda  # the simulator's
    other = cuda.Stream()
    with torch.no_grad():
        for k in range(4):
            with cuda.stream(other) if k % 2 else torch.no_grad():
                assert torch.equal(pm(x, w), expected)
    pm._engine.drain()
    return fake_cuda.hazards


def test_calls_on_two_streams_order_their_copies_of_a_host_buffer(
    fake_cuda: CopyOrderSimulator,
) -> None:
    assert _alternate_streams(fake_cuda) == []


def test_without_ordering_after_reads_a_write_races_the_other_streams_read(
    fake_cuda: CopyOrderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CudaCopyEngine, "_after_reads_of", lambda self, key: None)
    hazards = _alternate_streams(fake_cuda)
    assert any("_upload" in h and "_download" in h for h in hazards), hazards
