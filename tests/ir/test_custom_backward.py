"""A torch.autograd.Function with its own backward is refused for training
(planner/ir/custom_backward.py): the trace differentiates its forward instead,
and a straight-through estimator's gradients were all zero, silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import planner
from planner.errors import CaptureError
from planner.ir import capture
from planner.ir.custom_backward import DIFFERENTIATED_AS_TRACED, functions_applied


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        return grad


class _Quantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_StraightThrough.apply(self.a(x) * 4)).pow(2).mean()


def test_a_function_with_its_own_backward_is_refused_for_training_not_inference() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(CaptureError, match=r"_StraightThrough.*would not run.*detach\(\)"):
        planner.plan(_Quantized(), "100%", (x,), mode="train", profile="cpu")
    # its forward is all inference runs: traced as it computes
    model = _Quantized().eval()
    with torch.no_grad():
        pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu")
        assert torch.equal(pm(x), _Quantized()(x))


def test_a_function_applied_where_no_gradient_flows_is_not_refused() -> None:
    class UnderNoGrad(_Quantized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                scale = _StraightThrough.apply(x.abs().max())
            return self.b(self.a(x) / scale).pow(2).mean()

    capture(UnderNoGrad(), (torch.randn(4, 8),), mode="train")


def test_the_recording_puts_apply_back() -> None:
    apply = torch.autograd.Function.__dict__["apply"]
    with pytest.raises(RuntimeError), functions_applied() as seen:
        _StraightThrough.apply(torch.ones(2, requires_grad=True))
        raise RuntimeError
    assert seen == [_StraightThrough]
    assert torch.autograd.Function.__dict__["apply"] is apply


def test_bloom_trains_with_its_gelu_function_differentiated_as_traced() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.bloom import modeling_bloom

    name = f"{modeling_bloom.__name__}.GeLUFunction"
    assert name in DIFFERENTIATED_AS_TRACED and hasattr(modeling_bloom, "GeLUFunction")
    config = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    model = transformers.BloomForCausalLM(config).train()

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(ids, use_cache=False).logits.pow(2).mean()

    with functions_applied() as seen:
        capture(Loss(), (torch.randint(0, 64, (2, 8)),), mode="train")
    assert modeling_bloom.GeLUFunction in seen


@torch.library.custom_op("planner_tests::tripled_round", mutates_args=())
def _tripled_round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


@_tripled_round.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_tripled_round.register_autograd(lambda ctx, grad: grad * 3.0)  # not round's derivative (0)


class _RoundsThroughACustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_tripled_round(self.a(x) * 4)).pow(2).mean()


def test_a_custom_ops_registered_backward_runs_in_the_planned_step() -> None:
    """torch.library wraps a custom op's registered backward in a Function of its
    own; taken for one whose backward the trace drops, it was refused, and with it
    Mixtral (transformers 5.25 sends its experts through such an op). The op is one
    node of the trace and its backward runs: gradients equal eager's, here where
    that backward is not the derivative of the forward."""
    torch.manual_seed(0)
    model, x = _RoundsThroughACustomOp(), torch.randn(4, 8)
    reference = _RoundsThroughACustomOp()
    reference.load_state_dict(model.state_dict())
    reference(x).backward()
    assert reference.a.weight.grad.abs().sum() > 0, "no gradient through the op: proves nothing"
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=5)
    pm(x).backward()
    for name, p in reference.named_parameters():
        assert torch.equal(model.get_parameter(name).grad, p.grad), name
