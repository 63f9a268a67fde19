"""Per-call Python overhead of a planned call: what it runs besides the planned ops.

Checked by which Python frames a steady call enters (no timing): the executor calls
each ATen op's own C++ callable (not ``OpOverload.__call__``, a frame per op); a
call without autocast on a CPU enters no context manager to turn autocast off or to
split CUDA blocks; inputs laid out as traced skip the layout arithmetic. Each fast
path gives what the slow one does (outputs and gradients bit-identical to eager;
the same errors)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError
from planner.step_wiring import with_strides


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.ReLU())])


def _frames(fn) -> list[str]:
    """The Python functions (file:name) entered while ``fn`` runs."""
    seen: list[str] = []

    def hook(frame, event, arg):  # noqa: ANN001
        if event == "call":
            seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def _not_entered(frames: list[str]) -> None:
    op_calls = [f for f in frames if f.endswith("torch/_ops.py:__call__")]
    assert not op_calls, f"{len(op_calls)} OpOverload.__call__ frames per call"
    for name in ("autocast_off", "exact_blocks", "strides_that_matter", "_layout"):
        assert not [f for f in frames if f.endswith(":" + name)], name


def test_an_inference_call_runs_its_ops_directly_and_equals_eager() -> None:
    model = _mlp()
    x = torch.randn(2, 16)
    expected = model(x)
    pm = planner.plan(copy.deepcopy(model), "100%", example_inputs=(x,))
    with torch.no_grad():
        pm(x)
        frames = _frames(lambda: pm(x))
        assert torch.equal(pm(x), expected)
    _not_entered(frames)
    pm.close()


def test_a_training_step_runs_its_ops_directly_and_equals_eager() -> None:
    eager, model = _mlp(), _mlp()
    x = torch.randn(2, 16)
    pm = planner.plan(model, "100%", example_inputs=(x,), mode="train")
    pm(x).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    frames = _frames(lambda: pm(x).pow(2).mean().backward())
    _not_entered(frames)
    eager(x).pow(2).mean().backward()
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name
    pm.close()


def test_fast_paths_keep_the_checks() -> None:
    model = _mlp()
    x = torch.randn(2, 16)
    pm = planner.plan(copy.deepcopy(model), "100%", example_inputs=(x,))
    with torch.no_grad():
        with pytest.raises(PlannerError, match="planned for inputs"):
            pm(torch.randn(3, 16))
        with pytest.raises(PlannerError, match="planned for inputs"):
            pm(x.double())
        with pytest.raises(PlannerError, match="strides"):
            pm(torch.randn(16, 2).t())
        with pytest.raises(PlannerError, match="autocast"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pm(x)
        # a layout that differs only in a size-1 dim's stride is the traced one
        y = torch.randn(1, 16)
        pm1 = planner.plan(copy.deepcopy(model), "100%", example_inputs=(y,))
        odd = torch.randn(1, 32)[:, :16]  # shape (1, 16), strides (32, 1)
        assert odd.stride() != y.stride()
        assert torch.equal(pm1(odd), model(odd))
    with pytest.raises(PlannerError, match="require grad"):
        pm(x.requires_grad_())
    pm.close()
    pm1.close()


def test_a_plan_made_under_autocast_runs_with_autocast_off_inside() -> None:
    model = _mlp()
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pm = planner.plan(copy.deepcopy(model), "100%", example_inputs=(x,))
        expected = torch.export.export(copy.deepcopy(model), (x,)).module()(x)
        with torch.no_grad():
            out = pm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    with pytest.raises(PlannerError, match="autocast"):
        with torch.no_grad():
            pm(x)
    pm.close()


def test_with_strides_keeps_a_tensor_laid_out_as_traced() -> None:
    t = torch.randn(4, 3)
    assert with_strides(t, (3, 1)) is t
    assert with_strides(t[:, :1], (1, 1)) is not None
    u = with_strides(t, (1, 4))
    assert u.stride() == (1, 4) and torch.equal(u, t)
