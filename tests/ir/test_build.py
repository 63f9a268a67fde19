"""planner/ir/build.py: ops that draw random numbers are marked as such, by ATen's
own tag, including ones whose names say nothing of randomness."""

from __future__ import annotations

import torch
from torch import nn

from planner.ir.build import build_program
from planner.ir.capture import capture


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc(x))
        noise = torch.empty_like(h).exponential_()  # no "rand" in its name
        return (h * noise).sum()


def test_random_ops_are_marked_by_their_tag() -> None:
    program = build_program(capture(_Noisy(), (torch.randn(4, 8),), "train"))
    marked = {op.target for op in program.ops if op.draws_random}
    assert marked == {"aten.native_dropout.default", "aten.exponential.default"}
    assert any(op.target == "aten.addmm.default" and not op.draws_random for op in program.ops)


def test_cuda_storages_hold_whole_allocator_blocks() -> None:
    """On CUDA a storage is planned at what the caching allocator hands out (and
    its counters count): its bytes rounded up to 512; elsewhere its bytes."""
    from planner.ir.build import allocated_bytes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [allocated_bytes(n, cuda) for n in (0, 1, 4, 512, 513, 2048)] == [
        0, 512, 512, 512, 1024, 2048,
    ]  # fmt: skip
    assert [allocated_bytes(n, cpu) for n in (0, 4, 513)] == [0, 4, 513]
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    program = build_program(capture(model, (torch.randn(7, 3),)))
    assert any(s.nbytes % 512 for s in program.storages)  # CPU: bytes as they are
    assert all(s.nbytes == program.values[s.base].nbytes for s in program.storages)
