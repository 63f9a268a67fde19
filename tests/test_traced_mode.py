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
    with pytest.raises(PlannerError, match=r"in training mode and is now in eval mode.*deepcopy"):
        pm(x)
    pm.train()
    pm(x).sum().backward()


def test_the_model_switched_to_eval_after_planning_is_an_error_too() -> None:
    """``model.eval()`` switches the model's modules, not the planned module's own
    flag: the step went on drawing dropout, silently (found by a README audit)."""
    x = torch.randn(8, 16)
    model = _with_dropout()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    model.eval()
    assert pm.training
    with pytest.raises(
        PlannerError, match=r"now in eval mode.*model\.eval\(\) cannot.*model\.train"
    ):
        pm(x)
    model.train()
    pm(x).sum().backward()
    model[1].eval()  # one submodule: the model's own flag does not show it
    with pytest.raises(
        PlannerError, match=r"planned with model\.1 in training mode.*model\.1\.train"
    ):
        pm(x)
    model[1].train()
    pm(x).sum().backward()


def test_a_model_planned_with_frozen_batch_norms_is_checked_module_by_module() -> None:
    """Batch norms kept in eval mode while the rest trains (a detector's frozen
    backbone): each is held to its own traced mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 4))
    model[1].eval()
    x = torch.randn(8, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    pm(x).sum().backward()
    model.train()  # switches the frozen batch norm too
    with pytest.raises(PlannerError, match=r"model\.1 in eval mode and is now in training"):
        pm(x)
    model[1].eval()
    pm(x).sum().backward()


def test_an_eval_traced_plan_called_in_training_mode_is_an_error() -> None:
    model, x = _with_dropout().eval(), torch.randn(8, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    assert not pm.training
    expected = model(x)
    torch.testing.assert_close(pm(x), expected)
    with pytest.raises(PlannerError, match=r"in eval mode .* model\.train\(\)"):
        pm.train()(x)


class _Noisy(nn.Module):
    """Draws noise in either mode (a VAE's sampling): not mode-dependent."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h + 0.1 * torch.randn_like(h)


def test_a_training_plan_whose_mode_changes_nothing_can_be_called_in_either() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()), torch.randn(4, 16)
    expected = model(x).detach()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    torch.testing.assert_close(pm.eval()(x), expected)
    torch.testing.assert_close(pm.train()(x), expected)
    noisy = planner.plan(_Noisy(), "100%", (x,), mode="train", profile="cpu")
    noisy.eval()(x).sum().backward()


class _NoiseInTraining(nn.Module):
    """Its own ``if self.training`` branch, no dropout or norm module: the graph
    shows the branch traced only, and eval mode ran it, silently."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h + 0.5 * torch.randn_like(h) if self.training else h


class _HalfInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scaled(self.lin(x))

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:  # read in a helper method
        return h * 0.5 if self.training else h


def _halved_in_training(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _halved(module, h)


def _halved(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h * 0.5 if module.training else h


class _HalfByAFunction(nn.Module):
    """The flag read in module-level functions two calls down: missed before, so
    ``pm.eval()`` ran the halving branch, silently."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _halved_in_training(self, self.lin(x))


@pytest.mark.parametrize("cls", [_NoiseInTraining, _HalfInTraining, _HalfByAFunction])
@pytest.mark.parametrize("switched", ["pm", "model", "submodule"])
def test_a_module_of_the_users_that_reads_its_training_flag_is_watched(cls, switched) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.ReLU(), cls()), torch.randn(4, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    {"pm": pm, "model": model, "submodule": model[1]}[switched].eval()
    with pytest.raises(PlannerError, match="in eval mode"):
        pm(x)


def test_dropout_of_zero_and_norms_without_running_statistics_do_not_depend_on_mode() -> None:
    """Eval mode computes what training mode does there: a training plan of such a
    model serves an evaluation (it was refused)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 8),
        nn.Dropout(0.0),
        nn.BatchNorm1d(8, track_running_stats=False),
        nn.Unflatten(1, (2, 4)),
        nn.InstanceNorm1d(2),
    )
    x = torch.randn(4, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    expected = model.eval()(x).detach()
    model.train()
    torch.testing.assert_close(pm.eval()(x), expected, rtol=0, atol=0)


def test_an_inference_plan_is_called_in_whatever_mode_its_parent_is_in() -> None:
    """A frozen, planned part of a larger model that trains."""
    model, x = _with_dropout().eval(), torch.randn(8, 16)
    expected = model(x).detach()
    pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu")
    parent = nn.Sequential(pm).train()
    assert pm.training
    torch.testing.assert_close(parent(x), expected)


def test_inference_plan_of_a_model_in_training_mode_warns_when_it_matters() -> None:
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"in training mode, so its inference plan draws dropout"):
        planner.plan(_with_dropout(), "100%", (x,), mode="infer", profile="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training mode.*")
        pm = planner.plan(_with_dropout().eval(), "100%", (x,), mode="infer", profile="cpu")
    torch.testing.assert_close(pm(x), _with_dropout().eval()(x).detach())


class _Counter(nn.Module):
    """Counts its calls in a buffer, in either mode (as a static key/value cache
    is written at every decoding step)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.lin(x)


def test_inference_plan_warns_of_norm_statistics_not_of_other_buffer_updates() -> None:
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"inference plan updates BatchNorm statistics"):
        planner.plan(nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)), "100%", (x,))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training mode.*")
        counter = _Counter()
        pm = planner.plan(counter, "100%", (x,))
    with torch.no_grad():
        pm(x)
        pm(x)
    assert counter.calls.item() == 2


class _NoiseUnderNoGrad(nn.Module):
    """Reads self.training inside a decorated forward (the decorator's wrapper was
    scanned, not the function)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h + self._noise(h)

    @torch.no_grad()
    def _noise(self, h: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(h) if self.training else torch.zeros_like(h)


def test_a_decorated_method_and_transformers_drop_path_are_watched() -> None:
    """transformers' DropPath (ConvNext's drop_path_rate) draws with torch.rand in
    training mode only: after pm.eval() the plan ran it, 0.02 from eager's
    evaluation, silently. A library module reading its flag is held to its mode
    where the graph draws random numbers."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    pm = planner.plan(nn.Sequential(_NoiseUnderNoGrad()), "100%", (x,), mode="train")
    pm.eval()
    with pytest.raises(PlannerError, match="in eval mode"):
        pm(x)
    config = ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        drop_path_rate=0.5,
        image_size=32,
    )
    model = ConvNextModel(config)
    pm = planner.plan(model, "100%", (torch.randn(2, 3, 32, 32),), mode="train", profile="cpu")
    model.eval()
    with pytest.raises(PlannerError, match="in eval mode"):
        pm(torch.randn(2, 3, 32, 32))


class _CallsAMethodNamedLikeAFunction(nn.Module):
    """``self._halved`` is its own method, reading no flag: the module-level
    ``_halved`` above (which does) is not what it calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._halved(self.lin(x))

    def _halved(self, h: torch.Tensor) -> torch.Tensor:
        return h * 0.5


def test_only_functions_called_by_global_name_are_followed() -> None:
    from planner.traced_mode import behaves_by_mode

    assert behaves_by_mode(_HalfByAFunction())
    assert not behaves_by_mode(_CallsAMethodNamedLikeAFunction())


def test_a_dropout_free_transformers_attention_plan_can_be_evaluated() -> None:
    """SDPA is tagged as drawing random numbers for its dropout; at dropout_p 0 it
    draws none, so transformers' modules are not held to training mode: pm.eval()
    on a ViT training plan (dropout 0) runs and matches eager's evaluation."""
    import copy

    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    model = ViTForImageClassification(config).train()
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference(x).logits
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x).logits, expected)


def test_a_dropped_training_plan_keeps_no_class_of_its_model_alive() -> None:
    """The check of which classes read ``self.training`` cached its answer per class
    in an unbounded ``functools.cache``: every planned model's class stayed alive,
    and with it what the class reaches. A class made per model (defined in a
    factory, its methods closing over the layers) kept the layers' weights, and
    their gradients, after the plan and the model were dropped: 8 MiB more per
    training plan of a 4 MiB model, forever."""
    import gc
    import weakref

    x = torch.randn(4, 16)

    def make() -> tuple[nn.Module, nn.Module]:
        body = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))

        class Wrapper(nn.Module):  # a class of its own per model, closing over body
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return body(x)

        wrapper = Wrapper()
        wrapper.body = body
        return wrapper, body

    model, body = make()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    pm(x).sum().backward()
    layers, cls = weakref.ref(body), weakref.ref(type(model))
    pm.close()
    del pm, model, body
    gc.collect()
    assert cls() is None, "the planned model's class outlived the plan and the model"
    assert layers() is None, "the layers its class closes over outlived the plan and the model"
