"""planner/shapes.py: one planned module for several input shapes of a model (a
prompt's chunk beside one token), each shape's plan homing every weight where the
others do, over one offload store."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from conftest import CachedLayer
from test_released import _reachable_bytes
from torch import nn
from torch.nn import functional as F

import planner
import planner.shapes
from planner.runtime.meter import resident_bytes
from planner.shapes import homes_of, shared_homes, solve_shapes
from planner.solver import from_program, solve
from planner.solver.candidates import build_candidates


class _TokensLayer(CachedLayer):
    """Writes a row per token (``index_copy``) and reads the whole cache."""

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(0, position, self.lin(x))
        return x + self.cache.sum(0)


class _Decoder(nn.Module):
    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_TokensLayer(64, 4096) for _ in range(2))
        self.head = nn.Linear(64, vocab)

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, position)
        return self.head(x)


def _token(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.randn(1, 64, generator=g), torch.tensor([k])


def _chunk(first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + first)
    return torch.randn(n, 64, generator=g), torch.arange(first, first + n)


def _smallest(model: nn.Module, *shapes: tuple) -> int:
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, shapes[0], profile="cpu", extra_example_inputs=list(shapes[1:]))
    assert smallest.value.min_budget is not None
    return smallest.value.min_budget


def _homes(pm: planner.PlannedModule) -> dict[str, str]:
    return {d.name: d.home for d in pm.plan.tensors if d.kind in ("param", "buffer")}


def test_a_chunk_then_tokens_are_bit_identical_with_the_weights_and_caches_off_the_device() -> None:
    """At the smallest budget that serves both shapes: the caches (256 KiB each)
    and the large weights live on disk, homed alike by both plans; a chunk of 8
    positions, then single tokens, give eager's outputs and caches bit for bit,
    each call within the budget by the meter."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    reference = copy.deepcopy(model)
    budget = _smallest(model, _token(0), _chunk(0, 8))
    pm = planner.plan(model, budget, _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 8)])
    try:
        (chunk_plan,) = pm.other_shapes
        assert _homes(pm) == _homes(chunk_plan)
        assert {_homes(pm)[f"layers.{k}.cache"] for k in range(2)} == {"disk"}
        assert budget < 2 * 4096 * 64 * 4  # less than the two caches
        with torch.no_grad():
            assert torch.equal(pm(*_chunk(0, 8)), reference(*_chunk(0, 8)))
            for k in range(8, 12):
                assert torch.equal(pm(*_token(k)), reference(*_token(k)))
            assert torch.equal(pm(*_chunk(12, 8)), reference(*_chunk(12, 8)))
        for k in range(2):
            cache = pm.state_tensor(f"layers.{k}.cache")
            assert torch.equal(cache, reference.layers[k].cache)
        for inputs in (_token(30), _chunk(31, 8)):
            pm.run_measured(*inputs)
            assert pm.measured is not None and pm.measured.peak_bytes <= budget
    finally:
        pm.close()


def test_the_shapes_share_one_store_and_hold_each_weight_once() -> None:
    """The chunk's module writes no weight of its own: it reads the first one's
    files, and what the planned module holds (through every reference) is what
    the meter counts, the weights kept on the device once."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    weights = {n: p for n, p in model.named_parameters()}
    pm = planner.plan(model, "60%", _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 4)])
    try:
        (other,) = pm.other_shapes
        assert "other shapes=1" in repr(pm)
        assert other._disk is pm._disk and other._engine is pm._engine
        assert other._shared is pm._shared
        kept = {n for n, home in _homes(pm).items() if home == "device" and n in weights}
        assert kept, "a 60% plan keeps some weight on the device"
        state = {id(t) for t in pm._state} & {id(t) for t in other._state}
        assert {id(weights[n]) for n in kept} <= state, "each kept weight is one tensor"
        assert _reachable_bytes(pm) == resident_bytes(pm)
    finally:
        pm.close()
    assert not other._finalizer.alive, "closing the module closes its other shapes' store"


def test_a_call_that_matches_no_shape_names_every_planned_one() -> None:
    torch.manual_seed(0)
    pm = planner.plan(
        _Decoder().eval(), "60%", _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 4)]
    )
    try:
        with pytest.raises(planner.PlannerError, match=r"planned for 2 input shapes") as error:
            pm(*_chunk(0, 3))
        assert "((1, 64), 'float32')" in str(error.value)
        assert "((4, 64), 'float32')" in str(error.value)
        assert "extra_example_inputs" in str(error.value)
        # the planned shape laid out otherwise: each shape's reason, and not the
        # advice to plan it as another shape
        x, positions = _chunk(0, 4)
        transposed = torch.randn(64, 4).t()
        with pytest.raises(planner.PlannerError, match=r"has strides \(1, 4\)") as error:
            pm(transposed, positions)
        assert "To serve this shape too" not in str(error.value)
    finally:
        pm.close()


def test_saved_plans_one_per_shape_are_reused_without_solving(tmp_path, monkeypatch) -> None:
    """plan= with extra_example_inputs: the plans saved from a module of these
    shapes (pm.plan, then pm.other_shapes's) make the same module without a solve:
    outputs bit for bit, each call within the budget."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    reference = copy.deepcopy(model)
    fresh = copy.deepcopy(model)
    first = planner.plan(
        model, "60%", _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 4)]
    )
    paths = [tmp_path / "token.json", tmp_path / "chunk.json"]
    first.plan.save(paths[0])
    first.other_shapes[0].plan.save(paths[1])
    budget = first.plan.budget_bytes
    first.close()

    def no_solving(*args: object, **kwargs: object) -> None:
        raise AssertionError("solved instead of reusing the saved plans")

    monkeypatch.setattr(planner.shapes, "solve", no_solving)
    monkeypatch.setattr(planner.api, "solve", no_solving)
    # in another order: said so (it was "made for a different graph": plan again)
    with pytest.raises(planner.PlannerError, match=r"in another order.*shapes \[1, 0\]"):
        planner.plan(
            fresh, budget, _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 4)],
            plan=paths[::-1],
        )  # fmt: skip
    pm = planner.plan(
        fresh, budget, _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 4)], plan=paths
    )
    try:
        with torch.no_grad():
            for inputs in (_chunk(0, 4), _token(4), _token(5)):
                assert torch.equal(pm(*inputs), reference(*inputs))
        for inputs in (_token(6), _chunk(7, 4)):
            pm.run_measured(*inputs)
            assert pm.measured is not None and pm.measured.peak_bytes <= budget
    finally:
        pm.close()


def test_saved_plans_must_be_one_per_shape_and_home_the_weights_alike(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Decoder().eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    extra = {"extra_example_inputs": [_chunk(0, 4)], "profile": "cpu"}
    for saved, message in (
        ("one.json", "a saved plan per input shape .2, in order., got one plan"),
        (["a.json"], "got 1 plans"),
    ):
        with pytest.raises(planner.PlannerError, match=message):
            planner.plan(model, "60%", _token(0), plan=saved, **extra)
    with pytest.raises(planner.PlannerError, match="2 saved plans for one input shape"):
        planner.plan(model, "60%", _token(0), plan=["a.json", "b.json"], profile="cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # plans of each shape made apart home the weights differently
    # plans of each shape made apart: the chunk's moves the caches to disk, the
    # token's keeps them
    chunk_alone = planner.make_plan(copy.deepcopy(model), "50%", _chunk(0, 256), profile="cpu")[1]
    budget = chunk_alone.budget_bytes
    token_alone = planner.make_plan(copy.deepcopy(model), budget, _token(0), profile="cpu")[1]
    homes = [{d.name: d.home for d in p.tensors} for p in (token_alone, chunk_alone)]
    assert homes[0]["layers.0.cache"] == "device" and homes[1]["layers.0.cache"] == "disk"
    with pytest.raises(planner.PlannerError, match="the saved plans home .* differently"):
        planner.plan(
            model, budget, _token(0), plan=[token_alone, chunk_alone], profile="cpu",
            extra_example_inputs=[_chunk(0, 256)],
        )  # fmt: skip


def test_the_smallest_budget_is_the_largest_shapes() -> None:
    """BudgetTooSmall names each shape without a plan and gives the smallest
    budget that serves them all, at which planning succeeds."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    alone = []
    for shape in (_token(0), _chunk(0, 64)):
        with pytest.raises(planner.BudgetTooSmall) as smallest:
            planner.plan(copy.deepcopy(model), 1, shape, profile="cpu")
        alone.append(smallest.value.min_budget)
    assert alone[1] > alone[0]
    with pytest.raises(planner.BudgetTooSmall, match=r"input shape 1") as both:
        planner.plan(model, 1, _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 64)])
    assert both.value.min_budget == max(alone)
    pm = planner.plan(
        model, both.value.min_budget, _token(0), profile="cpu", extra_example_inputs=[_chunk(0, 64)]
    )
    pm.close()


def test_a_fixed_home_holds_where_the_budget_would_keep_the_weight() -> None:
    """``Problem.fixed_homes``: with room for everything, a weight fixed on disk
    is still fetched from there; its home gap offers nothing else."""
    torch.manual_seed(0)
    analysis = planner.analyze(_Decoder().eval(), _token(0), profile="cpu")
    problem = from_program(analysis.program, analysis.unplanned_peak_bytes * 2, analysis.profile)
    roomy = solve(problem, time_limit=5)
    assert {d.name: d.home for d in roomy.tensors}["layers.0.cache"] == "device"
    fixed = dataclasses.replace(problem, fixed_homes={"layers.0.cache": "disk"})
    plan = solve(fixed, time_limit=5)
    homes = {d.name: d.home for d in plan.tensors}
    assert homes["layers.0.cache"] == "disk" and homes["layers.1.cache"] == "device"
    cands = build_candidates(fixed)
    home_gap = cands.gaps[cands.home_gap[fixed.tensor("layers.0.cache").index]]
    assert all(o.choice.startswith("fetch:disk") for o in home_gap.options)


def test_shared_homes_keep_the_device_only_where_every_shape_does() -> None:
    torch.manual_seed(0)
    token = planner.analyze(_Decoder().eval(), _token(0), profile="cpu")
    chunk = planner.analyze(_Decoder().eval(), _chunk(0, 4), profile="cpu")
    problems = [from_program(a.program, 10**9, a.profile) for a in (token, chunk)]
    plans = [solve(p, time_limit=5) for p in problems]
    plans[1].tensors = [
        d if d.name != "head.weight" else dataclasses.replace(d, home="disk")
        for d in plans[1].tensors
    ]
    homes = shared_homes(problems, plans)
    assert homes["head.weight"] == "disk" and homes["layers.0.lin.weight"] == "device"
    assert "x" not in homes, "inputs have no home"


def _token_and_chunk_problems(chunk: int, vocab: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    analyses = [
        planner.analyze(_Decoder(vocab).eval(), inputs, profile="cpu")
        for inputs in (_token(0), _chunk(0, chunk))
    ]
    return [from_program(a.program, 1, a.profile) for a in analyses]


def _at(problems, budget: int):  # type: ignore[no-untyped-def]
    problems = [dataclasses.replace(p, budget_bytes=budget) for p in problems]
    return problems, [homes_of(p, solve(p, time_limit=5)) for p in problems]


def test_the_homes_are_those_of_the_plan_keeping_the_least_on_the_device() -> None:
    """Just above the chunk's smallest budget the token's own plan keeps the head
    weight on the device, the chunk's does not: the chunk's homes are the
    module's, and the token is solved again with them."""
    problems = _token_and_chunk_problems(64, vocab=64)
    problems, own = _at(problems, int(_smallest(_Decoder().eval(), _chunk(0, 64)) * 1.05))
    assert own[0] != own[1]
    solved, plans = solve_shapes(problems, time_limit=5)
    assert homes_of(solved[0], plans[0]) == homes_of(solved[1], plans[1]) == own[1]


def test_homes_that_leave_a_shape_no_plan_fall_back_to_the_device_where_all_keep() -> None:
    """With a 1 MiB head weight, the plan keeping the least on the device (the
    token's) keeps a cache there that leaves the chunk no plan: each weight is
    then on the device only where both plans keep it."""
    problems = _token_and_chunk_problems(64, vocab=4096)
    budget = int(_smallest(_Decoder(4096).eval(), _chunk(0, 64)) * 1.05)
    problems, own = _at(problems, budget)
    plans = [solve(p, time_limit=5) for p in problems]
    tightest = min((0, 1), key=lambda k: planner.shapes._device_bytes(problems[k], plans[k]))
    with pytest.raises(planner.BudgetTooSmall):
        solve(dataclasses.replace(problems[1 - tightest], fixed_homes=own[tightest]), 5)
    solved, plans = solve_shapes(problems, time_limit=5)
    homes = homes_of(solved[0], plans[0])
    assert homes == homes_of(solved[1], plans[1])
    assert homes == shared_homes(problems, [solve(p, time_limit=5) for p in problems])
    for name, home in homes.items():
        assert (home == "device") == (own[0][name] == own[1][name] == "device")


def test_with_inductor_kernels_each_shapes_compiled_plan_is_checked_by_the_meter() -> None:
    torch.manual_seed(0)
    model = _Decoder().eval()
    reference = copy.deepcopy(model)
    pm = planner.plan(
        model, "50%", _token(0), profile="cpu", kernels="inductor",
        extra_example_inputs=[_chunk(0, 8)],
    )  # fmt: skip
    try:
        for module in (pm, *pm.other_shapes):
            assert module.measured is not None  # the check plan() ran
            assert module.measured.peak_bytes <= pm.plan.budget_bytes
        with torch.no_grad():
            torch.testing.assert_close(pm(*_chunk(0, 8)), reference(*_chunk(0, 8)))
            torch.testing.assert_close(pm(*_token(8)), reference(*_token(8)))
    finally:
        pm.close()


@pytest.mark.parametrize(("room", "stored"), [(1.0, "disk:int8"), (1.5, "device:int8")])
def test_weights_stored_int8_are_quantized_once_for_every_shape(room: float, stored: str) -> None:
    """``quantize="int8"``: at the smallest budget for both shapes a weight travels
    from disk as codes, with half again as much one is stored as codes on the
    device. Homed alike, each is quantized once (the chunk's module holds the
    token's codes), the module holds what the meter counts, and both shapes'
    outputs stay close to eager's, within the budget."""
    from test_quantize import FAST_QUANTIZE  # the lossy path priced as on a GPU

    torch.manual_seed(0)
    model = _Decoder(4096).eval()  # a 1 MiB head weight
    reference = copy.deepcopy(model)
    shapes = (_token(0), _chunk(0, 8))
    options = {"profile": FAST_QUANTIZE, "quantize": "int8", "extra_example_inputs": [shapes[1]]}
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, shapes[0], **options)
    assert smallest.value.min_budget is not None
    budget = int(smallest.value.min_budget * room)
    pm = planner.plan(model, budget, shapes[0], **options)
    try:
        (other,) = pm.other_shapes
        homes = _homes(pm)
        assert homes == _homes(other)
        assert stored in homes.values(), homes
        assert len(other._stored) == len(pm._stored) == (stored == "device:int8")
        assert {id(q) for q in other._stored} == {id(q) for q in pm._stored}
        assert other.quantization_errors == pm.quantization_errors != {}
        assert _reachable_bytes(pm) == resident_bytes(pm)
        with torch.no_grad():
            for args in (_chunk(0, 8), _token(8)):
                got, want = pm(*args), reference(*args)
                cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)
                assert cosine > 0.99, cosine
        for args in shapes:
            pm.run_measured(*args)
            assert pm.measured is not None and pm.measured.peak_bytes <= budget
    finally:
        pm.close()


@pytest.mark.parametrize("home", ["device:int8", "disk:int8", "disk", "device"])
def test_a_fixed_home_may_be_quantized(home: str) -> None:
    """A fixed home names a format as a plan's decisions do: stored as codes on
    the device, or fetched from the tier as codes; the plan keeps it so."""
    from test_quantize import FAST_QUANTIZE

    torch.manual_seed(0)
    analysis = planner.analyze(_Decoder(4096).eval(), _token(0), profile=FAST_QUANTIZE)
    problem = from_program(analysis.program, 10**8, analysis.profile, quantize="int8")
    plan = solve(dataclasses.replace(problem, fixed_homes={"head.weight": home}), time_limit=5)
    assert {d.name: d.home for d in plan.tensors}["head.weight"] == home


@pytest.mark.parametrize("home", ["disk", "device"])
def test_a_fixed_home_leaves_no_later_gap_a_quantized_home(home: str) -> None:
    """A home fixed without codes left the home gap without the stored options,
    while the weight's later gaps still offered them: the model chose one there
    (unlinked) and building the plan failed, "unknown choice 'stored:int8'" (GPT-2
    with extra_example_inputs and quantize="int8" at its smallest budget)."""
    from test_quantize import FAST_QUANTIZE

    from planner.solver.candidates import WHOLE_TENSOR_CHOICES, build_candidates, parse_choice

    class UsedTwice(nn.Module):  # one weight read twice, with steps between
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(512, 512)
            self.middle = nn.Sequential(nn.ReLU(), nn.Linear(512, 512), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.middle(self.shared(x)))

    torch.manual_seed(0)
    analysis = planner.analyze(UsedTwice().eval(), (torch.randn(4, 512),), profile=FAST_QUANTIZE)
    problem = from_program(analysis.program, 10**8, analysis.profile, quantize="int8")
    problem = dataclasses.replace(problem, fixed_homes={"shared.weight": home})
    cands = build_candidates(problem)
    tensor = next(t.index for t in problem.tensors if t.name == "shared.weight")
    home_gap = cands.home_gap[tensor]
    at_home = {o.choice for o in cands.gaps[home_gap].options}
    later = [
        o.choice
        for gi in cands.gaps_of[tensor]
        if gi != home_gap
        for o in cands.gaps[gi].options
        if parse_choice(o.choice)[0] in WHOLE_TENSOR_CHOICES
    ]
    assert len(cands.gaps_of[tensor]) > 1, "one gap: proves nothing"
    assert set(later) <= at_home, later


def test_hooks_a_later_shapes_trace_installs_do_not_refuse_the_first_shape() -> None:
    """transformers installs its output recorders in the first forward that asks
    for hidden states: planned with output_hidden_states False, then True, the
    first shape's every call was refused for hooks "registered since planning".
    The first shape is traced again with them: here the hook doubles the output,
    which eager's calls of either shape then do."""

    class Recorded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
            if record and not self.lin._forward_hooks:
                self.lin.register_forward_hook(lambda module, args, out: out * 2)
            return self.lin(x)

    torch.manual_seed(0)
    model, x = Recorded().eval(), torch.randn(4, 8)
    pm = planner.plan(
        model,
        "100%",
        {"x": x, "record": False},
        extra_example_inputs=[{"x": x, "record": True}],
        profile="cpu",
        time_limit=2,
    )
    with torch.no_grad():
        expected = model.lin(x)  # the hook in place: doubled
        assert torch.equal(expected, 2 * F.linear(x, model.lin.weight, model.lin.bias))
        assert torch.equal(pm(x=x, record=False), expected)
        assert torch.equal(pm(x=x, record=True), expected)


def test_a_module_of_one_shape_has_no_other_shapes() -> None:
    """Code looping over pm.other_shapes met an AttributeError for one shape."""
    model, x = nn.Linear(8, 8).eval(), torch.randn(4, 8)
    pm = planner.plan(model, "100%", (x,), profile="cpu", time_limit=2)
    assert list(pm.other_shapes) == []


@pytest.mark.parametrize(
    "extra", [{"x": torch.randn(2, 8)}, torch.randn(2, 8)], ids=["dict", "tensor"]
)
def test_extra_example_inputs_not_in_a_list_is_a_clear_error(extra) -> None:  # type: ignore[no-untyped-def]
    """A dict was iterated as its keys ("example_inputs must be ...; got str"), a
    tensor as its rows (an error from inside the model)."""
    model = nn.Linear(8, 8).eval()
    with pytest.raises(planner.PlannerError, match=r"extra_example_inputs takes a list"):
        planner.plan(model, "100%", {"input": torch.randn(4, 8)}, extra_example_inputs=extra)


def test_apply_on_a_module_of_several_shapes_warns_once() -> None:
    """Each other shape's module warned again (they are children)."""
    model = nn.Linear(8, 8).eval()
    pm = planner.plan(
        model, "100%", (torch.randn(4, 8),), extra_example_inputs=[(torch.randn(2, 8),)],
        profile="cpu", time_limit=2,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.apply(lambda module: None)
    assert len([w for w in caught if "reaches the planned module only" in str(w.message)]) == 1
