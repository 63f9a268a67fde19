"""A buffer each call updates in place (a key/value cache) homed in a tier: fetched
before the write, its update written back to the tier after its last read
(``Tensor.writes_home_of``). The model, the greedy baseline and the validator
hold the two choices together: written back exactly when the home is a tier."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CachedLayer, TwoCaches
from host_tier import run_gpu_plans_here
from torch import nn

import planner
from planner.codegen.emit import emit_executor
from planner.errors import InvalidPlan
from planner.solver import from_program, solve, validate
from planner.solver.baselines import greedy
from planner.solver.candidates import (
    build_candidates,
    holder_gap,
    parse_choice,
    partner_choice,
)
from planner.solver.plan import Action
from planner.solver.solve import keep_all_peak


def _problem(share: float, profile: str = "cpu"):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TwoCaches().eval()
    inputs = (torch.randn(1, 32), torch.tensor([3]))
    analysis = planner.analyze(model, inputs, profile=profile)
    budget = int(analysis.unplanned_peak_bytes * share)
    return from_program(analysis.program, budget, analysis.profile)


def _pairs(problem):  # type: ignore[no-untyped-def]
    """(update, buffer) tensors of each cache."""
    return [
        (t, problem.tensors[t.writes_home_of])
        for t in problem.tensors
        if t.writes_home_of is not None
    ]


def _smallest(problem):  # type: ignore[no-untyped-def]
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        solve(dataclasses.replace(problem, budget_bytes=1), time_limit=5)
    return dataclasses.replace(problem, budget_bytes=smallest.value.min_budget)


def test_each_cache_and_its_update_are_marked() -> None:
    pairs = _pairs(_problem(1.0))
    assert len(pairs) == 2
    for update, buffer in pairs:
        assert buffer.persistent and not buffer.pinned and not buffer.until_end
        assert update.deliverable and update.until_end and not update.pinned
        assert update.recompute is None  # made from its buffer, which is gone by then


def test_at_the_smallest_budget_the_caches_live_in_the_tier_and_are_written_back() -> None:
    problem = _smallest(_problem(1.0))
    cache_bytes = _pairs(problem)[0][1].nbytes
    assert problem.budget_bytes < 1.2 * cache_bytes  # one cache on the device at a time
    plan = solve(problem, time_limit=5)
    homes = {d.name: d.home for d in plan.tensors}
    written = {(a.tensor, a.tier) for a in plan.actions if a.kind == "deliver"}
    for update, buffer in _pairs(problem):
        assert homes[buffer.name] == "disk"
        assert (update.name, "disk") in written
    validate(problem, plan)


def test_on_a_gpu_the_caches_live_on_the_host_and_are_written_back_there() -> None:
    """CUDA: the update's copy down goes to the host, like a delivered gradient's
    (in the background or waited for at once); no cache is homed on disk, where
    no write-back reaches."""
    problem = _smallest(_problem(1.0, profile="h100"))
    plan = solve(problem, time_limit=5)
    homes = {d.name: d.home for d in plan.tensors}
    written = {a.tensor: a.tier for a in plan.actions if a.kind == "deliver"}
    for update, buffer in _pairs(problem):
        assert update.delivery_needs_home_of == buffer.index
        assert homes[buffer.name] == "host" and written[update.name] == "host"
    validate(problem, plan)


def test_on_a_gpu_an_index_copy_sends_down_only_its_rows() -> None:
    """CUDA: the new row (32 floats) is gathered on the device at the op, with an
    int64 copy of its position (charged as that op's workspace: a 512-byte block
    each, what the allocator hands out) and copied down; the update holds nothing
    after its last read, and the host channel carries the rows, not the 256 KiB
    caches."""
    gpu = _problem(1.0, profile="h100")
    cpu = _problem(1.0)
    for update, _ in _pairs(gpu):
        assert update.write_back_bytes == 32 * 4
        step = update.appears_at
        assert gpu.steps[step].workspace_bytes == cpu.steps[step].workspace_bytes + 2 * 512
    small = _smallest(gpu)
    plan = solve(small, time_limit=5)
    homes = {d.name: d.home for d in plan.tensors}
    assert all(homes[buffer.name] == "host" for _, buffer in _pairs(small))
    replay = validate(small, plan)
    assert replay.bytes_moved["device_to_host"] == 2 * 32 * 4
    cands = build_candidates(small)
    for update, _ in _pairs(small):
        (last,) = [g for g in cands.gaps if g.tensor == update.index and g.end == small.num_steps]
        assert [o.choice for o in last.options] == ["keep", "deliver:host:sync"]


def test_the_cuda_executor_sends_down_the_rows_at_the_op_and_nothing_after() -> None:
    """Emitted for a CUDA device (not run here): each cache's row goes to the
    host at its ``index_copy`` and the update is freed after its last read
    with no copy of its own (before: the whole cache went down after it)."""
    torch.manual_seed(0)
    analysis = planner.analyze(
        TwoCaches().eval(), (torch.randn(1, 32), torch.tensor([3])), profile="h100"
    )
    small = _smallest(from_program(analysis.program, 1, analysis.profile))
    plan = solve(small, time_limit=5)
    source = emit_executor(
        analysis.program, analysis.captured.graph_module, small, plan, "eager",
        torch.device("cuda"),
    ).source  # fmt: skip
    for k in range(2):
        assert f"rt.write_rows('layers.{k}.cache', 'host', " in source
    assert "rt.offload(" not in source


def test_on_a_gpu_the_rows_reach_the_host_home_as_the_op_makes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan for a GPU profile, run here on the host-tier stand-in: each step
    writes its row into the host copy of each cache (``rt.write_rows``), nothing
    else goes down, and the next step reads the caches back from there."""
    engines = run_gpu_plans_here(monkeypatch)
    torch.manual_seed(0)
    model = TwoCaches().eval()
    reference = TwoCaches().eval()
    reference.load_state_dict(model.state_dict())
    inputs = [(torch.randn(1, 32), torch.tensor([k])) for k in (3, 0, 7)]
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(model, 1, inputs[0], profile="h100")
    pm = planner.plan(model, smallest.value.min_budget, inputs[0], profile="h100")
    try:
        assert "rt.write_rows('layers.0.cache', 'host', " in pm.code
        assert "rt.write_rows('layers.1.cache', 'host', " in pm.code
        with torch.no_grad():
            for args in inputs:
                assert torch.equal(pm(*args), reference(*args))
        engine = engines[-1]
        assert engine.rows_written_to_host == 2 * len(inputs)
        for k in range(2):
            assert torch.equal(engine.host[f"layers.{k}.cache"], reference.layers[k].cache)
    finally:
        pm.close()


def test_with_room_the_caches_stay_on_the_device_and_nothing_is_written_back() -> None:
    problem = _problem(1.0)
    plan = solve(problem, time_limit=5)
    homes = {d.name: d.home for d in plan.tensors}
    assert all(homes[buffer.name] == "device" for _, buffer in _pairs(problem))
    assert not [a for a in plan.actions if a.kind == "deliver"]


def test_the_validator_refuses_an_update_not_written_back_or_written_to_the_wrong_home() -> None:
    small = _smallest(_problem(1.0))
    plan = solve(small, time_limit=5)
    update = _pairs(small)[-1][0]  # written back after the last step: room to keep it
    kept = dataclasses.replace(
        plan, actions=[a for a in plan.actions if (a.kind, a.tensor) != ("deliver", update.name)]
    )
    with pytest.raises(InvalidPlan, match=r"was updated but its update .* was not written back"):
        validate(small, kept)
    roomy = _problem(1.0)
    plan = solve(roomy, time_limit=5)
    update = _pairs(roomy)[0][0]
    last = update.uses[-1]
    extra = Action(last, "after", "deliver", update.name, "disk")
    with pytest.raises(InvalidPlan, match=r"written back to disk, but its buffer's home is device"):
        validate(roomy, dataclasses.replace(plan, actions=[*plan.actions, extra]))


def test_greedy_moves_a_cache_and_its_update_together() -> None:
    cands = build_candidates(_problem(0.4))
    assert cands.partners
    choices = greedy(cands, budget=0)
    moved = 0
    for gi, other in cands.partners.items():  # late reads and such variants aside
        follow = partner_choice(cands, gi, choices[gi])
        assert follow is not None and parse_choice(choices[other]) == parse_choice(follow)
        moved += choices[gi].startswith("fetch")
    assert moved == 2  # both caches, as low as memory goes


def test_an_index_copy_writes_back_its_rows_another_update_all_of_it() -> None:
    """On a CPU device the write-back of an ``index_copy`` costs its rows (the
    source: one position of 32 floats here); an update made by indexing
    (``index_put``) is written back whole, after its last read, and the next call
    reads what was written either way."""

    class Indexed(CachedLayer):
        def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            self.cache[position] = self.lin(x)  # index_put
            return self.cache.sum(0, keepdim=True) * 2

    problem = _problem(1.0)
    assert all(u.write_back_bytes == 32 * 4 for u, _ in _pairs(problem))
    torch.manual_seed(0)
    model = nn.Sequential(Indexed()).eval()
    reference = nn.Sequential(Indexed()).eval()
    reference.load_state_dict(model.state_dict())

    class Call(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return self.inner[0](x, position) + 1

    inputs = [(torch.randn(1, 32), torch.tensor([k])) for k in range(3)]
    with pytest.raises(planner.BudgetTooSmall) as smallest:
        planner.plan(Call(model), 1, inputs[0], profile="cpu")
    pm = planner.plan(Call(model), smallest.value.min_budget, inputs[0], profile="cpu")
    try:
        assert "rt.write_now('inner.0.cache', 'disk', " in pm.code
        with torch.no_grad():
            for args in inputs:
                assert torch.equal(pm(*args), Call(reference)(*args))
        assert torch.equal(pm.state_tensor("inner.0.cache"), reference[0].cache)
    finally:
        pm.close()


class _ReadBeforeItsUpdate(nn.Module):
    """A cache read (``x2``) before its in-place update and again after it: a
    recompute of ``x2`` later on would read the cache from memory its update has
    taken over."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.randn(4, 64, 512))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        doubled = self.cache * 2.0
        self.cache.index_copy_(1, pos, x)
        tripled = (self.cache * 3.0).sum(1)
        return doubled.sum(1) + tripled


@pytest.mark.parametrize("share", [0.25, 0.75])
def test_no_recompute_reads_a_buffer_after_its_update_took_over_its_memory(
    share: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The model took a recompute's read of the cache after its update as held by
    the cache's device home; the validator rejected the solver's plan ("recipe of
    'mul' reads 'cache', which is not resident") and a baseline ran instead."""
    torch.manual_seed(0)
    inputs = (torch.randn(4, 1, 512), torch.tensor([3]))
    analysis = planner.analyze(_ReadBeforeItsUpdate(), inputs, profile="cpu")
    problem = _smallest(from_program(analysis.program, 0, analysis.profile))
    roomy = keep_all_peak(problem)
    assert problem.budget_bytes < roomy, "nothing to plan: the test proves nothing"
    budget = problem.budget_bytes + int(share * (roomy - problem.budget_bytes))
    problem = dataclasses.replace(problem, budget_bytes=budget)
    cands = build_candidates(problem)
    (update, cache) = _pairs(problem)[0]
    taken = next(s.index for s in problem.steps if s.reuse == (cache.index, update.index))
    assert taken + 1 < problem.num_steps, "nothing runs after the update: nothing to test"
    assert holder_gap(cands, cache.index, taken + 1) is None
    for gap in cands.gaps:
        for option in gap.options:
            assert all(r != cache.index or step <= taken for r, step in option.needs)
    with caplog.at_level("WARNING", logger="planner.solver.solve"):
        plan = solve(problem, time_limit=5)
    assert "rejected by the validator" not in caplog.text
    assert plan.solver.name == "cp-sat", plan.solver


def test_the_validator_refuses_to_read_a_buffer_again_after_its_update_took_its_memory() -> None:
    """A saved plan that fetched the cache from its disk home again after its
    update, to recompute ``doubled`` from it, validated; the executor read the
    updated rows there (written over the home at the op) and the output was 9.4
    off eager's."""
    torch.manual_seed(0)
    inputs = (torch.randn(4, 1, 512), torch.tensor([3]))
    analysis = planner.analyze(_ReadBeforeItsUpdate(), inputs, profile="cpu")
    problem = from_program(analysis.program, 10**9, analysis.profile)
    (update, cache) = _pairs(problem)[0]
    doubled = next(
        t for t in problem.tensors if cache.index in (t.recompute.inputs if t.recompute else ())
    )
    taken = next(s.index for s in problem.steps if s.reuse == (cache.index, update.index))
    last = doubled.uses[-1]
    assert last > taken, "nothing reads doubled after the update: the test proves nothing"
    plan = solve(problem, time_limit=5)
    tensors = [
        dataclasses.replace(d, home="disk") if d.name == cache.name else d for d in plan.tensors
    ]

    def actions(refetch: bool) -> list[Action]:
        listed = [
            Action(0, "before", "prefetch", cache.name, "disk"),
            Action(0, "before", "wait", cache.name),
            Action(doubled.appears_at, "after", "free", doubled.name),
            Action(update.uses[-1], "after", "deliver", update.name, "disk"),
        ]
        if refetch:
            listed += [
                Action(last, "before", "prefetch", cache.name, "disk"),
                Action(last, "before", "wait", cache.name),
            ]
        listed.append(Action(last, "before", "recompute", doubled.name))
        if refetch:
            listed.append(Action(last, "before", "free", cache.name))
        return listed + plan.actions

    with pytest.raises(InvalidPlan, match="'cache' was overwritten by 'index_copy'"):
        validate(problem, dataclasses.replace(plan, tensors=tensors, actions=actions(True)))
    with pytest.raises(InvalidPlan, match="reads 'cache', which is not resident"):
        validate(problem, dataclasses.replace(plan, tensors=tensors, actions=actions(False)))


class _SlicedCacheReadBeforeItsUpdate(nn.Module):
    """``k`` and ``v`` sliced from one storage (so pinned), ``k`` read before its
    in-place update and that reading kept to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(256, 256) for _ in range(6)])
        both = torch.randn(2, 256, 256)
        self.register_buffer("k", both[0])
        self.register_buffer("v", both[1])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.k) * 2
        h = self.layers[0](x).detach()
        self.k.index_copy_(0, pos, h)
        for layer in self.layers[1:]:
            h = torch.relu(layer(h) @ self.v)
        return (h @ y).sum(0) + self.k.sum(0)


@pytest.mark.parametrize("share", ["55%", "70%"])
def test_a_pinned_buffer_is_not_read_by_a_recompute_after_its_update(share: str) -> None:
    """Pinned, the cache counted as held at every step, so recomputes of ``y``
    after the update were offered; the memory-minimizing plan chose one and
    planning failed: "recipe of 'mul' reads 'k', which is not resident"."""
    torch.manual_seed(0)
    x, pos = torch.randn(8, 256), torch.arange(8)
    model = _SlicedCacheReadBeforeItsUpdate().eval()
    reference = _SlicedCacheReadBeforeItsUpdate().eval()
    reference.load_state_dict(model.state_dict())
    pm = planner.plan(model, share, (x, pos), profile="cpu", time_limit=5)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(pm(x, pos), reference(x, pos))


def test_a_cache_in_the_tier_is_restored_as_one_in_memory_is() -> None:
    """restore_state_tensor copies into what the tier holds, as into a tensor in
    memory (converted, broadcast, laid out as before). It wrote the value as
    given: a transposed one was read back with its strides (the next call 9e-8
    from eager's), another shape broke every later call. Unknown names and
    shapes that cannot be copied are errors that say what is held."""
    torch.manual_seed(0)
    model = TwoCaches().eval()
    inputs = (torch.randn(1, 32), torch.tensor([3]))
    smallest = _smallest(_problem(1.0))
    pm = planner.plan(model, smallest.budget_bytes, inputs, profile="cpu", time_limit=5)
    name = "layers.0.cache"
    assert name in pm._tier_buffers, "the cache is in memory: proves nothing"
    value = torch.randn(32, 2048).t()  # (2048, 32), transposed
    pm.restore_state_tensor(name, value)
    held = pm.state_tensor(name)
    assert torch.equal(held, value) and held.is_contiguous()
    pm.restore_state_tensor(name, torch.zeros((), dtype=torch.float64))  # broadcast
    assert not pm.state_tensor(name).any() and pm.state_tensor(name).dtype == torch.float32
    with pytest.raises(planner.PlannerError, match=r"cannot restore 'layers\.0\.cache'"):
        pm.restore_state_tensor(name, torch.zeros(3))
    with pytest.raises(planner.PlannerError, match=r"'nope' is not state this module holds"):
        pm.state_tensor("nope")
    pm.close()
