"""planner/ir/build.py: ops that draw random numbers are marked as such, by ATen's
own tag, including ones whose names say nothing of randomness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.errors import CaptureError
from planner.ir.build import build_program
from planner.ir.capture import capture
from planner.ir.program import Phase


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


def test_training_ops_carry_their_source_line_and_backward_ops_say_so() -> None:
    """Every op of the joint graph names the model's line that made it (the floor
    message, the report's peak op and the executor's comments read it); a backward
    op names the forward line it differentiates, marked ``(backward)``."""
    program = build_program(capture(_Noisy(), (torch.randn(4, 8),), "train"))
    first = _Noisy.forward.__code__.co_firstlineno
    forward_lines = {f"test_build.py:{first + n} in forward" for n in (1, 2, 3)}
    stacks = {op.name: op.stack for op in program.ops}
    assert None not in stacks.values(), stacks
    for op in program.ops:
        line = op.stack.removesuffix(" (backward)")
        assert line in forward_lines, (op.name, op.stack)
        assert op.stack.endswith(" (backward)") == (op.phase is Phase.BACKWARD), op
    assert stacks["native_dropout"] == f"test_build.py:{first + 1} in forward"
    assert stacks["exponential"] == f"test_build.py:{first + 2} in forward"


class _Regions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.a(x))
        with torch.no_grad():
            self.ema.mul_(0.9).add_(h.float().mean(0), alpha=0.1)
        return self.b(h.float() * self.ema).sum()


def test_ops_of_autocast_and_no_grad_regions_carry_their_source_line() -> None:
    """export makes each region a graph module of its own, which a higher-order op
    calls: its ops, forward and backward, named no line before."""
    program = build_program(capture(_Regions(), (torch.randn(4, 8),), "train"))
    first = _Regions.forward.__code__.co_firstlineno
    stacks = {op.name: op.stack for op in program.ops}
    assert None not in stacks.values(), stacks
    region_ops = [op for op in program.ops if op.target == "aten.addmm.default"]
    assert region_ops[0].stack == f"test_build.py:{first + 2} in forward", stacks
    grad_of_relu = [op for op in program.ops if op.target == "aten.threshold_backward.default"]
    assert grad_of_relu[0].stack == f"test_build.py:{first + 2} in forward (backward)", stacks


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


class _MaskedSum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0].sum()


class _ScaledByItsMax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.abs().max().item()


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_MaskedSum(), r"shape depends on the input's values .* at test_build\.py:\d+ in forward"),
        (
            _ScaledByItsMax(),
            r"reads a tensor's value into Python .* at test_build\.py:\d+ in forward",
        ),
    ],
    ids=["masked-index", "item"],
)
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_values_the_plan_cannot_know_ahead_name_the_line(
    model: torch.nn.Module, match: str, mode: str
) -> None:
    """torch.export traces both (a symbol for the size or the value); building the
    program raised torch's data-dependent guard error, or a KeyError, from inside
    the builder, naming neither the model's line nor what to do. Training's
    AOTAutograd trace failed before that, pointing at generated code."""
    x = torch.randn(4, 8, requires_grad=mode == "train")
    with pytest.raises(CaptureError, match=match):
        build_program(capture(model, (x,), mode))


class _CTCLoss(torch.nn.Module):
    def forward(self, log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((2,), 10, dtype=torch.long)
        return torch.nn.functional.ctc_loss(log_probs, targets, lengths, lengths // 2)


def test_an_op_whose_output_shape_torch_cannot_size_says_to_keep_it_out() -> None:
    """F.ctc_loss's message said to avoid Python side effects, which it has none of."""
    log_probs = torch.randn(10, 2, 5).log_softmax(-1)
    targets = torch.randint(1, 5, (2, 5))
    with pytest.raises(CaptureError, match=r"_ctc_loss.* depends on its inputs' values.*outside"):
        capture(_CTCLoss(), (log_probs, targets), "infer")
