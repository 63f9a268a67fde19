"""planner/call_checks.py and the state dict of a training plan: a call that no
longer matches what was planned (an input that now requires grad, a replaced
parameter, create_graph=True) is an error that says what to do, where before it
silently computed something else than eager; a training plan's state dict is the
model's, under the model's names."""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError
from planner.passes.device_profile import get_profile
from planner.released import ReleasedWeight


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.norm = nn.BatchNorm1d(64)
        self.c = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.norm(self.a(x))))


def _planned(x: torch.Tensor | None = None) -> tuple[_Net, planner.PlannedModule, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(64, 32) if x is None else x
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    return model, pm, x


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_an_input_that_now_requires_grad_is_an_error_not_a_missing_gradient() -> None:
    _, pm, x = _planned()
    # before the check: the call ran, and x.grad stayed None after backward()
    with pytest.raises(PlannerError, match=r"args\[0\] require grad.*requires_grad_\(\)"):
        pm(x.clone().requires_grad_())
    with torch.no_grad():  # no backward to miss it: allowed
        pm(x.clone().requires_grad_())
    pm(x).sum().backward()  # the check left the module usable


def test_an_input_planned_as_requiring_grad_gets_eager_gradient() -> None:
    torch.manual_seed(0)
    reference, x = _Net(), torch.randn(64, 32)
    model = copy.deepcopy(reference)
    x_ref = x.clone().requires_grad_()
    reference(x_ref).pow(2).sum().backward()
    x_planned = x.clone().requires_grad_()
    pm = planner.plan(model, "100%", (x_planned,), mode="train", profile="cpu")
    pm(x_planned).pow(2).sum().backward()
    assert torch.equal(x_planned.grad, x_ref.grad)


def test_a_replaced_parameter_is_an_error_naming_it() -> None:
    model, pm, x = _planned()
    pm(x).sum().backward()
    model.a.weight = nn.Parameter(torch.zeros_like(model.a.weight))
    # before the check: the output still used the old weight, and the new one got no .grad
    with pytest.raises(
        PlannerError, match=r"replaced since planning: a\.weight\..*planner\.plan again"
    ):
        pm(x)


@pytest.mark.parametrize("smallest", [False, True])
def test_a_parameter_replaced_after_an_inference_plan_is_an_error_naming_it(
    smallest: bool,
) -> None:
    """The plan reads the weights it keeps on the device from the model in place:
    given a new nn.Parameter it went on with the old one, silently. Weights it
    moved off the device have left the model (calling the model says so)."""
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(64, 32)
    budget: int | str = "100%"
    if smallest:
        with pytest.raises(planner.BudgetTooSmall) as too_small:
            planner.plan(_Net().eval(), "10%", (x,), profile="cpu", time_limit=5)
        budget = too_small.value.min_budget
    with torch.no_grad():
        pm = planner.plan(model, budget, (x,), mode="infer", profile="cpu", time_limit=5)
        try:
            kept = [n for n, p in model.named_parameters() if not isinstance(p, ReleasedWeight)]
            assert kept, "the plan keeps no weight in the model"
            moved = len(kept) < len(list(_Net().parameters()))
            assert moved == smallest, (budget, kept)
            pm(x)
            owner, _, leaf = kept[-1].rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, leaf, nn.Parameter(torch.zeros_like(getattr(module, leaf))))
            with pytest.raises(PlannerError, match=rf"replaced since planning: {kept[-1]}\."):
                pm(x)
        finally:
            pm.close()


def test_a_swapped_submodule_is_an_error() -> None:
    torch.manual_seed(1)
    replacement = nn.Linear(64, 8)  # made before planning: no registration after it
    model, pm, x = _planned()
    model.c = replacement
    with pytest.raises(PlannerError, match=r"replaced since planning: c\.weight, c\.bias\."):
        pm(x)


def test_values_loaded_in_place_are_used() -> None:
    model, pm, x = _planned()
    torch.manual_seed(5)
    other = _Net()
    model.load_state_dict(other.state_dict())
    nn.Linear(3, 3)  # an unrelated registration makes the next call look, and pass
    pm(x).pow(2).sum().backward()
    other(x).pow(2).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(other)))


def test_create_graph_is_an_error() -> None:
    model, pm, x = _planned()
    loss = pm(x).pow(2).sum()
    # before the check: a RuntimeError from inside the planned backward's ops
    with pytest.raises(PlannerError, match=r"create_graph=True"):
        torch.autograd.grad(loss, [model.c.weight], create_graph=True)
    loss.backward()  # what the forward saved is still there for a plain backward
    assert model.c.weight.grad is not None


def test_batched_gradients_through_a_step_are_an_error() -> None:
    # autograd.grad(is_grads_batched=True), and jacobian(vectorize=True) which uses
    # it, run the planned backward on batched gradients: before the check, torch's
    # "Batching rule not implemented for aten::threshold_backward.grad_input" from
    # inside the planned ops (an out= into a planned buffer), or, where no such op
    # was planned, B gradients held at once in buffers the budget sized for one
    model, pm, x = _planned(torch.randn(64, 32).requires_grad_())
    xs = x.detach().clone().requires_grad_()
    out = pm(xs)
    vectors = torch.randn((3, *out.shape))
    with pytest.raises(PlannerError, match=r"is_grads_batched=True.*once per vector"):
        torch.autograd.grad(out, xs, vectors, is_grads_batched=True)
    with pytest.raises(PlannerError, match=r"is_grads_batched=True"):
        torch.autograd.functional.jacobian(pm, x.detach().clone(), vectorize=True)
    out.pow(2).sum().backward()  # what the forward saved is still there
    assert xs.grad is not None and model.c.weight.grad is not None


def test_torch_func_transforms_of_a_training_plan_are_an_error() -> None:
    # before the check: torch's "In order to use an autograd.Function with functorch
    # transforms (vmap, grad, jvp, jacrev, ...), it must override the setup_context
    # staticmethod", naming the planner's internals
    _, pm, x = _planned(torch.randn(64, 32).requires_grad_())
    x = x.detach().clone()
    with pytest.raises(PlannerError, match=r"torch\.func.*loss\.backward\(\)"):
        torch.func.grad(lambda t: pm(t).sum())(x)
    with pytest.raises(PlannerError, match=r"torch\.func"):
        torch.func.vmap(pm)(x.expand(2, 64, 32))
    pm(x.requires_grad_()).sum().backward()  # the module stays usable
    assert x.grad is not None


def test_saved_tensors_hooks_around_a_step_are_warned_about_not_applied() -> None:
    model, pm, x = _planned()
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with pytest.warns(UserWarning, match=r"saved_tensors_hooks .* not applied"):
            loss = pm(x).pow(2).sum()
    loss.backward()
    assert model.c.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(x).pow(2).sum().backward()  # none in effect: no warning
        with torch.autograd.graph.save_on_cpu(), torch.no_grad():
            pm(x)  # nothing is kept for a backward: no warning


def test_state_dict_is_the_models_and_loads_back_in_place() -> None:
    model, pm, x = _planned()
    pm(x).pow(2).sum().backward()  # updates BatchNorm's statistics once
    saved = {k: v.clone() for k, v in pm.state_dict().items()}
    # before: keys state_0, state_1, ... and no BatchNorm statistics at all
    assert list(saved) == list(model.state_dict())
    assert torch.equal(saved["norm.running_mean"], model.norm.running_mean)
    weight = model.a.weight
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    pm.load_state_dict(saved)
    assert model.a.weight is weight and torch.equal(weight, saved["a.weight"])
    with pytest.raises(PlannerError, match=r"assign=True"):
        pm.load_state_dict(saved, assign=True)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*zzz"):
        pm.load_state_dict({**saved, "zzz": torch.zeros(1)})


def test_state_dict_of_a_planned_module_inside_another() -> None:
    model, pm, x = _planned()
    outer = nn.Module()
    outer.body = pm
    outer.head = nn.Linear(8, 1)
    saved = {k: v.clone() for k, v in outer.state_dict().items()}
    assert {k.removeprefix("body.") for k in saved if k.startswith("body.")} == set(
        model.state_dict()
    )
    with torch.no_grad():
        model.c.bias.fill_(3.0)
    result = outer.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.c.bias, saved["body.c.bias"])


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda pm: torch.save(pm, io.BytesIO())])
def test_copying_or_pickling_a_planned_module_is_a_clear_error(copier) -> None:
    _, pm, _ = _planned()
    # before: TypeError "cannot pickle '_queue.SimpleQueue' object"
    with pytest.raises(PlannerError, match=r"cannot be copied or pickled.*deepcopy\(model\)"):
        copier(pm)


@pytest.mark.parametrize(
    "tracer",
    [
        lambda pm, x: torch.jit.trace(pm, (x,)),
        lambda pm, x: torch.export.export(pm, (x,), strict=False),
    ],
    ids=["jit.trace", "export"],
)
def test_tracing_or_exporting_a_planned_module_is_a_clear_error(tracer) -> None:  # type: ignore[no-untyped-def]
    """A jit trace of an inference plan was made and failed at its first run
    ("'weight' must be 2-D"); export failed on an UntypedStorage argument."""
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(64, 32)
    pm = planner.plan(model, "100%", (x,), profile="cpu")
    with pytest.raises(PlannerError, match=r"cannot be traced or exported"):
        tracer(pm, x)


def test_exporting_a_training_plan_names_the_model_not_a_missing_attribute() -> None:
    """A training plan holds the model's parameters under its names ("a.weight"):
    export walks them and failed with a bare "PlannedModule has no attribute `a`"."""
    model, pm, x = _planned()
    with pytest.raises(AttributeError) as raised:
        torch.export.export(pm, (x,), strict=False)
    assert "export or functional_call the model" in str(raised.value.__cause__)
    assert not hasattr(pm, "a") and not hasattr(pm, "missing")


def test_functional_call_of_an_inference_plan_names_the_model() -> None:
    """It failed with torch's bare "PlannedModule has no attribute `a`", no hint."""
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(64, 32)
    pm = planner.plan(model, "100%", (x,), profile="cpu")
    params = dict(model.named_parameters())
    with pytest.raises(AttributeError) as raised:
        torch.func.functional_call(pm, params, (x,))
    assert "functional_call the model" in str(raised.value.__cause__)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_functional_call_with_other_tensors_is_an_error_not_the_modules_own_result(
    mode: str,
) -> None:
    """A planned module whose parameters have no dotted names (an nn.Linear) took
    functional_call's tensors into its own dicts, or as attributes, and ignored
    them: it returned its own weights' output, and no gradient for those passed,
    silently. Its own tensors passed are fine."""
    torch.manual_seed(0)
    lin, x = nn.Linear(32, 16), torch.randn(8, 32)
    pm = planner.plan(copy.deepcopy(lin), "100%", (x,), mode=mode, profile="cpu", time_limit=3)
    other = {"weight": lin.weight.detach() * 2, "bias": lin.bias.detach() + 1}
    with torch.set_grad_enabled(mode == "train"):
        with pytest.raises(PlannerError, match=r"weight.*functional_call"):
            torch.func.functional_call(pm, other, (x,))
        if mode == "train":
            with pytest.raises(PlannerError, match=r"functional_call"):
                torch.func.grad(lambda p: torch.func.functional_call(pm, p, (x,)).sum())(other)
        own = dict(pm.named_parameters())  # a training plan's are the model's
        assert torch.equal(torch.func.functional_call(pm, own, (x,)), lin(x))
        assert torch.equal(pm(x), lin(x))  # swapped back: the module runs as before
    pm.close()


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0, relu: bool = False) -> torch.Tensor:
        y = self.lin(x) * scale
        return y.relu() if relu else y


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_another_value_of_a_python_argument_is_an_error(mode: str) -> None:
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", ((x,), {"scale": 2.0, "relu": False}), mode=mode)
    with torch.no_grad():
        assert torch.equal(pm(x, scale=2.0, relu=False), model(x, scale=2.0))
        # keyword order is the caller's
        assert torch.equal(pm(x, relu=False, scale=2.0), model(x, scale=2.0))
        # before: each of these returned what scale=2.0, relu=False computes
        with pytest.raises(PlannerError, match=r"kwargs\['scale'\] is 3.0 here and was 2.0"):
            pm(x, scale=3.0, relu=False)
        with pytest.raises(PlannerError, match=r"kwargs\['relu'\] is True here and was False"):
            pm(x, scale=2.0, relu=True)
        with pytest.raises(
            PlannerError, match=r"kwargs\['scale'\] is 2 \(an? int\) here and was 2.0 \(an? float\)"
        ) as info:
            pm(x, scale=2, relu=False)  # an int traces other code than a float
        assert "as a tensor" not in str(info.value)  # torch.tensor(2) would be int64
        # before: "planned for inputs [((4, 8), 'float32')]; got [((4, 8), 'float32')]"
        expected = r"planned as pm\(Tensor, scale=float, relu=bool\), and is called as "
        with pytest.raises(PlannerError, match=expected + r"pm\(Tensor, scale=float\)"):
            pm(x, scale=2.0)
        # before: a bare StopIteration (the lists of constants had other lengths)
        with pytest.raises(PlannerError, match=r"args\[0\] is None here and was a Tensor"):
            pm(None, scale=2.0, relu=False)
        with pytest.raises(PlannerError, match=r"args\[0\] is an? ndarray .*torch.as_tensor"):
            pm(x.numpy(), scale=2.0, relu=False)
        with pytest.raises(
            PlannerError, match=r"kwargs\['scale'\] is a Tensor here and was a float"
        ):
            pm(x, scale=torch.tensor(2.0), relu=False)
        with pytest.raises(
            PlannerError, match=r"planned as pm\(Tensor, .*called as pm\(\[Tensor\]"
        ):
            pm([x], scale=2.0, relu=False)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_another_value_of_a_number_suggests_passing_it_as_a_tensor(mode: str) -> None:
    """A number that changes from call to call (a loss's num_items_in_batch) was told
    to get one planned module per value; as a tensor the trace reads it as an input,
    and one plan serves every value."""
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", ((x,), {"scale": 2.0, "relu": False}), mode=mode)
    with pytest.raises(PlannerError, match=r"pass it as a tensor, torch.tensor\(3.0\)") as info:
        pm(x, scale=3.0, relu=False)
    assert "one planned module per value" in str(info.value)
    with pytest.raises(PlannerError) as info:
        pm(x, scale=2.0, relu=True)
    assert "as a tensor" not in str(info.value)  # a flag picks code: no tensor for it
    pm = planner.plan(model, "100%", ((x,), {"scale": torch.tensor(2.0)}), mode=mode)
    with torch.no_grad():
        for value in (2.0, 3.0, 0.5):
            got = pm(x, scale=torch.tensor(value))
            assert torch.equal(got, model(x, scale=torch.tensor(value)))


def test_an_inference_plan_given_an_input_that_requires_grad_is_an_error() -> None:
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", (x,), mode="infer")
    # before: the output did not require grad, and what came before got no gradient
    with pytest.raises(PlannerError, match=r"args\[0\] require grad.*mode='train'"):
        pm(x.clone().requires_grad_())
    with torch.no_grad():
        assert torch.equal(pm(x.clone().requires_grad_()), model(x))
    # measuring it is not refused (plan() with kernels="inductor" measures the
    # example inputs, which may require grad)
    pm.run_measured(x.clone().requires_grad_())
    pm.time_call(x.clone().requires_grad_(), repeats=1)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_plan_given_inputs_laid_out_otherwise_says_so(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(8, 16)
    transposed = torch.randn(16, 8).t()  # the same shape, other strides
    pm = planner.plan(model, "100%", (x,), mode=mode, kernels="inductor", measure_room=False)
    # before: an AssertionError from Inductor's generated code, "expected size 8==8,
    # stride 1==16 at dim=0", where a compiled run read the input
    with pytest.raises(
        PlannerError, match=r"args\[0\] has strides \(1, 8\).*args\[0\]\.contiguous"
    ):
        pm(transposed)
    with torch.no_grad():
        torch.testing.assert_close(pm(transposed.contiguous()), model(transposed))
    eager = planner.plan(model, "100%", (x,), mode=mode, measure_room=False)
    with pytest.raises(PlannerError, match=r"args\[0\] has strides \(1, 8\)"):
        eager(transposed)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_input_on_another_device_is_an_error_naming_it(mode: str) -> None:
    """Before: torch's 'Tensor on device cpu is not on the expected device meta!'
    from inside the executor."""
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", (x,), mode=mode)
    with pytest.raises(PlannerError, match=r"args\[0\] is on meta and was planned on cpu"):
        pm(x.to("meta"))
    with torch.no_grad():
        assert torch.equal(pm(x), model(x))


def test_an_eager_plan_given_a_strided_view_is_an_error_not_a_step_over_budget() -> None:
    """A matmul copies a strided view to make it contiguous: memory the plan did
    not count (this call measured 1.6 MB over a 3.3 MB budget)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(2048, 256)
    try:
        pm = planner.plan(model, "50%", (x,), mode="train", time_limit=5)
    except planner.BudgetTooSmall as error:
        pm = planner.plan(model, error.min_budget, (x,), mode="train", time_limit=5)
    view = torch.randn(2048, 512)[:, ::2]
    with pytest.raises(PlannerError, match=r"args\[0\] has strides \(512, 2\).*contiguous\(\)"):
        pm(view)
    pm.run_measured_step(view.contiguous())
    assert pm.measured is not None
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_converting_a_planned_module_is_an_error_unless_it_changes_nothing(mode: str) -> None:
    _, pm, x = _planned()
    if mode == "infer":
        torch.manual_seed(0)
        pm = planner.plan(_Net().eval(), "100%", (x,), mode="infer", profile="cpu")
    # before: training met mixed dtypes in its first matmul ("mat1 and mat2 must
    # have the same dtype"), inference silently went on in float32
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.half()):
        with pytest.raises(PlannerError, match=r"cannot move or convert them.*then plan it"):
            convert(pm)
    assert pm.float() is pm and pm.to("cpu") is pm  # no change: as training loops do
    pm(x)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_converting_the_model_after_planning_is_named_when_the_run_fails(mode: str) -> None:
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(64, 32)
    if mode == "infer":
        model.eval()
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    model.double()  # the model, not pm: its parameters' data is swapped in place
    # before: torch's "mat1 and mat2 must have the same dtype" from the executor
    with pytest.raises(
        PlannerError,
        match=r"a\.weight \(float32 \[64, 32\] on cpu when planned, now "
        r"float64 \[64, 32\] on cpu\).*convert the model before calling planner\.plan",
    ):
        pm(x)
    model.float()  # converted back: the parameters are the same objects, the
    # BatchNorm buffers new ones (nn.Module._apply), which the plan would not read
    with pytest.raises(PlannerError, match=r"replaced since planning: norm\.running_mean"):
        pm(x)


def test_unfreezing_a_parameter_after_planning_is_an_error_freezing_one_is_fine() -> None:
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(64, 32)
    model.a.weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    model.a.weight.requires_grad_(True)
    # before: the call ran and model.a.weight.grad stayed None (eager's is set)
    with pytest.raises(PlannerError, match=r"did not require grad when planned do now: a\.weight"):
        pm(x)
    model.a.weight.requires_grad_(False)
    model.c.weight.requires_grad_(False)  # frozen after planning: eager's gradients
    reference.c.weight.requires_grad_(False)
    pm(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert model.c.weight.grad is None and model.a.weight.grad is None
    for p, r in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (r.grad is None)
        if r.grad is not None:
            assert torch.equal(p.grad, r.grad)


def test_named_parameters_are_the_models_for_grouping_by_name() -> None:
    model, pm, _ = _planned()
    # before: state_0, state_1, ...: every parameter fell in the weight-decay group
    assert [(n, id(p)) for n, p in pm.named_parameters()] == [
        (n, id(p)) for n, p in model.named_parameters()
    ]
    no_decay = [p for n, p in pm.named_parameters() if n.endswith("bias") or "norm" in n]
    assert len(no_decay) == 4  # a.bias, norm.weight, norm.bias, c.bias
    # inside a larger module too (it walks this module's parameter dict, not
    # named_parameters(): it listed body.state_0, ...), in the model's order
    wrapper = nn.ModuleDict({"body": pm, "head": nn.Linear(8, 2)})
    assert [n for n, _ in wrapper.named_parameters()] == [
        *(f"body.{n}" for n, _ in model.named_parameters()),
        "head.weight",
        "head.bias",
    ]
    assert set(wrapper.state_dict()) >= {n for n, _ in wrapper.named_parameters()}  # same names
    assert "(body): PlannedModule(_Net, mode='train', budget=" in repr(wrapper)  # was: ()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_torch_compile_of_a_planned_module_runs_the_plan(mode: str) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), torch.randn(8, 16)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    # before: Dynamo traced into the executor and failed on its own guard ("Guard
    # failed on the same frame it was created")
    out = torch.compile(pm)(x)
    expected = reference(x)
    assert torch.equal(out, expected)
    if mode == "train":
        out.sum().backward()
        expected.sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(reference)))


def test_an_inference_plans_state_dict_warns_that_it_holds_no_weights() -> None:
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", (x,), mode="infer")
    # before: {} silently, so torch.save(pm.state_dict(), ...) saved nothing
    with pytest.warns(UserWarning, match=r"holds none of the model's weights.*before planning"):
        assert len(pm.state_dict()) == 0


@pytest.mark.parametrize("strict", [True, False])
def test_loading_a_state_dict_into_an_inference_plan_says_what_to_do(strict: bool) -> None:
    """Before: torch's bare "Unexpected key(s) in state_dict" (strict), or nothing
    loaded and the old weights used, silently (strict=False)."""
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(4, 8)
    new_values = copy.deepcopy(model.state_dict())
    pm = planner.plan(model, "100%", (x,), mode="infer")
    try:
        with pytest.raises(PlannerError, match=r"inference plan.*before planning.*planner\.plan"):
            pm.load_state_dict(new_values, strict=strict)
        pm(x)  # still usable
        assert pm.load_state_dict({}, strict=strict) is not None  # nothing to load: fine
    finally:
        pm.close()


class _Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.b(torch.relu(self.a(x)))
        return torch.softmax(z, -1), z  # softmax's backward reads its output; z no one


@pytest.mark.parametrize("write", ["output", "parameter", "input"])
def test_a_tensor_the_backward_reads_written_in_place_is_an_error_as_in_eager(write: str) -> None:
    torch.manual_seed(0)
    model, x = _Softmax(), torch.randn(4, 8)
    reference, x_ref = copy.deepcopy(model), x.clone()
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")

    def step(m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        probs, _ = m(inp)
        with torch.no_grad():
            {"output": probs, "parameter": m.b.weight if m is reference else model.b.weight,
             "input": inp}[write].mul_(2)  # fmt: skip
        return probs.pow(2).sum()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        step(reference, x_ref).backward()
    # before: the planned backward read the new values, silently
    expected = {"output": "output 0", "parameter": r"b\.weight", "input": r"args\[0\]"}[write]
    with pytest.raises(PlannerError, match=expected + r", which the planned backward reads"):
        step(pm, x).backward()


def test_an_output_the_backward_does_not_read_may_be_written_in_place() -> None:
    torch.manual_seed(0)
    model, x = _Softmax(), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    for m in (reference, pm):
        probs, z = m(x)
        z.mul_(2)  # the linear's backward reads its input and weight, not its output
        (probs.pow(2).sum() + z.sum()).backward()
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(reference)))


class _RecomputesExp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 256) * 0.05)
        self.w2 = nn.Parameter(torch.randn(256, 256) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.exp(x)  # exp's backward reads its output, not x
        g = torch.sigmoid(torch.tanh(a @ self.w) @ self.w2)
        return torch.tanh(g @ self.w2).sum()


def test_an_input_a_backward_recompute_reads_written_in_place_is_an_error() -> None:
    """Eager saved exp(x); a plan that recomputes it in the backward reads x again,
    so x written in place in between gave gradients 100% off, silently."""
    slow_disk = dataclasses.replace(
        get_profile("cpu"),
        disk_read_bandwidth=1e3,
        disk_write_bandwidth=1e3,
        disk_read_latency_seconds=10,
        disk_write_latency_seconds=10,
    )
    torch.manual_seed(0)
    x = torch.randn(1024, 256) * 0.1
    model = _RecomputesExp()
    pm = planner.plan(model, "95%", (x.clone().requires_grad_(),), mode="train", profile=slow_disk)
    assert ("recompute", "exp") in [(a.kind, a.tensor) for a in pm.plan.actions]
    base = x.clone().requires_grad_()
    inp = base * 1
    loss = pm(inp)
    with torch.no_grad():
        inp.mul_(3)
    with pytest.raises(
        PlannerError, match=r"args\[0\], which the planned backward reads \(or recomputes from\)"
    ):
        loss.backward()


def test_autograd_grad_or_backward_inputs_leaving_out_a_delivered_gradient_is_an_error() -> None:
    """Gradients the plan writes into .grad itself: torch.autograd.grad returned None
    for them (and set their .grad); backward(inputs=[w]) set the others' .grad too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)
    )
    x = torch.randn(128, 256)
    pm = planner.plan(model, "45%", (x,), mode="train", profile="cpu")
    delivered = {a.tensor.removeprefix("grad of ") for a in pm.plan.actions if a.kind == "deliver"}
    assert delivered, "nothing delivered: the test proves nothing"
    with pytest.raises(PlannerError, match=r"torch\.autograd\.grad\(\.\.\.\) cannot"):
        torch.autograd.grad(pm(x).pow(2).mean(), list(model.parameters()))
    with pytest.raises(PlannerError, match=r"backward\(inputs=\[\.\.\.\]\) without them"):
        pm(x).pow(2).mean().backward(inputs=[model[0].weight])
    # of some tensors only: the engine runs part of the graph, as for backward(inputs=)
    # (the message named only that, to a caller of torch.autograd.grad)
    with pytest.raises(PlannerError, match=r"torch\.autograd\.grad\(\.\.\.\), or backward"):
        torch.autograd.grad(pm(x).pow(2).mean(), [model[0].weight])
    assert all(p.grad is None for p in model.parameters())  # nothing was written
    params = dict(model.named_parameters())
    pm(x).pow(2).mean().backward(inputs=[params[n] for n in delivered])  # all of them: fine
    assert all(params[n].grad is not None for n in delivered)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(y)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_example_inputs_that_were_one_tensor_must_stay_one(mode: str) -> None:
    """Planned as model(x, x), the trace made one input of both: called as
    model(x, y), the plan computed model(y, y)."""
    torch.manual_seed(0)
    model, x, y = _TwoInputs(), torch.randn(8, 32), torch.randn(8, 32)
    pm = planner.plan(model, "100%", (x, x), mode=mode, profile="cpu")
    with pytest.raises(PlannerError, match=r"args\[0\] and args\[1\] were one tensor"):
        pm(x, y)
    with torch.no_grad():
        assert torch.equal(pm(y, y), model(y, y))  # one tensor again: as planned
        assert torch.equal(pm(x, x.detach()), model(x, x))  # the same elements
    distinct = planner.plan(_TwoInputs(), "100%", (x, y), mode=mode, profile="cpu")
    distinct(x, x)  # planned distinct, called with one tensor: fine


def test_a_delivered_parameter_frozen_after_planning_gets_no_gradient() -> None:
    """Eager gives a frozen parameter no .grad (so an optimizer leaves it alone); the
    plan wrote its delivered gradient into .grad regardless."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)
    )
    reference, x = copy.deepcopy(model), torch.randn(128, 256)
    pm = planner.plan(model, "45%", (x,), mode="train", profile="cpu")
    delivered = {a.tensor.removeprefix("grad of ") for a in pm.plan.actions if a.kind == "deliver"}
    assert delivered, "nothing delivered: the test proves nothing"
    frozen = sorted(delivered)[0]
    for m in (model, reference):
        dict(m.named_parameters())[frozen].requires_grad_(False)
    pm(x).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None:
            assert torch.equal(p.grad, r.grad), name


def test_ruled_out_tells_another_shape_by_the_tensors_passed_directly() -> None:
    """A several-shape module skips a shape's full check (and its message) when a
    tensor passed directly has another shape or dtype; nested tensors and
    arguments it cannot see are left to ``flatten``, which decides."""
    from planner.call_checks import PlannedCall

    x, mask = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool)
    planned = PlannedCall((x,), {"mask": mask, "extra": [x]}, "infer")
    assert not planned.ruled_out((torch.randn(2, 8),), {"mask": mask, "extra": [x]})
    assert planned.ruled_out((torch.randn(3, 8),), {"mask": mask})
    assert planned.ruled_out((x,), {"mask": mask.int()})
    assert planned.ruled_out((x.double(),), {})
    assert not planned.ruled_out((x,), {"mask": mask, "extra": [torch.randn(5)]})  # nested
    assert not planned.ruled_out((), {})  # missing: flatten says what is missing


def test_a_later_inference_plan_taking_the_weights_is_named_not_called_a_replacement() -> None:
    """A first inference plan that keeps every weight on the device, then a second
    plan of the same model that moves them off: the first's next call said the
    entries were "replaced ... (a new object, e.g. by assigning a new nn.Parameter
    ...)" and to "call planner.plan again on the model as it is now", which holds
    no values any more (found by a README audit)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)])
    x = torch.randn(32, 64)
    first = planner.plan(model, "1MiB", (x,), time_limit=1)
    try:
        assert {t.home for t in first.plan.tensors} == {"device"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            second = planner.plan(model, "50%", (x,), time_limit=1)
        try:
            with pytest.raises(planner.PlannerError, match="a later planner.plan of this model"):
                first(x)
        finally:
            second.close()
    finally:
        first.close()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_buffers_remade_by_converting_the_model_and_back_are_an_error(mode: str) -> None:
    """``model.double().float()`` (or ``.half().float()``, ``.cuda().cpu()``) gives
    each parameter new data in the same object, but puts a new object in each
    buffer's slot (``nn.Module._apply`` assigns ``_buffers[k]``, which fires no
    registration hook). The plan went on reading the old buffers, silently: an
    inference plan of a BatchNorm net whose statistics were then updated in place
    was 0.07 off the model's outputs (and ``.half().float()`` alone 1e-5 off), a
    training plan updated statistics the model no longer held."""
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(64, 32)
    if mode == "infer":
        model.eval()
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    try:
        pm(x)
        model.double()
        model.float()
        with torch.no_grad():
            model.norm.running_mean.add_(1.0)
        replaced = r"replaced since planning: .*norm\.running_mean.*planner\.plan again"
        with pytest.raises(PlannerError, match=replaced):
            pm(x)
    finally:
        pm.close()


@pytest.mark.parametrize(
    "how",
    ["other dtype", "assign a bfloat16 state dict", "slot written", "overwrite on conversion"],
)
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_parameter_replaced_by_one_of_another_dtype_is_an_error(mode: str, how: str) -> None:
    """A new parameter of another dtype (or shape, or device) is a replacement like
    any other: the plan reads the old one. Left out as "converted" (as model.double()
    leaves its buffers to the run's dtype check), the plan ran on with the old
    weights, silently, and a training step gave the old objects the gradients:
    assigned (a registration), and also put in its slot without one (a slot written
    directly, or model.double() with set_overwrite_module_params_on_conversion(True),
    which makes new parameters)."""
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(64, 32)
    if mode == "infer":
        model.eval()
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    try:
        if how == "other dtype":
            model.a.weight = nn.Parameter(torch.zeros_like(model.a.weight, dtype=torch.float64))
        elif how == "assign a bfloat16 state dict":
            state = {k: torch.zeros_like(v, dtype=torch.bfloat16) if v.is_floating_point() else v
                     for k, v in model.state_dict().items()}  # fmt: skip
            model.load_state_dict(state, assign=True)
        elif how == "slot written":
            new = nn.Parameter(torch.zeros_like(model.a.weight, dtype=torch.bfloat16))
            model.a._parameters["weight"] = new
        else:
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            model.double()
        with pytest.raises(PlannerError, match=r"replaced since planning: .*a\.weight"):
            pm(x)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
        pm.close()


def test_converting_the_model_after_building_another_module_still_says_converted() -> None:
    """Any module built anywhere fires a registration hook: a model.double() after it
    was reported as its buffers "replaced since planning" instead of the parameters'
    change of dtype."""
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(64, 32)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    try:
        nn.Linear(2, 2)  # a loss head, another model: a registration
        model.double()
        with pytest.raises(PlannerError, match=r"changed dtype, device or shape since planning"):
            pm(x)
    finally:
        pm.close()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_converting_a_model_without_buffers_in_place_is_an_error_not_a_run_over_budget(
    mode: str,
) -> None:
    """model.double() keeps the parameter objects: with no buffer made anew and
    every weight kept on the device (100%), every check passed and the run went on
    in float64, returning float64 outputs at twice the budget by the meter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64))
    x = torch.randint(0, 64, (4, 16))
    with planner.plan(model, "100%", (x,), mode=mode, profile="cpu") as pm:
        pm(x)
        model.double()
        with pytest.raises(PlannerError, match=r"changed dtype.*1\.weight \(float32 .*float64"):
            pm(x)
        model.float()  # converted back: the plan runs again, as planned
        assert pm.run_measured(x).dtype == torch.float32
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes


class _GrayConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_input_whose_size_one_strides_change_its_memory_format_is_an_error(mode: str) -> None:
    """A grayscale batch permuted from NHWC, (N, 1, H, W) with strides (HW, 1, W, 1),
    has NCHW's strides in every dimension longer than 1, so the layout check let it
    through; but the convolution reads it as channels-last and returns a
    channels-last output, and the flatten traced as a view on NCHW raised torch's
    "view size is not compatible" from inside the executor. The other way round
    (planned on the permuted batch, called with NCHW) it ran other kernels than
    planned: 36% over the budget by the meter on a 1x28x28 batch of 16."""
    torch.manual_seed(0)
    model = _GrayConv()
    nchw = torch.randn(2, 1, 8, 8)
    nhwc = torch.empty(2, 8, 8, 1).copy_(nchw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert nhwc.is_contiguous() and nhwc.stride() != nchw.stride()  # .contiguous() is a no-op
    for planned, other, fmt in (
        (nchw, nhwc, "torch.contiguous_format"),
        (nhwc, nchw, "torch.channels_last"),
    ):
        pm = planner.plan(copy.deepcopy(model), "100%", (planned,), mode=mode, time_limit=1)
        try:
            with pytest.raises(
                PlannerError, match=rf"args\[0\] has strides .*to\(memory_format={fmt}\)"
            ):
                pm(other)
            with torch.no_grad():  # the advice works
                fixed = other.to(memory_format=getattr(torch, fmt.removeprefix("torch.")))
                assert torch.equal(pm(fixed), model(fixed))
                assert torch.equal(pm(planned), model(planned))
        finally:
            pm.close()


def test_a_training_plan_called_inside_inference_mode_or_given_inference_tensors() -> None:
    """Validation inside ``torch.inference_mode()`` of a training plan whose
    backward reads an output (a tanh's) or the input failed inside the step with
    torch's "Inference tensors do not track version counter"; so did a batch made
    under inference mode, where eager refuses it (it saves the input for the
    weight's gradient) with an error saying to clone it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh())
    eager = copy.deepcopy(model)
    x = torch.randn(4, 16)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    with torch.inference_mode():
        made_inside = x.clone()
        out = pm(x)
        assert out.is_inference() and torch.equal(out, eager(x))
        assert torch.equal(pm(made_inside), eager(x))
    with torch.no_grad():
        assert torch.equal(pm(made_inside), eager(x))
    made = r"args\[0\] was made under torch.inference_mode.*x.clone\(\)"
    with pytest.raises(PlannerError, match=made):
        pm(made_inside)
    pm(x).sum().backward()  # and the module trains as before
    eager(x).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))


def test_torch_func_transforms_of_an_inference_plan_are_an_error() -> None:
    """vmap and jvp of an inference plan failed inside its executor with torch's
    errors ("attempting to call Tensor.requires_grad_()" where it read a weight
    from its store, "Cannot access storage of TensorWrapper"); batched, a call
    would also hold the batch at once, over the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16)
    )
    x = torch.randn(32, 64)
    expected = model(x).detach()
    pm = planner.plan(model, "min", (x,), mode="infer", profile="cpu")
    with pytest.raises(PlannerError, match=r"inference plan cannot run under a torch\.func"):
        torch.func.vmap(pm)(x.unsqueeze(0))
    with pytest.raises(PlannerError, match=r"inference plan cannot run under a torch\.func"):
        torch.func.jvp(pm, (x,), (torch.ones_like(x),))
    assert torch.equal(pm(x), expected)  # the module stays usable


def test_an_inference_plan_on_plain_inputs_runs_inside_a_torch_func_transform() -> None:
    """A frozen feature extractor inside torch.func.grad of a loss over other
    tensors, or an unbatched input under vmap: the transform wraps none of the
    call's tensors, so it computes as outside it (it ran before the refusal of
    transforms; a plan that spills failed inside with "Cannot access storage of
    TensorWrapper", its store's reads wrapped by the transform)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16)
    )
    x, w = torch.randn(32, 64), torch.randn(16)
    eager = copy.deepcopy(model)
    pm = planner.plan(model, "min", (x,), mode="infer", profile="cpu")

    def loss(run):  # type: ignore[no-untyped-def]
        return lambda w: (run(x) @ w).sum()

    with torch.no_grad():
        expected = torch.func.grad(loss(eager))(w)
    assert torch.equal(torch.func.grad(loss(pm))(w), expected)
    scaled = torch.func.vmap(lambda a: a * pm(x).sum())(torch.arange(3.0))
    assert torch.equal(scaled, torch.arange(3.0) * eager(x).detach().sum())


def test_a_training_step_inside_a_non_reentrant_checkpoint_is_an_error() -> None:
    """Inside ``torch.utils.checkpoint(..., use_reentrant=False)`` the step kept its
    own tensors for its backward, and the checkpoint's recompute ran the whole
    planned forward again during the backward: the meter saw the step 26% over its
    budget (an MLP at 100%); at a budget that spills, the backward failed with
    "a later forward ... has overwritten them". A reentrant checkpoint runs the
    first forward without grad, so only the recompute's step is held: eager's
    gradients."""
    import torch.utils.checkpoint as checkpoint

    _, pm, x = _planned()
    with pytest.raises(PlannerError, match=r"inside torch\.utils\.checkpoint.*outside"):
        checkpoint.checkpoint(lambda t: pm(t).pow(2).sum(), x, use_reentrant=False)
    pm(x).pow(2).sum().backward()  # outside it, as before
    model, pm, x = _planned(torch.randn(64, 32).requires_grad_())
    eager = _Net()
    eager.load_state_dict(model.state_dict())
    checkpoint.checkpoint(lambda t: pm(t).pow(2).sum(), x, use_reentrant=True).backward()
    xe = x.detach().clone().requires_grad_()
    eager(xe).pow(2).sum().backward()
    assert torch.equal(x.grad, xe.grad)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_call_under_another_default_device_makes_its_host_buffers_on_the_cpu(mode: str) -> None:
    """Under ``with torch.device("meta")`` (or ``torch.set_default_device``) a call
    reading a weight or activation back from the offload store failed with torch's
    "can't convert meta device type tensor to numpy": the store's read buffer took
    the default device (on a GPU machine it would have been a CUDA buffer,
    outside the budget)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16)
    )
    eager = copy.deepcopy(model)
    x = torch.randn(32, 64)
    if mode == "infer":
        expected = eager(x).detach()
        pm = planner.plan(model, "min", (x,), mode="infer", profile="cpu")
        with torch.device("meta"):
            assert torch.equal(pm(x), expected)
        return
    pm = planner.plan(model, "min", (x,), mode="train", profile="cpu")
    assert any(a.kind in ("offload", "prefetch") for a in pm.plan.actions)
    with torch.device("meta"):
        out = pm(x)
        out.pow(2).mean().backward()
    eager(x).pow(2).mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))


def test_a_dual_tensor_into_a_training_step_is_an_error() -> None:
    """Before: torch's "You must implement the jvp function for custom
    autograd.Function to use it with forward mode AD", from inside the step."""
    import torch.autograd.forward_ad as fwAD

    model, pm, x = _planned()
    with fwAD.dual_level():
        with pytest.raises(PlannerError, match=r"forward-mode AD.*unpack_dual"):
            pm(fwAD.make_dual(x, torch.ones_like(x)))
        pm(x).sum().backward()  # a plain input inside the level: as before
    assert model.c.weight.grad is not None


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_an_input_of_another_memory_format_is_taken_where_no_op_reads_it(mode: str) -> None:
    """A pooled channels-last batch, (N, C, 1, 1) with strides (C, 1, C, C), into a
    plan traced on an NCHW one: no op of a Flatten and Linear computes by the
    format, so it runs as planned; the format check refused it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    x = torch.randn(4, 16, 1, 1)
    pooled = torch.nn.functional.adaptive_avg_pool2d(
        torch.randn(4, 16, 3, 3).to(memory_format=torch.channels_last), 1
    )
    assert pooled.stride() != x.stride() and pooled.is_contiguous()  # the premise
    pm = planner.plan(copy.deepcopy(model), "100%", (x,), mode=mode, time_limit=1)
    try:
        with torch.no_grad():
            assert torch.equal(pm(pooled), model(pooled))
    finally:
        pm.close()
