"""Training a model whose outputs alias each other, an intermediate or an input:
each output comes back as eager's (values, requires_grad, view of the same base)
and gradients flow through the views as in eager. Before ``output_aliases``,
planning such a model failed ("cannot match the model's 2 floating-point outputs
to the 1 gradients the captured backward expects"), CLIP's among them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError


class Aliasing(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        y = self.b(torch.relu(self.a(x)))
        if self.kind == "view_of_another_output":  # CLIP's logits_per_image
            return y, y.t()
        if self.kind == "views_of_one_intermediate":
            z = y * 2
            return z[0], z[1:]
        if self.kind == "view_of_an_input":  # needs no gradient, like x itself
            return y, x.view(-1)
        if self.kind == "output_needing_no_gradient":
            return y, x * 2
        raise AssertionError(self.kind)


def _loss(outs: tuple) -> torch.Tensor:
    """Weights each output differently, so a gradient sent to the wrong one shows."""
    return sum((o.float() ** 2).sum() * (i + 1) for i, o in enumerate(outs) if o.requires_grad)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "kind",
    [
        "view_of_another_output",
        "views_of_one_intermediate",
        "view_of_an_input",
        "output_needing_no_gradient",
    ],
)
def test_aliased_outputs_train_as_in_eager(kind: str) -> None:
    torch.manual_seed(0)
    model = Aliasing(kind)
    eager = copy.deepcopy(model)
    x = torch.randn(8, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=5)

    for _ in range(2):  # a second step reuses the wiring
        outs, expected = pm(x), eager(x)
        assert [o.requires_grad for o in outs] == [o.requires_grad for o in expected]
        for got, want in zip(outs, expected):
            assert torch.equal(got, want)
            assert got.stride() == want.stride()
        if expected[1]._base is expected[0]:
            assert outs[1]._base is outs[0]
        _loss(outs).backward()
        _loss(expected).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for module in (model, eager):
            module.zero_grad()


@pytest.mark.parametrize(
    ("mode", "requires_grad"), [("train", True), ("train", False), ("infer", False)]
)
def test_an_in_place_update_of_an_input_is_a_clear_error(mode: str, requires_grad: bool) -> None:
    """Before, training with an input that needs no gradient handed back the
    written input as the output, silently; inference failed with "'x' is not in
    list"."""

    class Bumps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return self.lin(x)

    x = torch.randn(2, 4, requires_grad=requires_grad)
    with pytest.raises(PlannerError, match=r"Bumps.forward writes in place into its input"):
        planner.plan(Bumps(), "100%", (x.clone(),), mode=mode, profile="cpu")


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("aliasing", ["same tensor", "views of one storage"])
def test_an_in_place_update_of_an_aliased_input_is_a_clear_error(mode: str, aliasing: str) -> None:
    """Inference used to fail inside torch's run_decompositions with a bare
    "AssertionError: expected compiled_fn to be GraphModule" when the written input
    shared its storage with another input."""

    class BumpsFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x.add_(1)
            return self.lin(y)

    if aliasing == "same tensor":
        t = torch.randn(2, 4)
        inputs = (t, t)
    else:
        base = torch.randn(2, 8)
        inputs = (base[:, :4], base[:, 4:])
    with pytest.raises(PlannerError, match=r"BumpsFirst.forward writes in place into its input"):
        planner.plan(BumpsFirst(), "100%", inputs, mode=mode, profile="cpu")
