"""``solve`` end to end on captured toy models and examples: every plan is replayed
again here by the independent validator, fits its budget, round-trips through
JSON, is deterministic and never slower than a baseline that fits; impossible
budgets raise BudgetTooSmall with a ``min_budget`` that works."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import pytest
import torch
from conftest import WithLoss, load_example, toy
from torch import nn

import planner
from planner.errors import BudgetTooSmall, InvalidPlan
from planner.solver import Plan, Problem, from_program, solve, validate
from planner.solver.baselines import greedy, keep_all
from planner.solver.candidates import build_candidates
from planner.solver.model import PlacementModel
from planner.solver.plan import Action
from planner.solver.remat_graphs import chain_graph, layered_dag, unet_of_size
from planner.solver.solve import _evaluate
from planner.solver.synthetic import (
    lower_bound,
    problem_from_dag,
    unplanned_peak,
    unplanned_seconds,
    with_budget,
)

#: Toys are small; with the default (64 KiB) nearly every tensor would be pinned
#: and there would be nothing to plan. 4 KiB leaves activations and weights movable.
MIN_MOVABLE = 4096
TIME_LIMIT = 5.0
FRACTIONS = (1.0, 0.75, 0.5, 0.3)


@functools.cache
def _analysis(source: str, mode: str):  # type: ignore[no-untyped-def]
    if source.startswith("example:"):
        model, inputs = load_example(source.split(":", 1)[1])
    else:
        # training pins the weights: a larger batch leaves activations to plan
        model, inputs = toy(source, 3, batch=64 if mode == "infer" else 512)
    return planner.analyze(model, inputs, mode=mode, profile="cpu")


def _problem(source: str, mode: str, fraction: float) -> tuple[Problem, int]:
    """The problem at ``fraction`` of its own keep-all peak (in training the
    executor holds tangents through the backward, so that peak can sit a little
    above the analysis timeline's), and the timeline's peak."""
    analysis = _analysis(source, mode)
    problem = from_program(
        analysis.program,
        analysis.unplanned_peak_bytes,
        analysis.profile,
        min_movable_bytes=MIN_MOVABLE,
    )
    return with_budget(
        problem, int(unplanned_peak(problem) * fraction)
    ), analysis.unplanned_peak_bytes


def check_plan(problem: Problem, plan: Plan, tmp_path: Path) -> None:
    """Every property a returned plan must have, re-derived here."""
    replay = validate(problem, plan)
    assert plan.predicted_peak_bytes == replay.peak_bytes <= problem.budget_bytes
    assert plan.estimated_seconds == pytest.approx(replay.seconds, rel=1e-9)
    assert replay.seconds >= sum(s.seconds for s in problem.steps) * (1 - 1e-9)
    assert plan.fingerprint == problem.fingerprint()
    assert plan.mode == problem.mode and plan.budget_bytes == problem.budget_bytes
    assert plan.unplanned_peak_bytes == unplanned_peak(problem)
    assert plan.unplanned_estimated_seconds == pytest.approx(unplanned_seconds(problem))
    # never slower than a baseline that fits (the baselines compete in solve)
    for name, entry in plan.baselines.items():
        if entry["fits"]:
            assert entry["peak_bytes"] <= problem.budget_bytes, name
            assert plan.estimated_seconds <= entry["seconds"] * (1 + 1e-9), name
    assert any(entry["fits"] for entry in plan.baselines.values())
    # JSON round trip
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict()
    validate(problem, loaded)


def check_too_small(problem: Problem, exc: BudgetTooSmall, tmp_path: Path) -> None:
    """The error names a budget that is above this one and that does work."""
    assert exc.min_budget is not None
    assert exc.min_budget > problem.budget_bytes
    assert exc.min_budget >= lower_bound(problem)
    assert f"{exc.min_budget:,}" in str(exc)
    retry = with_budget(problem, exc.min_budget)
    plan = solve(retry, time_limit=TIME_LIMIT)
    check_plan(retry, plan, tmp_path)


def solve_and_check(problem: Problem, tmp_path: Path) -> Plan | None:
    try:
        plan = solve(problem, time_limit=TIME_LIMIT)
    except BudgetTooSmall as exc:
        check_too_small(problem, exc, tmp_path)
        return None
    check_plan(problem, plan, tmp_path)
    return plan


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("kind", ["chain", "diamond", "residual", "mlp"])
def test_toy_plans(kind: str, mode: str, fraction: float, tmp_path: Path) -> None:
    problem, timeline_peak = _problem(kind, mode, fraction)
    # the IR's timeline and the keep-all replay agree, except that the executor
    # holds tangents through the backward (training) and writes some outputs into
    # dying inputs (REUSE_INPUT), which can only lower its peak
    tangents = sum(t.nbytes for t in problem.tensors if t.kind == "tangent")
    assert unplanned_peak(problem) <= timeline_peak + tangents
    if not any(s.reuse for s in problem.steps):
        assert timeline_peak <= unplanned_peak(problem)
    plan = solve_and_check(problem, tmp_path)
    if fraction == 1.0:
        assert plan is not None and plan.solver.status == "FITS_UNPLANNED"
        assert plan.estimated_seconds == pytest.approx(unplanned_seconds(problem))
        assert {a.kind for a in plan.actions} <= {"free"}


def test_toys_have_something_to_plan() -> None:
    """Guard the test above: in each mode some toy needs the solver at 90%."""
    for mode in ("infer", "train"):
        statuses = set()
        for kind in ("chain", "residual", "mlp"):
            problem, _ = _problem(kind, mode, 0.9)
            try:
                statuses.add(solve(problem, time_limit=TIME_LIMIT).solver.name)
            except BudgetTooSmall:
                statuses.add("too small")
        assert any(s.startswith("cp-sat") for s in statuses), (mode, statuses)


@pytest.mark.parametrize("fraction", [0.75, 0.5])
@pytest.mark.parametrize("example", ["mlp", "resnet"])
def test_example_train_plans(example: str, fraction: float, tmp_path: Path) -> None:
    problem, _ = _problem(f"example:{example}", "train", fraction)
    solve_and_check(problem, tmp_path)


@pytest.mark.parametrize("kind", ["residual", "mlp"])
def test_below_lower_bound_raises_with_working_min_budget(kind: str, tmp_path: Path) -> None:
    problem, _ = _problem(kind, "train", 1.0)
    low = with_budget(problem, lower_bound(problem) - 1)
    with pytest.raises(BudgetTooSmall) as info:
        solve(low, time_limit=TIME_LIMIT)
    check_too_small(low, info.value, tmp_path)


def _strip_timing(plan: Plan) -> dict:
    data = plan.to_dict()
    data["solver"].pop("seconds")
    return data


@pytest.mark.parametrize(
    "source, repeats",
    [
        ("residual", 20),
        ("synthetic", 2),
    ],
)
def test_deterministic(source: str, repeats: int) -> None:
    """Solving the same problem again gives the very same plan (20 repeats where
    the model has many tied optima, so a nondeterministic search shows)."""
    if source == "synthetic":
        base = problem_from_dag(layered_dag(120, seed=3), 1, backward=False)
        problem = with_budget(base, int(unplanned_peak(base) * 0.8))
    else:
        problem, _ = _problem(source, "train", 0.75)
    first = solve(problem, time_limit=TIME_LIMIT)
    for _ in range(repeats):
        again = solve(problem, time_limit=TIME_LIMIT)
        assert again.actions == first.actions
        assert _strip_timing(again) == _strip_timing(first)


def test_time_limit_respected() -> None:
    """A problem the model cannot finish in the limit still returns in about it."""
    base = problem_from_dag(layered_dag(300, seed=7), 1, weights=False)
    problem = with_budget(base, int(unplanned_peak(base) * 0.75))
    limit = 1.0
    start = time.perf_counter()
    plan = solve(problem, time_limit=limit)
    wall = time.perf_counter() - start
    assert plan.solver.seconds <= limit + 0.5
    assert wall <= limit + 2.0, f"solve took {wall:.1f}s for a {limit}s limit"


def test_the_greedy_baseline_is_not_cut_short_by_a_short_time_limit() -> None:
    """The greedy descends from keep-all and stops where the plan fits: cut at half
    the time limit, it fit nothing and was thrown away, and a short limit kept a
    memory-minimizing plan (4-13% of the budget used, 3.5-6x slower on graphs of
    1,600-5,000 ops). At ``time_limit=0`` it was cut before its first move."""
    base = problem_from_dag(layered_dag(120, seed=3), 1, backward=False)
    problem = with_budget(base, int(unplanned_peak(base) * 0.8))
    plan = solve(problem, time_limit=0)
    assert plan.baselines["greedy"]["fits"], plan.baselines["greedy"]
    assert plan.predicted_peak_bytes > 0.5 * problem.budget_bytes


@pytest.mark.parametrize("source", ["residual", "synthetic"])
def test_model_rejects_keep_all_over_budget(source: str) -> None:
    """Where keep-all does not fit, the model with every gap forced to keep/home
    must be infeasible (its memory constraints are exact up to rounding up)."""
    if source == "synthetic":
        base = problem_from_dag(layered_dag(40, seed=1), 1)
        problem = with_budget(base, int(unplanned_peak(base) * 0.9))
    else:
        problem, _ = _problem(source, "train", 0.75)
    assert unplanned_peak(problem) > problem.budget_bytes
    cands = build_candidates(problem)
    model = PlacementModel(cands)
    for xs, choice in zip(model.x, keep_all(cands)):
        model.model.add(xs[choice] == 1)
    result = model.solve(TIME_LIMIT)
    assert result.choices is None, "the model accepts keep-all above the budget"


def test_model_accounts_keep_all_like_the_validator() -> None:
    """With every gap at keep/home the model's bytes per step equal the replay's."""
    from planner.solver.model import _held_by_step
    from planner.solver.synthetic import keep_all_plan

    base = problem_from_dag(layered_dag(30, seed=2), 1, backward=True)
    problem = with_budget(base, 2**62)
    cands = build_candidates(problem)
    flat = [(gi, o.choice) for gi, gap in enumerate(cands.gaps) for o in gap.options]
    chosen = {(gi, choice) for gi, choice in enumerate(keep_all(cands))}
    entries = _held_by_step(cands, problem.num_steps)
    held = list(cands.fixed)
    for t, k, gi, b in zip(entries.step, entries.option, entries.gap, entries.nbytes):
        assert flat[k][0] == gi
        if flat[k] in chosen:
            held[t] += int(b)
    replay = validate(problem, keep_all_plan(problem))
    assert held == replay.resident_bytes


def test_the_portfolio_reaches_the_optimum_early() -> None:
    """Interleaved, CP-SAT's full subsolvers take 1.0 deterministic seconds each in
    turn; 'core', 'default_lp' and 'no_lp' spent theirs (2-6 s of wall time each)
    finding nothing before 'max_lp_sym', which found and proved the optimum. Left
    out, this U-Net is proven optimal at 0.5 deterministic seconds (3.5 with them),
    so within 1.0 whatever the machine's load."""
    base = problem_from_dag(unet_of_size(100), 1, seed=100)
    problem = with_budget(base, int(unplanned_peak(base) * 0.7))
    cands = build_candidates(problem)
    result = PlacementModel(cands).solve(1.0, hint=greedy(cands), wall_limit=60)
    assert result.status == "OPTIMAL", (result.objective_seconds, result.bound_seconds)


def test_cumulative_memory_matches_time_indexed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two memory formulations (rows per step; one cumulative constraint used
    on long graphs) accept the same plans: equal optimal objectives."""
    import planner.solver.model as model_module

    # Which formulation is used is forced below, whatever the graph's length, so
    # the size only has to leave real choices: 20 layers (108 gaps, an optimum
    # that offloads and recomputes at 70%) prove both optimal in half the time of 30.
    base = problem_from_dag(layered_dag(20, seed=4), 1, backward=True)
    problem = with_budget(base, int(unplanned_peak(base) * 0.7))
    cands = build_candidates(problem)
    rows = PlacementModel(cands).solve(60, relative_gap=0.0)
    monkeypatch.setattr(model_module, "LINEAR_MEMORY_TERMS", 0)
    cumulative = PlacementModel(cands).solve(60, relative_gap=0.0)
    assert rows.status == cumulative.status == "OPTIMAL"
    assert rows.objective_seconds == pytest.approx(cumulative.objective_seconds, abs=1e-7)
    for result in (rows, cumulative):
        plan = _evaluate(cands, "x", result.choices, None).plan
        assert validate(problem, plan).peak_bytes <= problem.budget_bytes


def _stored_problem(fraction: float) -> Problem:
    """The MLP example's inference (weights are most of its memory) with int8
    allowed, at ``fraction`` of its weight bytes; (de)quantization priced at memory
    speed, as the Triton kernels run on a GPU (the CPU profile's slow torch kernels
    make streaming from disk the cheaper choice there)."""
    analysis = _analysis("example:mlp", "infer")
    profile = dataclasses.replace(
        analysis.profile,
        quantize_bandwidth=analysis.profile.memory_bandwidth,
        dequantize_bandwidth=analysis.profile.memory_bandwidth,
    )
    problem = from_program(
        analysis.program, 1, profile, quantize="int8", min_movable_bytes=MIN_MOVABLE
    )
    weights = sum(t.nbytes for t in problem.tensors if t.persistent)
    return with_budget(problem, int(weights * fraction))


def test_weights_stored_quantized_replay_and_agree_across_gaps() -> None:
    """At 30% of its weight bytes, reading a weight from disk for every linear stalls,
    storing it int8 on the device (read fused) does not: the solver stores weights;
    the plan replays within the budget, and every gap of a stored weight agrees
    with its home."""
    problem = _stored_problem(0.3)
    fused = [t for t in problem.tensors if t.fused_uses]
    assert fused and all(t.persistent for t in fused)
    plan = solve(problem, time_limit=TIME_LIMIT)
    replay = validate(problem, plan)
    assert replay.peak_bytes <= problem.budget_bytes
    stored = [d for d in plan.tensors if d.home == "device:int8"]
    assert stored
    for d in stored:
        assert d.decision == "quantize:int8"
        assert all(choice == "stored:int8" for _, _, choice in d.gaps)


def test_weights_read_quantized_from_disk_below_what_storing_them_allows() -> None:
    """At 20% of the MLP's weight bytes not all weights fit even stored int8
    (25% of their bytes): some get a disk home holding their codes, read before
    each use (a quarter of the bytes a full read moves) and read fused. Every gap
    of such a weight agrees; the plan replays within the budget, moving fewer disk
    bytes than the lossless plan at the same budget."""
    problem = _stored_problem(0.2)
    plan = solve(problem, time_limit=TIME_LIMIT)
    replay = validate(problem, plan)
    assert replay.peak_bytes <= problem.budget_bytes
    fetched = [d for d in plan.tensors if d.home == "disk:int8"]
    assert fetched
    for d in fetched:
        assert d.decision == "offload:disk+quantize:int8"
        assert all(choice == "qfetch:disk" for _, _, choice in d.gaps)
    lossless = dataclasses.replace(problem, quantize=None, quantize_kinds=())
    lossless_replay = validate(lossless, solve(lossless, time_limit=TIME_LIMIT))
    assert replay.bytes_moved["disk_read"] < lossless_replay.bytes_moved["disk_read"]


def test_greedy_stores_all_gaps_of_a_weight_at_once() -> None:
    from planner.solver.baselines import greedy
    from planner.solver.solve import _replay_unbounded

    for fraction in (0.3, 0.2):
        problem = _stored_problem(fraction)
        cands = build_candidates(problem)
        choices = greedy(cands)
        for tensor, gaps in cands.gaps_of.items():
            picked = {choices[g] for g in gaps}
            if any(c.startswith(("stored:", "qfetch:")) for c in picked):
                assert len(picked) == 1, (problem.tensors[tensor].name, picked)
        assert any(c.startswith("stored:") for c in choices)
        _replay_unbounded(cands, choices)  # a valid schedule (raises otherwise)


@pytest.mark.parametrize(
    "quantize, allowed",
    [
        ({"transfers": "int8"}, {"qoffload"}),
        ({"activations": "int8"}, {"quantize"}),
        ("int8", {"qoffload", "quantize"}),
    ],
)
def test_quantize_mapping_selects_the_lossy_options(quantize: object, allowed: set) -> None:
    analysis = _analysis("example:resnet", "train")
    problem = from_program(
        analysis.program, 1, analysis.profile, quantize=quantize, min_movable_bytes=MIN_MOVABLE
    )
    cands = build_candidates(problem)
    lossy = {
        o.choice.split(":")[0]
        for g in cands.gaps
        for o in g.options
        if o.choice.startswith(("quantize", "qoffload", "stored"))
    }
    assert lossy == allowed
    plan = solve(with_budget(problem, int(0.5 * unplanned_peak(problem))), time_limit=TIME_LIMIT)
    validate(with_budget(problem, plan.budget_bytes), plan)


def test_a_weight_is_quantized_by_its_home_alone() -> None:
    """GPT-2's tied weight is read twice (the lookup, the head): between the two it
    may be kept, offloaded or fetched, never held quantized. That would have the
    head read a round trip the lookup did not (in training, a frozen weight's
    backward one its forward did not), which no eager model computes. Its stored
    homes remain, and activations keep their quantized gaps."""
    analysis = _analysis("example:gpt2", "infer")
    problem = from_program(
        analysis.program, 1, analysis.profile, quantize="int8", min_movable_bytes=MIN_MOVABLE
    )
    cands = build_candidates(problem)

    def choices(gap_indices: list[int]) -> set[str]:
        return {o.choice.split(":")[0] for i in gap_indices for o in cands.gaps[i].options}

    weights = [i for i, t in enumerate(problem.tensors) if t.persistent and t.quantizable]
    between_reads = [
        i for w in weights for i in cands.gaps_of.get(w, []) if cands.gaps[i].start >= 0
    ]
    assert between_reads, "the tied weight has a gap between its two reads"
    assert "quantize" not in choices(between_reads)
    assert "stored" in choices([cands.home_gap[w] for w in weights if w in cands.home_gap])
    activations = [i for t, gaps in cands.gaps_of.items() for i in gaps if t not in weights]
    assert "quantize" in choices(activations)


def test_quantize_leaves_the_backwards_values_alone_unless_gradients_are_named() -> None:
    """A plain ``quantize="int8"`` may quantize what the forward saves but none of
    the values the backward computes (a quantized gradient stream spoils every
    gradient computed from it); ``"gradients"`` widens ``"activations"`` to them,
    and alone it is an error that says what to add."""
    analysis = _analysis("example:resnet", "train")
    start = analysis.program.backward_start()

    def quantizable(quantize: object) -> tuple[set[str], set[str]]:
        problem = from_program(
            analysis.program, 1, analysis.profile, quantize=quantize, min_movable_bytes=MIN_MOVABLE
        )
        names = [t for t in problem.tensors if t.quantizable]
        return (
            {t.name for t in names if t.appears_at < start},
            {t.name for t in names if t.appears_at >= start},
        )

    forward, backward = quantizable("int8")
    assert forward and not backward
    widened_forward, widened_backward = quantizable({"activations": "int8", "gradients": "int8"})
    assert widened_forward == forward and widened_backward
    with pytest.raises(ValueError, match="name one of them too"):
        quantizable({"gradients": "int8"})


def test_training_on_cpu_moves_parameters_and_delivers_gradients(tmp_path: Path) -> None:
    """The MLP's training floor was 99% of its peak while parameters and gradients
    had to stay on the device; with parameter homes on disk and gradients
    delivered there, 30% plans, and the plan uses both."""
    problem, _ = _problem("example:mlp", "train", 0.3)
    params = [t for t in problem.tensors if t.kind == "param" and not t.pinned]
    grads = [t for t in problem.tensors if t.deliverable]
    assert params and all(t.persistent for t in params)
    assert grads and all(t.kind == "grad" and t.until_end for t in grads)
    plan = solve_and_check(problem, tmp_path)
    assert plan is not None
    homes = {d.name: d.home for d in plan.tensors}
    assert any(homes[t.name] == "disk" for t in params)
    delivered = {a.tensor for a in plan.actions if a.kind == "deliver"}
    assert delivered and delivered <= {t.name for t in grads}
    # a delivered gradient is made once and never freed or read again
    assert not any(a.tensor in delivered and a.kind == "free" for a in plan.actions)


def _cuda_training_problem(budget_share_of_weights: float) -> Problem:
    """Eight 1024-wide linear layers' training step on the h100 profile, at a
    share of the parameters' bytes."""
    torch.manual_seed(0)
    model = WithLoss(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    profile = planner.get_profile("h100")
    analysis = planner.analyze(model, (torch.randn(256, 1024),), mode="train", profile=profile)
    return from_program(analysis.program, int(weights * budget_share_of_weights), profile)


def test_on_cuda_gradients_are_delivered_to_the_host_only_for_parameters_homed_there() -> None:
    """On a CUDA profile a parameter may live on the host or disk between uses, and
    its gradient may then leave for the host as soon as it is made (a .grad lives
    on its parameter's device). Half the parameters' bytes was below CUDA's floor
    while every gradient waited for the end of the backward; now it plans, each
    delivery a background copy (deliver, wait, free) of a gradient whose
    parameter's home is a tier. A delivery for a parameter on the device is refused."""
    problem = _cuda_training_problem(0.5)
    assert problem.tiers == ("host", "disk")
    params = {t.index: t for t in problem.tensors if t.kind == "param" and not t.pinned}
    grads = [t for t in problem.tensors if t.deliverable]
    assert grads and all(t.delivery_needs_home_of in params for t in grads)
    plan = solve(problem, time_limit=10)
    replay = validate(problem, plan)
    assert replay.peak_bytes <= problem.budget_bytes
    homes = {d.name: d.home for d in plan.tensors}
    delivered = [a for a in plan.actions if a.kind == "deliver"]
    assert delivered and all(a.tier == "host" for a in delivered)
    for a in delivered:
        grad = next(t for t in grads if t.name == a.tensor)
        assert homes[params[grad.delivery_needs_home_of].name] in ("host", "disk")
        after = [b.kind for b in plan.actions if b.tensor == a.tensor and b.step >= a.step]
        assert after == ["deliver", "wait", "free"], after

    roomy = _cuda_training_problem(1.5)
    plan = solve(roomy, time_limit=10)
    homes = {d.name: d.home for d in plan.tensors}
    names = {t.index: t.name for t in roomy.tensors}
    grad = next(
        t
        for t in roomy.tensors
        if t.deliverable and homes[names[t.delivery_needs_home_of]] == "device"
    )
    last = max([grad.appears_at, *grad.uses])
    forced = dataclasses.replace(
        plan,
        actions=[
            *plan.actions,
            Action(last, "after", "deliver", grad.name, "host"),
            Action(last, "after", "wait", grad.name),
            Action(last, "after", "free", grad.name),
        ],
    )
    with pytest.raises(InvalidPlan, match="parameter's home is a tier"):
        validate(roomy, forced)
    first = next(a for a in plan.actions if a.kind == "deliver")  # twice: .grad gets it twice
    twice = [Action(first.step, "after", k, first.tensor, "host") for k in ("deliver", "wait")]
    actions = list(plan.actions)
    at = actions.index(first) + 1
    with pytest.raises(InvalidPlan, match="delivered already"):
        validate(roomy, dataclasses.replace(plan, actions=actions[:at] + twice + actions[at:]))


def test_on_cuda_each_copy_costs_its_issue_so_plans_copy_less() -> None:
    """A GPU profile charges each copy ``copy_issue_seconds`` of the thread that
    launches the ops (measured: 150-220 us per copy on an H200 VM, where plans that
    copied freely ran 3-4x eager's time). ResNet's training step at half its peak:
    priced that way, the plan copies a handful of tensors and recomputes instead;
    priced free, it copies dozens. The replay charges the issue per copy, and the
    end's copy down of each gradient not delivered to a parameter on the host."""
    model, inputs = load_example("resnet")
    profile = planner.get_profile("h200")
    assert profile.copy_issue_seconds > 0
    free = dataclasses.replace(profile, copy_issue_seconds=0.0)
    copies = {}
    for label, prof in (("priced", profile), ("free", free)):
        analysis = planner.analyze(WithLoss(model), inputs, mode="train", profile=prof)
        problem = from_program(analysis.program, analysis.unplanned_peak_bytes // 2, prof)
        plan = solve(problem, time_limit=10)
        copies[label] = sum(a.kind in ("prefetch", "offload", "deliver") for a in plan.actions)
        homes = {d.name: d.home for d in plan.tensors}
        names = {t.index: t.name for t in problem.tensors}
        delivered = {a.tensor for a in plan.actions if a.kind == "deliver"}
        returned = sum(
            problem.bandwidths.returned_to_host_seconds(t.nbytes)
            for t in problem.tensors
            if t.delivery_needs_home_of is not None
            and homes[names[t.delivery_needs_home_of]] != "device"
            and t.name not in delivered
        )
        replay = validate(problem, plan)
        expected = copies[label] * prof.copy_issue_seconds + returned
        assert replay.copy_seconds == pytest.approx(expected)
    assert copies["priced"] * 4 < copies["free"], copies


def test_disk_priced_at_page_cache_rates_when_the_files_fit(monkeypatch) -> None:
    """With page-cache rates in the profile, a problem whose tensors fit in the free
    memory's dirty share prices disk copies at those rates, and at the disk's once
    free memory is too small; a read's CPU work is the page-cache copy either way."""
    import dataclasses

    import planner.solver.translate as translate

    analysis = _analysis("mlp", "infer")
    profile = dataclasses.replace(
        analysis.profile, disk_cached_read_bandwidth=12e9, disk_cached_write_bandwidth=9e9
    )
    monkeypatch.setattr(translate, "free_memory_bytes", lambda: 2**40)
    cached = from_program(analysis.program, analysis.unplanned_peak_bytes, profile)
    assert (cached.bandwidths.disk_read, cached.bandwidths.disk_write) == (12e9, 9e9)
    assert cached.meta["disk_rates"].startswith("page cache")
    monkeypatch.setattr(translate, "free_memory_bytes", lambda: 1024)
    cold = from_program(analysis.program, analysis.unplanned_peak_bytes, profile)
    assert cold.bandwidths.disk_read == profile.disk_read_bandwidth
    assert cold.bandwidths.disk_read_work == cached.bandwidths.disk_read_work == 12e9
    # the same read costs the ops less CPU work than its channel time when cold
    channel = ("disk", "read")
    assert cold.bandwidths.copy_compute_seconds(channel, 2**20) < cold.bandwidths.copy_seconds(
        channel, 2**20
    )


def test_an_offload_can_wait_for_its_write_at_once_however_fast_the_disk() -> None:
    """With copies one step hides, the windowed offload holds its tensor through
    that step; the variant that waits for the write at once holds nothing after the
    last use, which is what the lowest budgets need. It must exist at any speed."""
    problem, _ = _problem("chain", "train", 0.5)
    fast = dataclasses.replace(
        problem,
        bandwidths=dataclasses.replace(
            problem.bandwidths,
            disk_read=1e15,
            disk_write=1e15,
            disk_read_latency=0.0,
            disk_write_latency=0.0,
        ),
    )
    for p in (problem, fast):
        cands = build_candidates(p)
        offloads = [
            {o.choice for o in gap.options}
            for gap in cands.gaps
            if any(o.choice.startswith("offload:disk") for o in gap.options)
        ]
        assert offloads, "the toy must have tensors to offload"
        assert all("offload:disk:sync" in choices for choices in offloads)


def test_below_the_floor_no_greedy_runs_and_min_budget_is_made_once(monkeypatch) -> None:
    """Below what any plan can hold the budget greedy cannot fit, and descended
    until no move was left; and the memory-minimizing greedy ran twice (solve,
    then the error's min_budget). A 5,000-step chain: 78 s to BudgetTooSmall,
    now 23 s. The min_budget is the same."""
    import importlib

    from planner.solver import baselines

    solve_module = importlib.import_module("planner.solver.solve")  # the package's is a function

    problem = problem_from_dag(chain_graph(40), 1, seed=3)
    problem = with_budget(problem, 1)
    with pytest.raises(BudgetTooSmall) as before:
        solve(problem, time_limit=1)
    calls: list[int | None] = []
    original = baselines.greedy

    def counted(cands, budget=None, deadline=None):  # type: ignore[no-untyped-def]
        calls.append(budget)
        return original(cands, budget=budget, deadline=deadline)

    monkeypatch.setattr(solve_module, "greedy", counted)
    with pytest.raises(BudgetTooSmall) as after:
        solve(problem, time_limit=1)
    assert calls == [0]
    assert after.value.min_budget == before.value.min_budget


class _Widening(nn.Module):
    """Its floor is the ReLU between the wide layers: the 512 KiB hidden it reads
    and the 512 KiB it writes are on the device together in every plan."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 4096)
        self.down = nn.Linear(4096, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        return self.down(torch.relu(hidden))  # the floor's step


def test_budget_too_small_names_the_step_that_sets_the_floor() -> None:
    """Below what any plan reaches, the error says which op sets the floor, where
    it is in the model's source, and the largest tensors every plan holds there:
    what a user must shrink (the batch, a width) when no budget they have fits."""
    model = _Widening()
    with pytest.raises(BudgetTooSmall) as info:
        planner.plan(model, 64 * 1024, example_inputs=(torch.randn(32, 16),))
    message = str(info.value)
    line = _Widening.forward.__code__.co_firstlineno + 2
    assert f"at step 2 of 3, op relu at test_solve.py:{line} in forward" in message
    # largest first: the ReLU's input (the up layer's output) and its output
    assert "holding linear 512.0 KiB, relu 512.0 KiB, input[0][0] 2.0 KiB" in message
    assert info.value.min_budget >= 1024 * 1024


class _WideningLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Widening()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).sum()


def test_a_training_floor_names_the_forward_line_its_backward_op_differentiates() -> None:
    """A training plan's floor is in its backward here (the ReLU's gradient, which
    reads the hidden and writes its gradient): the message names the forward line
    whose gradient it is, marked as such. Before, the joint graph's ops carried no
    source line and the message only named ``threshold_backward``."""
    with pytest.raises(BudgetTooSmall) as info:
        planner.plan(_WideningLoss(), 1024, example_inputs=(torch.randn(32, 16),), mode="train")
    line = _Widening.forward.__code__.co_firstlineno + 2
    assert (
        f"op threshold_backward at test_solve.py:{line} in forward (backward), "
        "which every plan runs holding relu 512.0 KiB" in str(info.value)
    )


class _Product(nn.Module):
    """The product writes into one factor's dying buffer (``Step.reuse``): at its
    step both factors are held and the product adds no bytes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.repeat(1, 256)
        b = x.repeat(1, 256)
        return (a * b).sum(-1)


def test_the_floors_blockers_leave_out_an_output_written_into_its_input() -> None:
    """The floor, 1 MiB, is the two factors: naming the product too (512 KiB more)
    listed more than the floor holds."""
    with pytest.raises(BudgetTooSmall) as info:
        planner.plan(_Product(), 1024, example_inputs=(torch.randn(32, 16),))
    message = str(info.value)
    assert message.startswith("budget 1,024 bytes (1.0 KiB) is too small")
    assert "op mul at test_solve.py:" in message
    assert "holding repeat 512.0 KiB, repeat_1 512.0 KiB, input[0][0] 2.0 KiB)" in message


def test_a_budget_of_one_byte_is_said_in_the_singular() -> None:
    with pytest.raises(BudgetTooSmall, match=r"^budget 1 byte \(1 B\) is too small"):
        planner.plan(_Product(), 1, example_inputs=(torch.randn(32, 16),))


def test_at_the_smallest_budget_cp_sat_plans_in_the_validators_bytes() -> None:
    """At ``budget="min"`` a plan has no slack to spare. The memory rows once
    counted in scaled units, each term rounded up: their rounding passed the
    floor, CP-SAT was infeasible at once and the memory-minimizing plan was kept
    (this MLP's step estimated 0.072 s against 0.044 s solved)."""
    model, inputs = load_example("mlp")
    pm = planner.plan(model, "min", example_inputs=inputs, mode="train")
    assert pm.report.solver["name"] == "cp-sat"
    assert pm.report.solver["status"] in ("OPTIMAL", "FEASIBLE")
    assert pm.plan.predicted_peak_bytes <= pm.report.budget_bytes


def test_a_min_peak_solve_logs_its_incumbents_in_bytes(caplog: pytest.LogCaptureFixture) -> None:
    """Solving for the lowest peak, the progress log gave the peak in bytes times
    1e-7 as "seconds of added time"."""
    from planner.solver.candidates import build_candidates
    from planner.solver.model import PlacementModel

    problem, _ = _problem("example:mlp", "train", 0.5)
    with caplog.at_level("INFO", logger="planner.solver.model"):
        PlacementModel(build_candidates(problem), minimize_peak=True).solve(1.0)
    assert "incumbent peak" in caplog.text and "bytes" in caplog.text
    assert "added time" not in caplog.text
