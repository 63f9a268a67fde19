"""torch.export's two quadratic helpers, replaced while planner captures: same
answers, same graphs, and the signature's name maps built once, not per input."""

from __future__ import annotations

import contextlib
import itertools
import re
import sys

import pytest
import torch
from torch import nn
from torch.export.graph_signature import ExportGraphSignature

import planner
import planner.ir.capture  # noqa: F401
from planner.ir.export_speedups import _is_call_name

capture_module = sys.modules["planner.ir.capture"]  # the package exports a function by that name


class ManyLayers(nn.Module):
    """Many parameters under one parent, buffers too, and a nested block."""

    def __init__(self, n: int = 30) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)])
        for i in range(10):
            self.register_buffer(f"shift{i}", torch.randn(8))
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)
        for i in range(10):
            h = h + getattr(self, f"shift{i}")
        return self.block(h)


def _make() -> nn.Module:
    torch.manual_seed(0)
    return ManyLayers()


def _normalized(analysis: planner.passes.pipeline.Analysis) -> tuple:
    gm = analysis.captured.graph_module
    nodes = []
    for node in gm.graph.nodes:
        meta = {}
        for k, v in node.meta.items():
            if isinstance(v, torch.Tensor):
                v = (tuple(v.shape), v.dtype, v.stride())
            elif k in ("nn_module_stack", "source_fn_stack", "torch_fn", "from_node"):
                v = re.sub(r"graph_id=\d+| at 0x[0-9a-f]+", "", repr(v))
            else:
                v = type(v).__name__
            meta[k] = v
        nodes.append((node.name, node.op, str(node.target), sorted(meta.items())))
    program = analysis.program
    return (
        gm.code,
        nodes,
        [(r.kind, r.source) for r in analysis.captured.input_roles],
        [(op.name, op.target) for op in program.ops]
        if hasattr(program.ops[0], "target")
        else [op.name for op in program.ops],
        [(v.name, v.nbytes) for v in program.values],
        analysis.unplanned_peak_bytes,
    )


def test_is_call_name_answers_as_torchs_regex() -> None:
    names = ["a", "a@1", "a@12", "a@", "a@x", "ab", "a\n", "a@3\n", "b", "a@\u0661", "a@1a",
             "", "@1", "a@@1", "a@1\n\n", "a.b", "a.b@2", "layers"]  # fmt: skip
    for call_name, base in itertools.product(names, ["a", "", "b", "a.b", "layers"]):
        expected = re.match(re.escape(base) + r"(@\d+)?$", call_name) is not None
        assert _is_call_name(call_name, base) == expected, (call_name, base)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_capture_is_the_same_with_the_linear_helpers(mode: str, monkeypatch) -> None:
    x = torch.randn(4, 8)
    faster = _normalized(planner.analyze(_make(), (x,), mode=mode))
    monkeypatch.setattr(capture_module, "faster_export_bookkeeping", contextlib.nullcontext)
    torchs = _normalized(planner.analyze(_make(), (x,), mode=mode))
    assert faster == torchs


def test_plan_is_the_same_with_the_linear_helpers(monkeypatch) -> None:
    x = torch.randn(4, 8)
    faster = planner.plan(_make(), "100%", example_inputs=(x,), time_limit=0)
    out = faster(x)
    monkeypatch.setattr(capture_module, "faster_export_bookkeeping", contextlib.nullcontext)
    torchs = planner.plan(_make(), "100%", example_inputs=(x,), time_limit=0)
    assert faster.code == torchs.code
    assert torch.equal(out, torchs(x))
    assert torch.equal(out, _make()(x))


def test_signature_maps_are_built_once_per_decomposition(monkeypatch) -> None:
    """torch's helper read ``inputs_to_parameters`` once per graph input (each read
    rebuilds the map): 76 reads here, quadratic in the parameters."""
    reads = []
    original = ExportGraphSignature.inputs_to_parameters

    def counted(self):  # type: ignore[no-untyped-def]
        reads.append(1)
        return original.fget(self)

    monkeypatch.setattr(ExportGraphSignature, "inputs_to_parameters", property(counted))
    planner.analyze(_make(), (torch.randn(4, 8),))
    assert len(reads) < 20, len(reads)
