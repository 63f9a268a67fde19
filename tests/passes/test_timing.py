"""Timing: every allocating op gets a measured time, in groups of bounded input
bytes, and a call that fails on random inputs keeps its roofline estimate."""

from __future__ import annotations

import pytest
import torch
from conftest import toy

from planner.ir import build_program, capture
from planner.passes import timing
from planner.passes.workspace import distinct_calls


def _measured(monkeypatch: pytest.MonkeyPatch, group_bytes: int) -> dict[str, float | None]:
    monkeypatch.setattr(timing, "GROUP_BYTES", group_bytes)
    model, inputs = toy("mlp", 3, batch=32)
    captured = capture(model, inputs, "infer")
    program = build_program(captured)
    timing.annotate_measured_seconds(program, captured.graph_module, "cpu", repeats=3)
    signature_of, _ = distinct_calls(program, captured.graph_module)
    assert signature_of, "the toy has ops to time"
    for index in signature_of:
        seconds = program.ops[index].cost.measured_seconds
        assert seconds is not None and 0 < seconds < 1.0
    return {op.name: op.cost.measured_seconds for op in program.ops}


def test_every_allocating_op_is_timed_in_one_group_or_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one_group = _measured(monkeypatch, 2**40)
    one_call_per_group = _measured(monkeypatch, 1)
    timed = lambda m: {name for name, s in m.items() if s is not None}  # noqa: E731
    assert timed(one_group) == timed(one_call_per_group)


def test_a_call_failing_on_random_inputs_is_left_out() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    bad = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    graph.output(bad)
    x.meta["val"] = torch.empty(4)  # a real tensor where a fake one is expected is fine

    class Broken:
        __name__ = "broken"

        def __call__(self, *args: object) -> None:
            raise RuntimeError("no kernel for these inputs")

    node = next(n for n in graph.nodes if n.op == "call_function")
    node.target = Broken()  # type: ignore[assignment]
    assert timing.time_calls({"sig": node}, "cpu", repeats=2) == {}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's LSTM path")
def test_an_lstm_backward_is_timed_on_its_forwards_real_workspace() -> None:
    """``mkldnn_rnn_layer_backward`` reads a workspace the fake kernel traces as
    empty; given a made-up empty one it read past it (a crash for a hidden size of
    64). Timed on the forward's real workspace, it is measured like any op."""

    class Lstm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(64, 64, num_layers=2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0].pow(2).mean()

    captured = capture(Lstm(), (torch.randn(2, 32, 64),), "train")
    program = build_program(captured)
    timing.annotate_measured_seconds(program, captured.graph_module, "cpu", repeats=2)
    backwards = [op for op in program.ops if op.target == "aten.mkldnn_rnn_layer_backward.default"]
    assert len(backwards) == 2
    assert all(op.cost.measured_seconds is not None for op in backwards)
