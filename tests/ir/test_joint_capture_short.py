"""Training capture stops AOTAutograd once it has the joint graph and the
forward's metadata: the same capture as running AOTAutograd to its end (which
partitions the joint and compiles both halves, all thrown away), without that."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch._functorch.partitioners as partitioners
from torch import nn

import planner.ir.capture  # noqa: F401

capture_module = sys.modules["planner.ir.capture"]  # the package exports a function by that name


class CountsAndViews(nn.Module):
    """A buffer updated in place, outputs that alias each other and the input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.count += 1
        y = self.lin(x)
        return y, y.view(-1), y.t(), x[0]


class SpectralNormed(nn.Module):
    """A buffer written inside no_grad (the power iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).sum()


def _conv_bn() -> tuple[nn.Module, tuple]:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )
    return model, (torch.randn(2, 3, 8, 8),)


#: what AOTAutograd's partition of the joint adds to the metadata: about the
#: forward and backward graphs it would compile, which a plan never runs
PARTITION_FIELDS = {
    "num_symints_saved_for_bw",
    "num_tensors_saved_with_no_vc_check",
    "num_opaque_objects_saved_for_bw",
    "bw_donated_idxs",
}

CASES = {
    "conv_bn": _conv_bn,
    "aliasing_outputs": lambda: (CountsAndViews(), (torch.randn(4, 8, requires_grad=True),)),
    "spectral_norm": lambda: (SpectralNormed(), (torch.randn(4, 8),)),
}


def _captured(make, full: bool, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    partitions = []
    real = partitioners.default_partition

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        partitions.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(partitioners, "default_partition", counted)
    monkeypatch.setattr(capture_module, "_FULL_AOT_RUN", full)
    torch.manual_seed(0)
    model, args = make()
    captured = capture_module.capture(model.train(), args, mode="train")
    return captured, len(partitions)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_capture_without_the_partition(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    full, full_partitions = _captured(CASES[case], True, monkeypatch)
    short, short_partitions = _captured(CASES[case], False, monkeypatch)
    assert (full_partitions, short_partitions) == (1, 0)
    assert short.extra["fw_metadata"] is not None
    short_meta, full_meta = short.extra["fw_metadata"], full.extra["fw_metadata"]
    differ = {
        f.name
        for f in dataclasses.fields(full_meta)
        if repr(getattr(short_meta, f.name)) != repr(getattr(full_meta, f.name))
    }
    assert differ <= PARTITION_FIELDS
    assert short.graph_module.code == full.graph_module.code
    assert repr(short.input_roles) == repr(full.input_roles)
    assert repr(short.output_roles) == repr(full.output_roles)
    assert short.num_forward_outputs == full.num_forward_outputs
