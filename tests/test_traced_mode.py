"""planner/traced_mode.py: a plan runs the train/eval mode it traced, so calling
it in the other mode, where that would compute something else, is an error that
says to plan again; and planning for inference a model left in training mode
warns when its graph draws dropout or updates statistics because of it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError


def _with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4))


def test_a_training_plan_called_in_eval_mode_is_an_error_until_train_again() -> None:
    x = torch.randn(8, 16)
    pm = planner.plan(_with_dropout(), "100%", (x,), mode="train", profile="cpu")
    assert pm.training
    pm(x).sum().backward()
    pm.eval()  # before this check, dropout went on being drawn: silently not eval
    with pytest.raises(PlannerError, match=r"planned with the model in training mode .* eval"):
        pm(x)
    pm.train()
    pm(x).sum().backward()


def test_an_eval_traced_plan_called_in_training_mode_is_an_error() -> None:
    model, x = _with_dropout().eval(), torch.randn(8, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    assert not pm.training
    expected = model(x)
    torch.testing.assert_close(pm(x), expected)
    with pytest.raises(PlannerError, match=r"in eval mode .* model\.train\(\)"):
        pm.train()(x)


def test_a_model_whose_mode_changes_nothing_can_be_called_in_either() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()), torch.randn(4, 16)
    expected = model(x).detach()
    pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu")
    assert torch.equal(pm.eval()(x), expected)
    assert torch.equal(pm.train()(x), expected)


def test_inference_plan_of_a_model_in_training_mode_warns_when_it_matters() -> None:
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"in training mode, so its inference plan draws dropout"):
        planner.plan(_with_dropout(), "100%", (x,), mode="infer", profile="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training mode.*")
        pm = planner.plan(_with_dropout().eval(), "100%", (x,), mode="infer", profile="cpu")
    torch.testing.assert_close(pm(x), _with_dropout().eval()(x).detach())
