"""planner/ir/hooks.py: hooks on the model, at planning and at each call. Before,
a module backward hook was silently left out of a training plan, hooks registered
after planning were silently not run, and a tensor hook on a parameter whose
gradient the plan delivers was called with ``None``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import planner
from planner.errors import CaptureError, PlannerError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)
    )


def _halve(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 0.5


X = torch.randn(128, 256)


def test_a_module_backward_hook_is_an_error_when_planning_training() -> None:
    model = _mlp()
    model[2].register_full_backward_hook(lambda _m, grad_in, _g: (grad_in[0] * 0.5,))
    with pytest.raises(CaptureError, match=r"module backward hooks on 2 \(backward hook\)"):
        planner.plan(model, "100%", (X,), mode="train", profile="cpu")
    planner.plan(model.eval(), "100%", (X,), mode="infer", profile="cpu")  # never run there


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_forward_hooks_at_planning_are_traced_in_with_a_warning(mode: str) -> None:
    model = _mlp()
    model[2].register_forward_hook(_halve)
    with pytest.warns(UserWarning, match=r"forward hooks on 2 \(forward hook\) ran once"):
        pm = planner.plan(model, "100%", (X,), mode=mode, profile="cpu")
    with torch.no_grad():
        assert torch.equal(pm(X), model(X))  # the hook's effect is in the plan


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_hooks_registered_or_removed_after_planning_are_an_error(mode: str) -> None:
    model = _mlp()
    pm = planner.plan(model, "100%", (X,), mode=mode, profile="cpu")
    handle = model[2].register_forward_pre_hook(lambda _m, args: (args[0] * 0.5,))
    # before: the call ran without the hook, and differed from eager
    with pytest.raises(PlannerError, match=r"since planning on 2 \(forward pre-hook\)"):
        pm(X)
    handle.remove()
    pm(X)  # as planned again
    other = _mlp()
    other[2].register_forward_hook(_halve)
    with pytest.warns(UserWarning, match="ran once"):
        hooked = planner.plan(other, "100%", (X,), mode=mode, profile="cpu")
    other[2]._forward_hooks.clear()  # removed: the plan still halves
    with pytest.raises(PlannerError, match="registered or removed since planning"):
        hooked(X)


def test_a_hooked_parameters_gradient_goes_through_autograd_which_runs_the_hook() -> None:
    model, reference = _mlp(), _mlp()
    for m in (model, reference):
        m[2].weight.register_hook(lambda g: g * 0.5)
    pm = planner.plan(model, "50%", (X,), mode="train", profile="cpu")
    delivered = {a.tensor for a in pm.plan.actions if a.kind == "deliver"}
    assert delivered, "nothing delivered: the test proves nothing"
    assert "grad of 2.weight" not in delivered
    pm(X).pow(2).mean().backward()
    reference(X).pow(2).mean().backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, r.grad)


def test_a_tensor_hook_after_planning_runs_unless_the_plan_delivers_that_gradient() -> None:
    model = _mlp()
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "50%", (X,), mode="train", profile="cpu")
    delivered = {a.tensor.removeprefix("grad of ") for a in pm.plan.actions if a.kind == "deliver"}
    params = dict(model.named_parameters())
    name = sorted(delivered)[0]
    handle = params[name].register_hook(lambda g: g * 0.5)
    # before: the engine called the hook with None (a TypeError in the user's hook)
    with pytest.raises(PlannerError, match=rf"tensor hooks registered since planning on {name}"):
        pm(X)
    handle.remove()
    kept = next(n for n in params if n not in delivered)  # returned through autograd
    for p in (params[kept], dict(reference.named_parameters())[kept]):
        p.register_hook(lambda g: g * 0.5)
    pm(X).pow(2).mean().backward()
    reference(X).pow(2).mean().backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, r.grad)


class _InstallsItsOwnHook(nn.Module):
    """Installs a (recording) hook in its first forward, as transformers' output
    recorders do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.body[2]._forward_hooks:
            self.body[2].register_forward_hook(lambda *_: None)
        return self.body(x)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_hooks_the_model_installs_while_traced_are_not_taken_for_the_callers(mode: str) -> None:
    model = _InstallsItsOwnHook()
    pm = planner.plan(model, "100%", (X,), mode=mode, profile="cpu")
    nn.Linear(2, 2).register_forward_hook(lambda *_: None)  # any hook, anywhere: a rescan
    # before: "hooks registered or removed since planning on body.2 (forward hook)"
    pm(X)


def test_a_transformers_models_own_recording_hooks_do_not_warn() -> None:
    """A DPT called once before planning has transformers' output-recording hooks
    on its layers: planning warned about all of them, which the caller never set."""
    import warnings

    import transformers

    torch.manual_seed(0)
    config = transformers.DPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16],
        fusion_hidden_size=16, head_in_index=-1, reassemble_factors=[4, 2],
    )  # fmt: skip
    model, x = transformers.DPTForDepthEstimation(config).eval(), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).predicted_depth
    assert any(m._forward_hooks for m in model.modules()), "no recorders: proves nothing"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = planner.plan(model, "100%", (x,), mode="infer", profile="cpu")
    assert not [w for w in caught if "forward hooks" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(pm(x).predicted_depth, expected)


def test_gradient_checkpointings_input_hook_does_not_warn() -> None:
    """transformers' ``gradient_checkpointing_enable()`` hooks the input embeddings
    to make their output require grad (``enable_input_require_grads``): every plan
    warned that a recording hook records nothing. The step is eager's."""
    import warnings

    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert model.transformer.wte._forward_hooks, "no hook: proves nothing"
    ids = torch.randint(0, 32, (2, 8))
    expected = model(input_ids=ids, labels=ids).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids, labels=ids).loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = planner.plan(Loss(), "100%", (ids,), mode="train", profile="cpu")
    assert not [w for w in caught if "forward hooks" in str(w.message)]
    loss = pm(ids)
    loss.backward()
    assert torch.equal(loss.detach(), expected.detach())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_call_inside_flop_counter_mode_runs_and_counts_eagers_flops(mode: str) -> None:
    """``FlopCounterMode`` installs torch's ``ModuleTracker`` hooks on all modules,
    which only record which module runs: a planned call inside it was refused as
    "hooks registered or removed since planning on all modules", hooks the caller
    never registered. Hooks of the caller's own on all modules still are."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    eager = copy.deepcopy(model)
    x = torch.randn(4, 16)
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    with FlopCounterMode(display=False) as planned:
        out = pm(x)
        if mode == "train":
            out.sum().backward()
    with FlopCounterMode(display=False) as unplanned:
        expected = eager(x)
        if mode == "train":
            expected.sum().backward()
    assert torch.equal(out, expected)
    assert planned.get_total_flops() == unplanned.get_total_flops() > 0
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(PlannerError, match="hooks registered or removed since planning"):
            pm(x)
    finally:
        handle.remove()
