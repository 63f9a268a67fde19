"""The plan validator on hand-built problems: exact peaks and times worked out by
hand, one test per kind of violation, and a property over random DAGs whose peak
is summed independently here."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.errors import InvalidPlan
from planner.solver.plan import Action, Plan, SolverStats, TensorDecision
from planner.solver.problem import (
    DISK,
    HOST,
    Bandwidths,
    Problem,
    Recompute,
    Step,
    Tensor,
    quantize_scratch_bytes,
    quantized_bytes,
)
from planner.solver.validate import itemsize, validate

BW = Bandwidths(
    disk_read=50.0, disk_write=100.0, host_to_device=200.0, device_to_host=200.0, memory=1000.0
)


def T(
    index: int,
    name: str,
    nbytes: int,
    appears_at: int,
    by_op: bool,
    uses: tuple[int, ...],
    kind: str = "activation",
    dtype: str = "float32",
    **kw: Any,
) -> Tensor:
    return Tensor(index, name, nbytes, kind, dtype, appears_at, by_op, uses, **kw)


def make_problem(steps: list[Step], tensors: list[Tensor], budget: int, **kw: Any) -> Problem:
    return Problem("infer", steps, tensors, budget, kw.pop("bandwidths", BW), **kw)


def make_plan(
    problem: Problem, actions: list[Action], homes: dict[str, str] | None = None, **kw: object
) -> Plan:
    """A Plan for ``problem``; every tensor's home is "device" unless ``homes`` says."""
    homes = homes or {}
    decisions = [
        TensorDecision(
            t.name,
            t.nbytes,
            t.kind,
            homes.get(t.name, "device"),
            "keep",
            (t.appears_at, t.last_step(problem.num_steps)),
        )
        for t in problem.tensors
    ]
    fields: dict = dict(
        mode=problem.mode,
        budget_bytes=problem.budget_bytes,
        fingerprint=problem.fingerprint(),
        tensors=decisions,
        actions=actions,
        predicted_peak_bytes=0,
        estimated_seconds=0.0,
        unplanned_peak_bytes=0,
        unplanned_estimated_seconds=0.0,
        solver=SolverStats(name="hand", status="hand", seconds=0.0),
    )
    fields.update(kw)
    return Plan(**fields)


def A(step: int, when: str, kind: str, tensor: str, tier: str | None = None) -> Action:
    return Action(step, when, kind, tensor, tier)


# -- valid plans, computed by hand ------------------------------------------------


def test_keep_all_chain_exact_peak_and_time() -> None:
    steps = [Step(0, "s0", 1.0), Step(1, "s1", 2.0, workspace_bytes=5), Step(2, "s2", 0.5)]
    tensors = [
        T(0, "w", 10, 0, False, (0,), kind="param", persistent=True),
        T(1, "x", 20, 0, False, (0,), kind="input", pinned=True),
        T(2, "a", 30, 0, True, (1,)),
        T(3, "b", 40, 1, True, (2,)),
        T(4, "y", 8, 2, True, (), until_end=True),
    ]
    p = make_problem(steps, tensors, budget=85)
    plan = make_plan(
        p, [A(0, "after", "free", "x"), A(1, "after", "free", "a"), A(2, "after", "free", "b")]
    )
    r = validate(p, plan)
    # w+x=30, +a -> 60 | free x 40, +b+ws -> 85 | free a 50, +y -> 58
    assert r.resident_bytes == [60, 85, 58]
    assert (r.peak_bytes, r.peak_step) == (85, 1)
    assert r.seconds == r.compute_seconds == pytest.approx(3.5)
    assert r.stall_seconds == r.recompute_seconds == 0.0
    assert sum(r.bytes_moved.values()) == 0
    tight = make_problem(steps, tensors, budget=84)
    with pytest.raises(InvalidPlan, match=r"step 1, op 's1'.*'b'"):
        validate(tight, make_plan(tight, plan.actions))


def _skip_problem(budget: int = 150) -> Problem:
    """A chain h0..h5 with a 100-byte skip tensor ``a`` made at step 0, read at 5."""
    steps = [Step(i, f"s{i}", 1.0) for i in range(6)]
    tensors = [T(0, "x", 10, 0, False, (0,), kind="input"), T(1, "a", 100, 0, True, (5,))]
    for i in range(6):
        uses = (i + 1,) if i < 5 else ()
        tensors.append(T(2 + i, f"h{i}", 10, i, True, uses, until_end=i == 5))
    return make_problem(steps, tensors, budget)


def _skip_plan(p: Problem, prefetch_at: tuple[int, str]) -> Plan:
    actions = [
        A(0, "after", "free", "x"),
        A(0, "after", "offload", "a", DISK),
        A(1, "after", "wait", "a"),
        A(1, "after", "free", "a"),
        A(*prefetch_at, "prefetch", "a", DISK),
        A(5, "before", "wait", "a"),
        A(5, "after", "free", "a"),
    ]
    actions += [A(i + 1, "after", "free", f"h{i}") for i in range(5)]
    return make_plan(p, sorted(actions, key=lambda a: (a.step, a.when == "after")))


@pytest.mark.parametrize(
    "prefetch_at, stall",
    [
        ((2, "after"), 0.0),  # issued at t=3, 100 B at 50 B/s ends at 5 = when step 5 starts
        ((3, "after"), 1.0),  # issued at t=4, ends at 6: one second late
        ((5, "before"), 2.0),
    ],  # issued when needed: the whole copy stalls
)
def test_offload_and_prefetch_stall_follows_bandwidth(
    prefetch_at: tuple[int, str], stall: float
) -> None:
    p = _skip_problem()
    r = validate(p, _skip_plan(p, prefetch_at))
    # The offload (issued at t=1, 100 B at 100 B/s) ends at t=2, when it is waited on.
    assert r.stall_seconds == pytest.approx(stall)
    assert r.seconds == pytest.approx(6.0 + stall)
    assert r.compute_seconds == pytest.approx(6.0)
    assert r.bytes_moved == {
        "disk_read": 100,
        "disk_write": 100,
        "host_to_device": 0,
        "device_to_host": 0,
    }
    assert (r.peak_bytes, r.peak_step) == (120, 0)  # x+a+h0, then a+h4+h5 at step 5
    assert r.resident_bytes[1] == 120  # a and h0 plus h1


def test_resident_bytes_split_into_ops_and_the_moments_between() -> None:
    """While an op runs vs at memory steps (a compiled run of ops covers the
    former only, planner.codegen.segments.composed_levels): the prefetch of
    ``a`` after step 2 brings 120 bytes where step 2's op held 20."""
    p = _skip_problem()
    r = validate(p, _skip_plan(p, (2, "after")))
    assert r.op_bytes == [120, 120, 20, 120, 120, 120]
    assert r.between_ops_bytes == [10, 0, 120, 0, 0, 0]  # x alone at the start
    assert r.resident_bytes == [max(pair) for pair in zip(r.op_bytes, r.between_ops_bytes)]


def test_transfers_on_one_channel_queue_fifo() -> None:
    p = _skip_problem()
    # A second offload of a on the same channel queues behind the first: ends at 3.
    plan = _skip_plan(p, (2, "after"))
    actions = list(plan.actions)
    actions.insert(2, A(0, "after", "offload", "a", DISK))
    r = validate(p, make_plan(p, actions))
    assert r.stall_seconds == pytest.approx(1.0)  # the wait after step 1 (t=2) lasts to 3
    assert r.bytes_moved["disk_write"] == 200


def test_recompute_plan() -> None:
    steps = [Step(i, f"s{i}", 1.0) for i in range(4)]
    tensors = [
        T(0, "w", 20, 0, False, (0,), kind="param", persistent=True),
        T(1, "a", 50, 0, True, (1, 3), recompute=Recompute(0, (0,), 1.5, extra_bytes=7)),
        T(2, "b", 10, 1, True, (2,)),
        T(3, "c", 10, 2, True, (3,)),
        T(4, "y", 10, 3, True, (), until_end=True),
    ]
    p = make_problem(steps, tensors, budget=97)
    actions = [
        A(1, "after", "free", "a"),
        A(2, "after", "free", "b"),
        A(3, "before", "recompute", "a"),
        A(3, "after", "free", "a"),
        A(3, "after", "free", "c"),
    ]
    r = validate(p, make_plan(p, actions))
    # step 3: w20 + c10 + a50 + extra7 = 87 while recomputing, then +y10 = 90 in the op
    assert r.resident_bytes == [70, 80, 40, 90]
    assert r.recompute_seconds == pytest.approx(1.5)
    assert r.seconds == pytest.approx(5.5)
    with pytest.raises(InvalidPlan, match=r"step 3, before action #2 recompute 'a'"):
        q = make_problem(steps, tensors, budget=86)
        validate(q, make_plan(q, actions))


def _fetched_weight_problem(bandwidths: Bandwidths = BW) -> Problem:
    """w (home disk) is read once, for step 1."""
    steps = [Step(0, "s0", 1.0), Step(1, "s1", 1.0)]
    tensors = [
        T(0, "x", 10, 0, False, (0,), kind="input"),
        T(1, "w", 100, 0, False, (1,), kind="param", persistent=True),
        T(2, "h", 10, 0, True, (1,)),
        T(3, "y", 10, 1, True, (), until_end=True),
    ]
    return make_problem(steps, tensors, budget=130, bandwidths=bandwidths)


FETCH_W = [
    A(0, "before", "prefetch", "w", DISK),
    A(0, "after", "free", "x"),
    A(1, "before", "wait", "w"),
    A(1, "after", "free", "w"),
    A(1, "after", "free", "h"),
]


def test_fetched_weight_home_disk() -> None:
    p = _fetched_weight_problem()
    r = validate(p, make_plan(p, FETCH_W, homes={"w": DISK}))
    # w is not resident at the start; its 2 s read overlaps step 0 and stalls 1 s.
    assert r.resident_bytes == [120, 120]
    assert r.stall_seconds == pytest.approx(1.0) and r.seconds == pytest.approx(3.0)
    assert r.bytes_moved["disk_read"] == 100


def test_quantize_and_dequantize_time_and_bytes() -> None:
    steps = [Step(i, f"s{i}", 1.0) for i in range(3)]
    tensors = [
        T(0, "a", 400, 0, True, (2,), quantizable=True),
        T(1, "y", 4, 2, True, (), until_end=True),
    ]
    p = make_problem(steps, tensors, budget=4000, quantize="int8")
    q = quantized_bytes(400, 4, "int8")
    assert q == 100 + 2 * 4  # 100 codes + two fp32 scales (groups of 64)
    scratch = quantize_scratch_bytes(400, 4)  # the blocked kernels' temporaries
    assert scratch == 20 * 128 + 256  # 100 elements: two groups of 64
    actions = [
        A(0, "after", "quantize", "a", "int8"),
        A(2, "before", "dequantize", "a"),
        A(2, "after", "free", "a"),
    ]
    r = validate(p, make_plan(p, actions))
    assert r.resident_bytes == [400 + q + scratch, q, 400 + q + scratch]
    assert r.peak_bytes == 400 + q + scratch
    with pytest.raises(InvalidPlan, match="exceeds the budget"):
        tight = dataclasses.replace(p, budget_bytes=400 + q + scratch - 1)
        validate(tight, make_plan(tight, actions))
    assert r.quantize_seconds == pytest.approx(2 * (400 + q) / 1000.0)
    assert r.seconds == pytest.approx(3.0 + r.quantize_seconds)


def _stored_weight_problem(budget: int) -> Problem:
    """w (6400 B fp32) is read by a fused op at step 1 and a plain op at step 3."""
    steps = [Step(i, f"s{i}", 1.0) for i in range(4)]
    tensors = [
        T(0, "x", 40, 0, False, (1,), kind="input"),
        T(
            1,
            "w",
            6400,
            0,
            False,
            (1, 3),
            kind="param",
            persistent=True,
            quantizable=True,
            fused_uses=((1, 300),),
        ),
        T(2, "h", 40, 1, True, (3,)),
        T(3, "y", 40, 3, True, (), until_end=True),
    ]
    return make_problem(steps, tensors, budget=budget, quantize="int8")


STORED_ACTIONS = [
    A(1, "after", "free", "x"),
    A(3, "before", "dequantize", "w"),
    A(3, "after", "free", "w"),
    A(3, "after", "free", "h"),
]


def test_weight_stored_quantized_fused_and_dequantized_uses() -> None:
    p = _stored_weight_problem(budget=100_000)
    q = quantized_bytes(6400, 4, "int8")
    scratch = quantize_scratch_bytes(6400, 4)
    r = validate(p, make_plan(p, STORED_ACTIONS, homes={"w": "device:int8"}))
    # the codes stay for the whole run; step 1 reads them (fused: 300 B scratch, no
    # full copy), step 3 a full copy made just before it and freed after
    assert r.resident_bytes == [40 + q, 40 + q + 40 + 300, q + 40, q + 40 + 6400 + scratch]
    # the fused step dequantizes the whole weight block by block, the other one copy
    assert r.quantize_seconds == pytest.approx(2 * (6400 + q) / 1000.0)
    tight = dataclasses.replace(p, budget_bytes=r.peak_bytes - 1)
    with pytest.raises(InvalidPlan, match="exceeds the budget"):
        validate(tight, make_plan(tight, STORED_ACTIONS, homes={"w": "device:int8"}))


def test_dequantizing_has_its_own_price() -> None:
    """With a dequantize bandwidth of its own, the fused read and the full copy
    made before the plain use are charged at it (weights are quantized at plan
    time: nothing here is charged at the quantize price)."""
    p = _stored_weight_problem(budget=100_000)
    p = dataclasses.replace(p, bandwidths=dataclasses.replace(p.bandwidths, dequantize=4000.0))
    q = quantized_bytes(6400, 4, "int8")
    r = validate(p, make_plan(p, STORED_ACTIONS, homes={"w": "device:int8"}))
    assert r.quantize_seconds == pytest.approx(2 * (6400 + q) / 4000.0)


def test_a_fused_lookup_costs_its_rows_not_the_weight() -> None:
    """A lookup reads only the rows its ids select: the replay charges those bytes,
    where a fused matmul dequantizes the whole weight."""
    p = _stored_weight_problem(budget=100_000)
    p = dataclasses.replace(
        p,
        tensors=[
            dataclasses.replace(t, fused_lookups=((1, 500),)) if t.name == "w" else t
            for t in p.tensors
        ],
    )
    q = quantized_bytes(6400, 4, "int8")
    r = validate(p, make_plan(p, STORED_ACTIONS, homes={"w": "device:int8"}))
    assert r.quantize_seconds == pytest.approx((500 + 6400 + q) / 1000.0)


def test_weight_stored_quantized_misuse_is_caught() -> None:
    p = _stored_weight_problem(budget=100_000)
    stored = {"w": "device:int8"}
    no_dequantize = [a for a in STORED_ACTIONS if a.kind != "dequantize" and a.tensor != "w"]
    with pytest.raises(InvalidPlan, match="reads 'w', which is not resident"):
        validate(p, make_plan(p, no_dequantize, homes=stored))
    kept = [a for a in STORED_ACTIONS if not (a.kind == "free" and a.tensor == "w")]
    with pytest.raises(InvalidPlan, match="still on the device"):
        validate(p, make_plan(p, kept, homes=stored))
    with pytest.raises(InvalidPlan, match="not quantizable as 'int4'"):
        validate(p, make_plan(p, STORED_ACTIONS, homes={"w": "device:int4"}))
    unfused = dataclasses.replace(
        p, tensors=[dataclasses.replace(t, fused_uses=()) for t in p.tensors]
    )
    with pytest.raises(InvalidPlan, match="reads 'w', which is not resident"):
        validate(unfused, make_plan(unfused, STORED_ACTIONS, homes=stored))


#: w's home is disk holding it int8: its codes are read before each use; step 1
#: reads them fused, step 3 dequantizes them into a full copy first.
QFETCH_ACTIONS = [
    A(0, "before", "prefetch", "w", "disk"),
    A(1, "before", "wait", "w"),
    A(1, "after", "free", "x"),
    A(1, "after", "free", "w"),
    A(2, "before", "prefetch", "w", "disk"),
    A(3, "before", "wait", "w"),
    A(3, "before", "dequantize", "w"),
    A(3, "after", "free", "w"),
    A(3, "after", "free", "h"),
]


def test_weight_read_quantized_from_its_tier() -> None:
    p = _stored_weight_problem(budget=100_000)
    q = quantized_bytes(6400, 4, "int8")
    scratch = quantize_scratch_bytes(6400, 4)
    r = validate(p, make_plan(p, QFETCH_ACTIONS, homes={"w": "disk:int8"}))
    # only the codes travel and sit on the device between the read and the use;
    # the fused step holds no full copy, the other a full copy beside the codes
    # while it is made
    assert r.bytes_moved["disk_read"] == 2 * q
    assert r.resident_bytes == [40 + q, 40 + q + 40 + 300, 40 + q, 40 + q + 6400 + scratch]
    assert r.quantize_seconds == pytest.approx(2 * (6400 + q) / 1000.0)
    tight = dataclasses.replace(p, budget_bytes=r.peak_bytes - 1)
    with pytest.raises(InvalidPlan, match="exceeds the budget"):
        validate(tight, make_plan(tight, QFETCH_ACTIONS, homes={"w": "disk:int8"}))


def test_weight_read_quantized_misuse_is_caught() -> None:
    p = _stored_weight_problem(budget=100_000)
    home = {"w": "disk:int8"}
    no_dequantize = [a for a in QFETCH_ACTIONS if a.kind != "dequantize"]
    with pytest.raises(InvalidPlan, match="reads 'w', which is stored quantized"):
        validate(p, make_plan(p, no_dequantize, homes=home))
    early = [a for a in QFETCH_ACTIONS if not (a.kind == "wait" and a.step == 1)]
    early.insert(2, A(1, "after", "wait", "w"))  # the fused op ran before the codes came
    with pytest.raises(InvalidPlan, match="reads 'w', which is still waiting on its prefetch"):
        validate(p, make_plan(p, early, homes=home))
    with pytest.raises(InvalidPlan, match="not quantizable as 'int4'"):
        validate(p, make_plan(p, QFETCH_ACTIONS, homes={"w": "disk:int4"}))
    unfused = dataclasses.replace(
        p, tensors=[dataclasses.replace(t, fused_uses=()) for t in p.tensors]
    )
    with pytest.raises(InvalidPlan, match="reads 'w', which is stored quantized"):
        validate(unfused, make_plan(unfused, QFETCH_ACTIONS, homes=home))


def test_itemsize() -> None:
    assert [itemsize(d) for d in ("float32", "torch.bfloat16", "int64", "bool")] == [4, 2, 8, 1]


# -- one test per violation ---------------------------------------------------------
#
# The base problem: v (device weight) and x feed s0 -> a (100 B, recomputable from
# v); w (a disk-homed weight) feeds s1 -> b; a, b feed s2 -> c; the tangent g
# arrives at step 2; g, c feed s3 -> y (returned). The base plan offloads a to
# disk around step 1 and fetches w for step 1. Its peak is 175 B at step 1.


def _base_problem(budget: int = 200) -> Problem:
    steps = [
        Step(0, "s0", 1.0),
        Step(1, "s1", 1.0, workspace_bytes=5),
        Step(2, "s2", 1.0),
        Step(3, "s3", 1.0),
    ]
    tensors = [
        T(0, "w", 40, 0, False, (1,), kind="param", persistent=True, quantizable=True),
        T(1, "v", 20, 0, False, (0,), kind="param", persistent=True),
        T(2, "x", 10, 0, False, (0,), kind="input", pinned=True),
        T(
            3,
            "a",
            100,
            0,
            True,
            (2,),
            recompute=Recompute(0, (1,), 1.0, extra_bytes=140),
            quantizable=True,
        ),
        T(4, "b", 10, 1, True, (2,)),
        T(5, "g", 10, 2, False, (3,), kind="tangent", pinned=True),
        T(6, "c", 10, 2, True, (3,), recompute=Recompute(2, (3, 4), 1.0)),
        T(7, "y", 10, 3, True, (), until_end=True),
    ]
    return make_problem(steps, tensors, budget, tiers=(HOST, DISK), quantize="int8")


BASE = [
    A(0, "after", "free", "x"),
    A(0, "after", "offload", "a", DISK),
    A(1, "before", "prefetch", "w", DISK),
    A(1, "before", "wait", "w"),
    A(1, "after", "free", "w"),
    A(1, "after", "wait", "a"),
    A(1, "after", "free", "a"),
    A(2, "before", "prefetch", "a", DISK),
    A(2, "before", "wait", "a"),
    A(2, "after", "free", "a"),
    A(2, "after", "free", "b"),
    A(3, "after", "free", "g"),
    A(3, "after", "free", "c"),
]


def _without(*drop: tuple[int, str, str]) -> list[Action]:
    return [a for a in BASE if (a.step, a.kind, a.tensor) not in drop]


def test_base_plan_is_valid() -> None:
    p = _base_problem(budget=175)
    r = validate(p, make_plan(p, BASE, homes={"w": DISK}))
    assert r.resident_bytes == [130, 175, 150, 50]
    assert (r.peak_bytes, r.peak_step) == (175, 1)
    # w: 40 B at 50 B/s issued at t=1 -> stall 0.8; a's read issued at t=2 -> 2 s stall
    assert r.stall_seconds == pytest.approx(2.8)


def test_valid_recompute_and_quantize_variants_of_base() -> None:
    recompute = _without((2, "prefetch", "a"), (2, "wait", "a"))
    recompute.insert(7, A(2, "before", "recompute", "a"))
    validate(p := _base_problem(280), make_plan(p, recompute, homes={"w": DISK}))
    quant = [a for a in BASE if a.tensor != "a"] + [
        A(0, "after", "quantize", "a", "int8"),
        A(2, "before", "dequantize", "a"),
        A(2, "after", "free", "a"),
    ]
    # the quantize briefly holds both copies and the kernels' scratch
    budget = 175 + quantize_scratch_bytes(100, 4)
    validate(p := _base_problem(budget), make_plan(p, quant, homes={"w": DISK}))


NO_PREFETCH_A = _without((2, "prefetch", "a"), (2, "wait", "a"))
NO_A = [a for a in BASE if a.tensor != "a"]
QUANTIZE_A = A(0, "after", "quantize", "a", "int8")
A_SCRATCH = quantize_scratch_bytes(100, 4)  # (de)quantizing a: the kernels' temporaries

# case: (actions, step and tensor the message must name, words in it, budget).
# Actions of one (step, when) run in list order; their place among other steps' is moot.
VIOLATIONS: dict[str, tuple[Any, ...]] = {
    "read not resident": (NO_PREFETCH_A, 2, "a", "op 's2': reads 'a', which is not resident"),
    "read before wait": (_without((2, "wait", "a")), 2, "a", "still waiting on its prefetch"),
    "read quantized": (
        NO_A + [QUANTIZE_A, A(2, "after", "free", "a")],
        2,
        "a",
        "quantized",
        200 + A_SCRATCH,
    ),
    "prefetch no copy": (_without((0, "offload", "a"), (1, "wait", "a")), 2, "a", "disk holds"),
    "prefetch wrong tier": ([A(0, "after", "prefetch", "w", HOST)] + BASE, 0, "w", "host holds no"),
    "prefetch resident": ([A(1, "before", "prefetch", "v", DISK)] + BASE, 1, "v", "already"),
    "offload non-resident": (BASE + [A(1, "after", "offload", "x", DISK)], 1, "x", "not resident"),
    "quantize non-resident": (BASE + [A(2, "after", "quantize", "a", "int8")], 2, "a", "not res"),
    "quantize wrong format": (BASE + [A(0, "after", "quantize", "a", "int4")], 0, "a", "int4"),
    "free while offload pending": ([BASE[1], A(0, "after", "free", "a")] + BASE, 0, "a", "pending"),
    "free non-resident": (BASE + [A(2, "after", "free", "x")], 2, "x", "not resident"),
    "free pinned early": ([A(2, "after", "free", "g")] + BASE, 2, "g", "pinned"),
    "wait nothing pending": (BASE + [A(3, "before", "wait", "c")], 3, "c", "nothing is pending"),
    "recompute input missing": (
        BASE + [A(2, "after", "free", "c"), A(3, "before", "recompute", "c")],
        3,
        "c",
        "reads 'a', which is not resident",
    ),
    "recompute no recipe": (BASE + [A(3, "before", "recompute", "b")], 3, "b", "no recompute"),
    "recompute resident": ([A(0, "after", "recompute", "a")] + BASE, 0, "a", "already"),
    "recompute before producer": ([A(0, "before", "recompute", "a")] + BASE, 0, "a", "producer"),
    "unknown tensor": (BASE + [A(1, "after", "free", "zz")], 1, "zz", "unknown tensor"),
    "unknown tier": ([A(0, "after", "offload", "a", "nvme")] + BASE, 0, "a", "unknown tier"),
    "returned freed": (BASE + [A(3, "after", "free", "y")], 3, "y", "returned to the caller"),
    "fetched weight kept": (_without((1, "free", "w")), 3, "w", "still on the device"),
    "device weight freed": (BASE + [A(0, "after", "free", "v")], 3, "v", "must end resident"),
    "transfer pending at end": (BASE + [A(3, "after", "offload", "y", DISK)], 3, "y", "pending"),
    "budget at prefetch": (
        [A(0, "after", "prefetch", "w", DISK)] + _without((1, "prefetch", "w")),
        0,
        "w",
        "exceeds the budget",
        165,
    ),
    "budget at op": (BASE, 1, "b", "over the budget", 174),
    "budget at recompute": (NO_PREFETCH_A + [A(2, "before", "recompute", "a")], 2, "a", "budget"),
    "budget at dequantize": (
        NO_A + [QUANTIZE_A, A(2, "before", "dequantize", "a"), A(2, "after", "free", "a")],
        2,
        "a",
        "exceeds the budget",
        160 + A_SCRATCH,
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_violation_is_reported(case: str) -> None:
    actions, step, tensor, words, *budget = VIOLATIONS[case]
    p = _base_problem(*budget)
    with pytest.raises(InvalidPlan) as info:
        validate(p, make_plan(p, actions, homes={"w": DISK}))
    msg = str(info.value)
    assert f"step {step}," in msg and repr(tensor) in msg and words in msg, msg


def test_plan_for_another_graph_or_budget() -> None:
    p = _base_problem()
    with pytest.raises(InvalidPlan, match="fingerprint"):
        validate(p, make_plan(p, BASE, homes={"w": DISK}, fingerprint="0" * 16))
    with pytest.raises(InvalidPlan, match="budget 199"):
        validate(p, make_plan(p, BASE, homes={"w": DISK}, budget_bytes=199))


def test_action_outside_the_steps_and_missing_home() -> None:
    p = _base_problem()
    with pytest.raises(InvalidPlan, match="step 9 is outside"):
        validate(p, make_plan(p, BASE + [A(9, "after", "free", "a")], homes={"w": DISK}))
    plan = make_plan(p, BASE, homes={"w": DISK})
    plan.tensors = [d for d in plan.tensors if d.name != "w"]
    with pytest.raises(InvalidPlan, match="'w' has no decision"):
        validate(p, plan)


# -- properties and speed ----------------------------------------------------------


@st.composite
def keep_all_cases(draw: st.DrawFn) -> tuple[Problem, list[Action], int]:
    """A random DAG, a keep-all plan freeing each tensor after its last use, and
    the peak summed here: max over steps of the bytes live there plus workspace."""
    n = draw(st.integers(1, 10))
    steps = [Step(t, f"s{t}", draw(st.floats(0, 2)), draw(st.integers(0, 16))) for t in range(n)]
    # (name, appears_at, by_op, persistent): a few weights, inputs and tangents, then
    # one output per step.
    specs = []
    for k in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["param", "input", "tangent"]))
        at = draw(st.integers(1, n - 1)) if kind == "tangent" and n > 1 else 0
        specs.append((f"{kind}{k}", at, False, kind == "param"))
    specs += [(f"o{t}", t, True, False) for t in range(n)]
    tensors = []
    for i, (name, at, by_op, persistent) in enumerate(specs):
        first = at + 1 if by_op else at  # an op output is read only by later ops
        uses = draw(st.sets(st.integers(first, n - 1), max_size=3)) if first < n else set()
        returned = by_op and (at == n - 1 or draw(st.booleans()))
        kind = "param" if persistent else "activation"
        nbytes = draw(st.integers(0, 64))
        tensors.append(
            T(
                i,
                name,
                nbytes,
                at,
                by_op,
                tuple(sorted(uses)),
                kind=kind,
                persistent=persistent,
                until_end=returned,
            )
        )
    actions, live = [], [0] * n
    for t in tensors:
        kept = t.persistent or t.until_end
        end = n - 1 if kept else t.last_step(n)
        if not kept:
            actions.append(A(end, "after", "free", t.name))
        for s in range(t.appears_at, end + 1):
            live[s] += t.nbytes
    peak = max(live[s] + steps[s].workspace_bytes for s in range(n))
    problem = make_problem(steps, tensors, budget=peak)
    return problem, actions, peak


@settings(max_examples=150, deadline=None)
@given(keep_all_cases())
def test_random_keep_all_plans_validate_with_the_summed_peak(
    case: tuple[Problem, list[Action], int],
) -> None:
    problem, actions, peak = case
    r = validate(problem, make_plan(problem, actions))
    assert r.peak_bytes == peak == max(r.resident_bytes)
    assert r.stall_seconds == 0.0
    assert r.seconds == pytest.approx(sum(s.seconds for s in problem.steps))
    if peak > 0:  # one byte less and the same plan must be refused
        tight = make_problem(problem.steps, problem.tensors, budget=peak - 1)
        with pytest.raises(InvalidPlan, match="budget"):
            validate(tight, make_plan(tight, actions))


def test_5000_steps_validate_fast() -> None:
    """A chain whose every step also makes a skip tensor read 4 steps later,
    offloaded and prefetched back: 5000 steps, ~30000 actions."""
    n = 5000
    steps = [Step(t, f"s{t}", 1e-3) for t in range(n)]
    tensors, actions = [], []
    for t in range(n):
        tensors.append(
            T(2 * t, f"h{t}", 10, t, True, (t + 1,) if t < n - 1 else (), until_end=t == n - 1)
        )
        skip = (t + 4,) if t + 4 < n else ()
        tensors.append(T(2 * t + 1, f"k{t}", 1000, t, True, skip))
        if t < n - 1:
            actions.append(A(t + 1, "after", "free", f"h{t}"))
        if skip:
            actions += [
                A(t, "after", "offload", f"k{t}", DISK),
                A(t + 1, "after", "wait", f"k{t}"),
                A(t + 1, "after", "free", f"k{t}"),
                A(t + 2, "after", "prefetch", f"k{t}", DISK),
                A(t + 4, "before", "wait", f"k{t}"),
                A(t + 4, "after", "free", f"k{t}"),
            ]
        else:
            actions.append(A(t, "after", "free", f"k{t}"))
    fast = Bandwidths(disk_read=1e9, disk_write=1e9)
    p = make_problem(steps, tensors, budget=10_000, bandwidths=fast)
    plan = make_plan(p, actions)
    elapsed = float("inf")
    for _ in range(2):  # best of two, so a busy machine does not fail it
        start = time.perf_counter()
        r = validate(p, plan)
        elapsed = min(elapsed, time.perf_counter() - start)
    assert len(actions) > 20_000 and r.stall_seconds == 0.0
    assert elapsed < 1.0, f"validate took {elapsed:.2f}s"


def test_disk_copies_pay_a_fixed_latency() -> None:
    """Each disk copy costs its bytes at the bandwidth plus the store's fixed cost;
    the candidates' windows (copy_seconds) and the validator agree on it."""
    from planner.solver.candidates import transfer_load

    slow = dataclasses.replace(BW, disk_read_latency=0.5, disk_write_latency=0.25)
    assert slow.copy_seconds((DISK, "read"), 100) == pytest.approx(100 / 50 + 0.5)
    assert slow.copy_seconds((DISK, "write"), 100) == pytest.approx(100 / 100 + 0.25)
    assert slow.copy_seconds((HOST, "read"), 100) == pytest.approx(100 / 200)
    fast, p = _fetched_weight_problem(), _fetched_weight_problem(slow)
    base = validate(fast, make_plan(fast, FETCH_W, homes={"w": DISK}))
    r = validate(p, make_plan(p, FETCH_W, homes={"w": DISK}))
    assert r.stall_seconds == pytest.approx(base.stall_seconds + 0.5)
    from planner.solver.candidates import Transfer

    _, uncovered = transfer_load(p, Transfer((DISK, "read"), 100, (0, 0)))
    assert uncovered == pytest.approx(2.5 - 1.0)


def test_a_copy_costs_the_cpu_its_work_not_the_disk_wait() -> None:
    """On a CPU device a read takes its fixed cost plus a memcpy of its bytes from
    the ops (the disk's time is the channel's, a stall if nothing hides it); a
    write takes its channel time. The validator charges the same."""
    cpu = dataclasses.replace(
        BW, disk_read_latency=0.5, disk_write_latency=0.25, copy_compute_share=1.0
    )
    assert cpu.copy_compute_seconds((DISK, "read"), 100) == pytest.approx(0.5 + 100 / 1000)
    assert cpu.copy_compute_seconds((DISK, "write"), 100) == pytest.approx(100 / 100 + 0.25)
    half = dataclasses.replace(cpu, copy_compute_share=0.5)
    assert half.copy_compute_seconds((DISK, "read"), 100) == pytest.approx(0.5 * (0.5 + 0.1))
    assert BW.copy_compute_seconds((DISK, "read"), 100) == 0.0  # copy engines: no share
    p = _fetched_weight_problem(cpu)
    r = validate(p, make_plan(p, FETCH_W, homes={"w": DISK}))
    assert r.copy_seconds == pytest.approx(0.5 + 100 / 1000)


def test_each_copy_costs_its_issue_whatever_its_bytes() -> None:
    """``copy_issue`` (a CUDA profile's ``copy_issue_seconds``): every copy takes
    that much compute from the thread that also launches the ops, on top of any
    share of its work; the validator charges it per copy."""
    issued = dataclasses.replace(BW, copy_issue=0.125)
    for channel in ((DISK, "read"), (DISK, "write"), (HOST, "read"), (HOST, "write")):
        assert issued.copy_compute_seconds(channel, 1) == 0.125
        assert issued.copy_compute_seconds(channel, 10**6) == 0.125
    cpu = dataclasses.replace(issued, copy_compute_share=1.0)
    assert cpu.copy_compute_seconds((DISK, "read"), 100) == pytest.approx(0.125 + 100 / 1000)
    p = _fetched_weight_problem(issued)
    r = validate(p, make_plan(p, FETCH_W, homes={"w": DISK}))
    assert r.copy_seconds == pytest.approx(0.125)  # one fetch
    plain = _fetched_weight_problem()
    base = validate(plain, make_plan(plain, FETCH_W, homes={"w": DISK}))
    # issued at step 0, it delays the ops there, which hid the read's first second:
    # the stall after shrinks by as much (the read takes its 2 s either way)
    assert r.stall_seconds == pytest.approx(base.stall_seconds - 0.125)
    assert r.seconds == pytest.approx(base.seconds)


def _gradient_problem(deliverable: bool = True) -> Problem:
    """Training in miniature: ``g`` (100 B, a parameter's gradient) is made at step
    1 and returned; steps 2-3 make ``h`` (60 B) and the returned ``y``."""
    steps = [Step(i, f"s{i}", 1.0) for i in range(4)]
    tensors = [
        T(0, "x", 10, 0, False, (0, 1, 2), kind="input"),
        T(1, "g", 100, 1, True, (), kind="grad", until_end=True, deliverable=deliverable),
        T(2, "h", 60, 2, True, (3,)),
        T(3, "y", 10, 3, True, (), until_end=True),
    ]
    return make_problem(steps, tensors, budget=200)


DELIVER_G = [A(1, "after", "deliver", "g", DISK), A(3, "after", "free", "h")]


def test_delivered_gradient_leaves_the_device_and_counts_as_returned() -> None:
    p = _gradient_problem()
    r = validate(p, make_plan(p, DELIVER_G))
    # x stays (caller's); g is there while step 1 runs, then delivered
    assert r.resident_bytes == [10, 110, 70, 80]
    assert r.peak_bytes == 110
    # one pass reading and writing 100 B at 1000 B/s on top of 4 s of compute
    assert r.seconds == pytest.approx(4.0 + 2 * 100 / 1000)
    assert r.copy_seconds == pytest.approx(2 * 100 / 1000)
    kept = validate(p, make_plan(p, [A(3, "after", "free", "h")]))
    assert kept.peak_bytes == 180  # x + g + h + y at step 3 (h freed after it)


@pytest.mark.parametrize(
    "actions, match",
    [
        ([A(0, "after", "deliver", "g", DISK)], "not resident"),
        ([A(1, "after", "deliver", "g", "moon")], "unknown tier"),
        (
            [A(1, "after", "deliver", "g", DISK), A(2, "before", "deliver", "g", DISK)],
            "delivered already",
        ),
        ([A(1, "after", "deliver", "h", DISK)], "not a parameter's gradient"),
    ],
)
def test_delivery_misuse_is_caught(actions: list[Action], match: str) -> None:
    p = _gradient_problem()
    with pytest.raises(InvalidPlan, match=match):
        validate(p, make_plan(p, actions))


def test_only_deliverable_gradients_may_be_delivered() -> None:
    p = _gradient_problem(deliverable=False)
    with pytest.raises(InvalidPlan, match="not a parameter's gradient"):
        validate(p, make_plan(p, DELIVER_G))
