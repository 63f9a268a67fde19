"""Runs of executor ops folded into TorchInductor graphs (planner.codegen.segments)."""

from __future__ import annotations

import time

import pytest
import torch

from planner.codegen import segments
from planner.codegen.segments import (
    DelLine,
    Layout,
    OpLine,
    Var,
    compilable_target,
    compile_segments,
    fold_segments,
)

aten = torch.ops.aten


def _op(out: str, value: int, target, *args) -> OpLine:  # type: ignore[no-untyped-def]
    call = ", ".join(a.name if isinstance(a, Var) else repr(a) for a in args)
    name = f"aten_{target.__name__.replace('.', '_')}"
    return OpLine([f"    {out} = {name}({call})"], target, args, {}, [(None, out, value)], True)


def _layout(value: int, storage: int | None = None) -> Layout:
    return Layout((64,), (1,), torch.float32, 0, value if storage is None else storage)


OPS = {
    "aten_mul_Tensor": aten.mul.Tensor,
    "aten_add_Tensor": aten.add.Tensor,
    "aten_tanh_default": aten.tanh.default,
}


def test_a_run_between_memory_steps_becomes_one_segment_that_frees_its_dying_input() -> None:
    lines = [
        "    # step 0: b = aten.mul.Tensor",
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        DelLine(["a"], "    del a  # free a", donatable=True),
        "    # step 1: c = aten.add.Tensor",
        _op("c", 2, aten.add.Tensor, Var("b", 1), 1.0),
        "    h = rt.prefetch('w', 'disk')",  # a memory step ends the run
        _op("d", 3, aten.tanh.default, Var("c", 2)),
    ]
    source, found = fold_segments(lines, lambda v: _layout(v))
    assert len(found) == 1
    seg = found[0]
    assert seg.steps == (0, 1) and seg.num_ops == 2
    assert seg.freed == [0] and seg.donated == [0]
    text = "\n".join(source)
    assert "segment_args = [a,]" in text
    assert "del a  # segment_0 frees them after their last use" in text
    assert "b, c = segment_0(segment_args)" in text
    # the op after the memory step is alone: it stays an eager call
    assert text.endswith("d = aten_tanh_default(c)")
    assert text.index("rt.prefetch") > text.index("segment_0(")


def test_without_a_layout_every_op_stays_eager() -> None:
    lines = [
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        _op("c", 2, aten.add.Tensor, Var("b", 1), 1.0),
    ]
    source, found = fold_segments(lines, None)
    assert found == [] and source == [
        "    b = aten_mul_Tensor(a, 2.0)",
        "    c = aten_add_Tensor(b, 1.0)",
    ]


def test_two_views_of_one_storage_are_never_donated() -> None:
    """Inductor writes a donated input in place; another input viewing the same
    buffer would read the overwritten values."""
    lines = [
        _op("c", 2, aten.mul.Tensor, Var("a", 0), Var("a_t", 1)),
        _op("d", 3, aten.add.Tensor, Var("c", 2), 1.0),
        DelLine(["a", "a_t"], "    del a, a_t  # free a", donatable=True),
    ]
    _, found = fold_segments(lines, lambda v: _layout(v, storage=0))
    assert found[0].freed == [0, 1] and found[0].donated == []


def test_a_dead_op_is_dropped_and_its_input_freed_before_the_call() -> None:
    """An input only a dropped op read would be held by the compiled graph to
    its end; the eager run frees it at once."""
    lines = [
        _op("x", 5, aten.tanh.default, Var("r", 4)),
        DelLine(["r", "x"], "    del r, x  # free r", donatable=True),
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        _op("c", 2, aten.add.Tensor, Var("b", 1), 1.0),
    ]
    source, found = fold_segments(lines, lambda v: _layout(v))
    text = "\n".join(source)
    assert "del r  # freed within the run, not read by it" in text
    assert "segment_args = [a,]" in text
    assert found[0].num_ops == 2 and "aten_tanh" not in found[0].eager_source


def test_a_step_whose_op_waits_for_a_read_made_at_once_belongs_to_the_next_run() -> None:
    """Step 0's comment, then a read made at once before its op, then the op: the
    run that makes the op owns step 0 (its level is held to step 0's), and the
    read stays before the run. An op that stays eager keeps its own comment, and
    the run of the ops after it in its step is held to that step's level."""
    lines = [
        "    # step 0: b = aten.mul.Tensor",
        "    w = rt.read_now('w', 'disk')  # from disk, a small copy, made at once",
        _op("b", 1, aten.mul.Tensor, Var("w", 0), 2.0),
        "    # step 1: c = aten.add.Tensor",
        _op("c", 2, aten.add.Tensor, Var("b", 1), 1.0),
        "    # step 2: d = aten.native_dropout.default",
        OpLine(
            ["    d = drop(c)"],
            aten.native_dropout.default,
            (Var("c", 2), 0.5, True),
            {},
            [(None, "d", 3)],
            False,
        ),  # fmt: skip
        _op("e", 4, aten.tanh.default, Var("d", 3)),
        _op("f", 5, aten.tanh.default, Var("e", 4)),
    ]
    source, found = fold_segments(lines, lambda v: _layout(v))
    assert [s.steps for s in found] == [(0, 1), (2, 2)]
    text = "\n".join(source)
    assert text.index("rt.read_now") < text.index("# step 0:") < text.index("segment_0(")
    assert text.index("# step 2:") < text.index("d = drop(c)")


def test_random_ops_are_not_compiled() -> None:
    assert compilable_target(aten.mul.Tensor)
    assert not compilable_target(aten.native_dropout.default)
    assert not compilable_target(aten.bernoulli.p)
    assert not compilable_target(lambda x: x)


def _segment():  # type: ignore[no-untyped-def]
    lines = [
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        DelLine(["a"], "    del a  # free a", donatable=True),
        _op("c", 2, aten.tanh.default, Var("b", 1)),
        _op("d", 3, aten.add.Tensor, Var("c", 2), 1.0),
        DelLine(["c"], "    del c  # free c"),
    ]
    _, found = fold_segments(lines, lambda v: _layout(v))
    return found[0]


@pytest.fixture
def compiled_never_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests about what a compiled run computes and holds: its speed against
    eager on this machine (timed by ``compile_segments``) is not their question."""
    monkeypatch.setattr(segments, "best_seconds", lambda fns, *a, **k: [0.0] * len(fns))


def test_a_compiled_segment_computes_what_its_eager_run_does(compiled_never_slower) -> None:  # type: ignore[no-untyped-def]
    seg = _segment()
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel == "inductor"
    a = torch.randn(64)
    b, d = chosen[seg.name]([a.clone()])
    torch.testing.assert_close(b, a * 2)
    torch.testing.assert_close(d, torch.tanh(a * 2) + 1)


def test_the_loss_gradient_needs_no_full_size_zero_buffer() -> None:
    """Inductor's joint-graph passes (run by torch.compile, not by
    ``compile_fx_inner``) turn ``nll_loss_backward``'s scatter into a fresh zero
    tensor into a pointwise select. Without them the run allocated a zero buffer
    of the logits' size; with them it allocates only row sums and writes the
    gradient into the donated log-softmax buffer."""
    rows, classes = 64, 1024
    full = Layout((rows, classes), (classes, 1), torch.float32, 0, 0)
    layouts = {
        0: full,
        1: Layout((), (), torch.float32, 0, 1),
        2: Layout((rows,), (1,), torch.int64, 0, 2),
        3: Layout((), (), torch.float32, 0, 3),
        4: full._replace(storage=4),
        5: full._replace(storage=5),
    }
    g, log_probs, target, total = Var("g", 1), Var("ls", 0), Var("t", 2), Var("tw", 3)
    lines = [
        _op("nb", 4, aten.nll_loss_backward.default, g, log_probs, target, None, 1, -100, total),
        _op(
            "out",
            5,
            aten._log_softmax_backward_data.default,
            Var("nb", 4),
            log_probs,
            1,
            torch.float32,
        ),
        DelLine(["ls", "nb"], "    del ls, nb  # free ls", donatable=True),
    ]
    _, (seg,) = fold_segments(lines, layouts.__getitem__)
    assert seg.donated == [1]  # inputs in first-read order: g, ls, t, tw
    compiled = segments.compile_segment(seg, torch.device("cpu"))
    peak, _ = segments.run_allocations(compiled, seg, torch.device("cpu"))
    assert peak < rows * classes * 4 // 16, peak

    logits = torch.randn(rows, classes)
    labels = torch.randint(0, classes, (rows,))
    ls = logits.log_softmax(1)
    one, count = torch.tensor(1.0), torch.tensor(float(rows))
    (grad,) = compiled([one, ls.clone(), labels, count])  # the call empties its list
    expected = aten._log_softmax_backward_data.default(
        aten.nll_loss_backward.default(one, ls, labels, None, 1, -100, count), ls, 1, torch.float32
    )
    torch.testing.assert_close(grad, expected)


def test_a_compiled_run_that_allocates_more_than_eager_stays_eager(  # type: ignore[no-untyped-def]
    monkeypatch, compiled_never_slower
) -> None:
    seg = _segment()
    extra = 1 << 20

    def greedy(segment, device):  # type: ignore[no-untyped-def]
        def run(args: list) -> list:
            scratch = torch.ones(extra, dtype=torch.uint8)  # a temporary eager never makes
            (a,) = args
            args.clear()
            b = a * 2
            del a
            return [b, torch.tanh(b) + scratch[:1].float() * 0 + 1]

        return run

    monkeypatch.setattr(segments, "compile_segment", greedy)
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel.startswith("eager: compiled it allocates more")
    assert chosen[seg.name].__name__ == f"{seg.name}_eager"
    # the same extra bytes within the plan's headroom are allowed
    seg = _segment()
    compile_segments([seg], torch.device("cpu"), OPS, headroom=lambda s: 2 * extra)
    assert seg.kernel == "inductor"


def test_a_run_that_allocates_too_much_whole_is_compiled_in_parts(  # type: ignore[no-untyped-def]
    monkeypatch, compiled_never_slower
) -> None:
    lines = [
        "    # step 0: b = aten.mul.Tensor",
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        DelLine(["a"], "    del a  # free a", donatable=True),
        "    # step 1: c = aten.tanh.default",
        _op("c", 2, aten.tanh.default, Var("b", 1)),
        DelLine(["b"], "    del b  # free b", donatable=True),
        "    # step 2: d = aten.add.Tensor",
        _op("d", 3, aten.add.Tensor, Var("c", 2), 1.0),
        DelLine(["c"], "    del c  # free c", donatable=True),
        "    # step 3: e = aten.mul.Tensor",
        _op("e", 4, aten.mul.Tensor, Var("d", 3), 3.0),
    ]
    _, (seg,) = fold_segments(lines, lambda v: _layout(v))
    compiled_parts: list[str] = []

    def whole_greedy(segment, device):  # type: ignore[no-untyped-def]
        eager = segments.eager_function(segment, OPS)
        if segment.name != seg.name:  # a part: as compact as its eager run
            compiled_parts.append(segment.name)
            return eager

        def run(args: list) -> list:
            scratch = torch.ones(1 << 20, dtype=torch.uint8)  # what eager never makes
            out = eager(args)
            del scratch
            return out

        return run

    monkeypatch.setattr(segments, "compile_segment", whole_greedy)
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel.startswith("inductor in 2 parts (4 of 4 ops compiled"), seg.kernel
    assert compiled_parts == ["segment_0a", "segment_0b"]
    assert [p.steps for p in seg.parts] == [(0, 1), (2, 3)]  # cut between steps
    assert seg.compiled_ops == 4
    summary = segments.kernels_summary([seg], 4)
    assert summary["in_parts"] == 1 and summary["compiled_ops"] == 4
    a = torch.randn(64)
    args = [a.clone()]
    d, e = chosen[seg.name](args)
    assert args == []  # the run's list is emptied, as a compiled run's is
    torch.testing.assert_close(d, torch.tanh(a * 2) + 1)
    torch.testing.assert_close(e, (torch.tanh(a * 2) + 1) * 3)
    # no cuts allowed: the run stays eager
    monkeypatch.setattr(segments, "MAX_SPLITS", 0)
    _, (seg,) = fold_segments(lines, lambda v: _layout(v))
    compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel.startswith("eager: compiled it allocates more") and not seg.parts


def test_a_part_cut_inside_a_step_is_held_to_that_steps_level() -> None:
    """Step 0 recomputes a value through three ops before its own; the cut falls
    between them, so the second part makes step 0's output: it is held to step
    0's level too (read as step 1's alone, a part of Mamba's backward was composed
    65,536 bytes under what the meter saw)."""
    lines = [
        "    # step 0: e = aten.mul.Tensor",
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),  # on the way to recompute d
        _op("c", 2, aten.tanh.default, Var("b", 1)),
        DelLine(["b"], "    del b", donatable=True),
        _op("d", 3, aten.add.Tensor, Var("c", 2), 1.0),
        DelLine(["c"], "    del c", donatable=True),
        _op("e", 4, aten.mul.Tensor, Var("d", 3), 3.0),
        DelLine(["d"], "    del d", donatable=True),
        "    # step 1: f = aten.tanh.default",
        _op("f", 5, aten.tanh.default, Var("e", 4)),
    ]
    _, (seg,) = fold_segments(lines, lambda v: _layout(v))
    first, second = segments.split_run(seg)  # type: ignore[misc]
    assert "aten_mul_Tensor(d, 3.0)" in second.eager_source  # step 0's op, cut from its comment
    assert (first.steps, second.steps) == ((0, 0), (0, 1))


def test_a_compiled_run_slower_than_eager_stays_eager(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seg = _segment()

    def slow(segment, device):  # type: ignore[no-untyped-def]
        eager = segments.eager_function(segment, OPS)

        def run(args: list) -> list:
            time.sleep(0.01)  # the eager run takes microseconds
            return eager(args)

        return run

    monkeypatch.setattr(segments, "compile_segment", slow)
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel.startswith("eager: compiled it runs slower"), seg.kernel
    assert chosen[seg.name].__name__ == f"{seg.name}_eager"


def test_a_run_whose_eager_form_would_not_fit_stays_compiled_however_it_times(  # type: ignore[no-untyped-def]
    monkeypatch,
) -> None:
    """A negative headroom (a schedule solved op by op for more than the budget,
    planner.measured_room) says the eager run does not fit: the compiled form is
    kept even where it times slower, and only if it saves the excess."""

    def slow_and_lean(segment, device):  # type: ignore[no-untyped-def]
        eager = segments.eager_function(segment, OPS)

        def run(args: list) -> list:
            time.sleep(0.01)
            return eager(args)

        return run

    monkeypatch.setattr(segments, "compile_segment", slow_and_lean)
    seg = _segment()
    chosen = compile_segments([seg], torch.device("cpu"), OPS, headroom=lambda s: -1)
    # as lean as eager, not 1 byte leaner: does not save the excess
    assert seg.kernel.startswith("eager: compiled it allocates more"), seg.kernel
    assert chosen[seg.name].__name__ == f"{seg.name}_eager"
    seg = _segment()
    chosen = compile_segments([seg], torch.device("cpu"), OPS, headroom=lambda s: 0)
    assert seg.kernel.startswith("eager: compiled it runs slower"), seg.kernel

    def lean(segment, device):  # type: ignore[no-untyped-def]
        def run(args: list) -> list:  # b and c never held: one fused kernel
            (a,) = args
            args.clear()
            b = a * 2
            del a
            time.sleep(0.01)
            return [b, torch.tanh(b).add_(1)]

        return run

    monkeypatch.setattr(segments, "compile_segment", lean)
    seg = _segment()
    chosen = compile_segments([seg], torch.device("cpu"), OPS, headroom=lambda s: -64)
    assert seg.kernel == "inductor", seg.kernel
    assert chosen[seg.name].__name__ == "run"
    eager_peak, compiled_peak = seg.allocations  # type: ignore[misc]
    assert compiled_peak <= eager_peak - 64


def _run_at(steps: tuple[int, int], kernel: str, allocations=None):  # type: ignore[no-untyped-def]
    graph = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return segments.Segment(
        f"run{steps}", graph, [], steps, 2, kernel=kernel, allocations=allocations
    )


def test_composed_levels_put_each_compiled_run_at_its_measured_bytes() -> None:
    """Steps outside compiled runs keep the replay's bytes; over a compiled run,
    its bytes before the run plus what it allocated compiled; between ops (memory
    steps) the replay's bytes always."""
    at_ops = [100, 180, 150, 120, 200, 90]
    between = [100, 100, 160, 0, 0, 95]
    runs = [
        _run_at((1, 2), "inductor", (100, 40)),  # before it: 180 - 100; compiled: 80 + 40
        _run_at((3, 4), "eager: compiled it runs slower"),
    ]
    levels = segments.composed_levels(runs, at_ops, between)
    assert levels == [100, 120, 160, 120, 200, 95]
    assert max(levels) == 200  # the executor's peak
    # a run compiled in parts: each part at its own bytes
    whole = _run_at((1, 4), "inductor in 2 parts")
    whole.parts = [_run_at((1, 2), "inductor", (100, 40)), _run_at((3, 4), "inductor", (150, 30))]
    assert segments.composed_levels([whole], at_ops, between) == [100, 120, 160, 80, 80, 95]


@pytest.mark.parametrize(
    ("timings", "compiled"),
    [
        ([[1.2, 1.0], [0.9, 1.0]], True),  # close: timed again, faster then
        ([[1.2, 1.0], [1.3, 1.1]], False),  # close, and slower again
        ([[2.0, 1.0], [0.5, 1.0]], False),  # far slower: not timed again
    ],
)
def test_a_close_call_is_timed_again_before_the_run_stays_eager(  # type: ignore[no-untyped-def]
    monkeypatch, timings, compiled
) -> None:
    seg = _segment()
    calls: list[int] = []

    def timed(fns, segment, device, repeats=segments.TIMING_REPEATS):  # type: ignore[no-untyped-def]
        calls.append(repeats)
        return timings[len(calls) - 1]

    monkeypatch.setattr(segments, "best_seconds", timed)
    compile_segments([seg], torch.device("cpu"), OPS)
    assert (seg.kernel == "inductor") is compiled, seg.kernel
    far = timings[0][0] > segments.RETIME_BELOW * timings[0][1]
    assert calls == ([3] if far else [3, segments.RETIME_REPEATS])


def test_best_seconds_times_each_form_on_fresh_inputs() -> None:
    seg = _segment()
    seen: list[int] = []

    def fast(args: list) -> list:
        seen.append(id(args))
        return []

    def slow(args: list) -> list:
        seen.append(id(args))
        time.sleep(0.005)
        return []

    best = segments.best_seconds([fast, slow], seg, torch.device("cpu"), repeats=2)
    assert best[0] < 0.005 <= best[1]
    assert len(seen) == 4


def test_a_run_inductor_cannot_compile_stays_eager(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seg = _segment()

    def fail(segment, device):  # type: ignore[no-untyped-def]
        raise RuntimeError("no lowering for this op\nmore detail")

    monkeypatch.setattr(segments, "compile_segment", fail)
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel == "eager: Inductor failed: RuntimeError: no lowering for this op"
    a = torch.randn(64)
    b, d = chosen[seg.name]([a.clone()])
    torch.testing.assert_close(d, torch.tanh(a * 2) + 1)


def test_a_run_that_fails_on_made_up_inputs_stays_eager(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Runs are measured on zeros of their inputs' layouts. One whose indices come
    from its inputs may then index out of bounds (here, indices shifted up by the
    dimension's size, which real inputs hold negative): its memory cannot be
    measured, so it stays eager, and the plan is still made."""
    x, idx, j, y, z = 0, 1, 2, 3, 4
    lines = [
        "    # step 0: j = aten.add.Tensor",
        _op("j", j, aten.add.Tensor, Var("idx", idx), 64),
        "    # step 1: y = aten.index.Tensor",
        OpLine(
            ["    y = aten_index_Tensor(x, [j])"],
            aten.index.Tensor,
            (Var("x", x), [Var("j", j)]),
            {},
            [(None, "y", y)],
            True,
        ),
        DelLine(["j"], "    del j  # free j"),
        "    # step 2: z = aten.mul.Tensor",
        _op("z", z, aten.mul.Tensor, Var("y", y), 2.0),
        DelLine(["y"], "    del y  # free y"),
    ]

    def layout_of(value: int) -> Layout:
        dtype = torch.int64 if value in (idx, j) else torch.float32
        return Layout((64,), (1,), dtype, 0, value)

    _, (seg,) = fold_segments(lines, layout_of)
    ops = {**OPS, "aten_index_Tensor": aten.index.Tensor}

    def never(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("compiled, or cut in parts")

    # the eager form is measured first and raises: nothing is compiled, and no
    # part is tried (called in turn, one part's bad indices would reach the next)
    monkeypatch.setattr(segments, "compile_segment", never)
    monkeypatch.setattr(segments, "split_run", never)
    chosen = compile_segments([seg], torch.device("cpu"), ops)
    assert seg.kernel.startswith("eager: it fails on made-up inputs (IndexError"), seg.kernel
    assert not seg.parts and seg.allocations is None
    real = {"x": torch.randn(64), "idx": torch.arange(64) - 64}
    (out,) = chosen[seg.name]([real[name] for name in seg.inputs])
    torch.testing.assert_close(out, real["x"] * 2)


def test_a_run_indexing_through_uninitialized_memory_is_never_compiled(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An inverse permutation (Mixtral's routing): ``empty_like``, ``index_put`` at
    the permutation's positions, then indexing with the result. On made-up inputs
    (zeros) most of the buffer is whatever the allocator left, and a compiled
    kernel's bounds check fails inside a parallel loop, which aborts the process
    (it did, on Mixtral). Such a run is neither compiled nor measured."""
    perm, x, inv0, ar, inv, y = 0, 1, 2, 3, 4, 5
    lines = [
        _op("inv0", inv0, aten.empty_like.default, Var("perm", perm)),
        _op("ar", ar, aten.arange.default, 64),
        OpLine(
            ["    inv = aten_index_put_default(inv0, [perm], ar)"],
            aten.index_put.default,
            (Var("inv0", inv0), [Var("perm", perm)], Var("ar", ar)),
            {},
            [(None, "inv", inv)],
            True,
        ),
        DelLine(["inv0", "ar", "perm"], "    del inv0, ar, perm"),
        OpLine(
            ["    y = aten_index_Tensor(x, [inv])"],
            aten.index.Tensor,
            (Var("x", x), [Var("inv", inv)]),
            {},
            [(None, "y", y)],
            True,
        ),
        DelLine(["inv"], "    del inv"),
    ]

    def layout_of(value: int) -> Layout:
        dtype = torch.float32 if value in (x, y) else torch.int64
        return Layout((64,), (1,), dtype, 0, value)

    _, (seg,) = fold_segments(lines, layout_of)
    assert segments.indexes_through_uninitialized(seg)
    # followed through the values: indexing with an input beside an unrelated
    # uninitialized buffer is fine
    unrelated = [
        _op("inv0", inv0, aten.empty_like.default, Var("perm", perm)),
        OpLine(
            ["    y = aten_index_Tensor(x, [perm])"],
            aten.index.Tensor,
            (Var("x", x), [Var("perm", perm)]),
            {},
            [(None, "y", y)],
            True,
        ),
    ]
    _, (plain,) = fold_segments(unrelated, layout_of)
    assert not segments.indexes_through_uninitialized(plain)

    def never(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("compiled or measured")

    monkeypatch.setattr(segments, "compile_segment", never)
    monkeypatch.setattr(segments, "run_allocations", never)
    ops = {
        "aten_empty_like_default": aten.empty_like.default,
        "aten_arange_default": aten.arange.default,
        "aten_index_put_default": aten.index_put.default,
        "aten_index_Tensor": aten.index.Tensor,
    }
    chosen = compile_segments([seg], torch.device("cpu"), ops)
    assert seg.kernel.startswith("eager: it indexes through memory it leaves uninitialized")
    real = {"perm": torch.randperm(64), "x": torch.randn(64)}
    (out,) = chosen[seg.name]([real[name] for name in seg.inputs])
    torch.testing.assert_close(out[real["perm"]], real["x"])  # x, un-permuted


def test_parts_failing_in_turn_leave_the_run_eager_and_device_failures_propagate(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    seg = _segment()

    def fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise IndexError("index 64 is out of bounds for dimension 0 with size 64")

    monkeypatch.setattr(segments, "best_seconds", fails)
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert seg.kernel == (
        "eager: its parts fail called in turn "
        "(IndexError: index 64 is out of bounds for dimension 0 with size 64)"
    )
    a = torch.randn(64)
    _, d = chosen[seg.name]([a.clone()])
    torch.testing.assert_close(d, torch.tanh(a * 2) + 1)

    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("out of memory")

    # out of memory says nothing about made-up inputs: not swallowed
    monkeypatch.setattr(segments, "run_allocations", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        compile_segments([_segment()], torch.device("cpu"), OPS)


@pytest.mark.parametrize("bad", ["Inductor", "compile", None])
def test_plan_rejects_an_unknown_kernels_value_before_any_work(bad) -> None:  # type: ignore[no-untyped-def]
    import planner

    with pytest.raises(ValueError, match="kernels must be one of 'eager', 'inductor'"):
        planner.plan(torch.nn.Linear(2, 2), "1MB", (torch.randn(1, 2),), kernels=bad)


def test_a_run_whose_compile_passes_the_time_limit_stays_eager(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Inductor can spend unbounded time in sympy (Funnel Transformer: more than 8
    minutes on one run, as in plain torch.compile); past the limit the run stays
    eager, and the same graph is not compiled again in this process."""
    seg = _segment()
    calls: list[int] = []

    def stuck(segment, device):  # type: ignore[no-untyped-def]
        calls.append(1)
        time.sleep(30)
        raise AssertionError("the limit did not stop the compile")

    monkeypatch.setenv("PLANNER_COMPILE_TIME_LIMIT", "0.3")
    monkeypatch.setattr(segments, "compile_segment", stuck)
    monkeypatch.setattr(segments, "_COMPILE_TIMED_OUT", set())
    start = time.perf_counter()
    chosen = compile_segments([seg], torch.device("cpu"), OPS)
    assert time.perf_counter() - start < 10
    assert seg.kernel.startswith("eager: Inductor failed: CompileTimeout: compiling it took")
    a = torch.randn(64)
    b, d = chosen[seg.name]([a.clone()])
    torch.testing.assert_close(d, torch.tanh(a * 2) + 1)
    again = _segment()
    compile_segments([again], torch.device("cpu"), OPS)
    assert len(calls) == 1 and "timed out before" in again.kernel


@pytest.mark.parametrize("donating", [False, True])
def test_runs_are_never_compiled_as_cuda_graphs(
    monkeypatch: pytest.MonkeyPatch, donating: bool
) -> None:
    """A user's ``triton.cudagraphs`` (or TORCHINDUCTOR_CUDAGRAPHS) must not reach
    the runs: a CUDA graph copies its inputs into a pool of its own and overwrites
    its outputs at the next replay, none of which the plan counts."""
    from torch._inductor import compile_fx
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.triton, "cudagraphs", True)
    real = compile_fx.compile_fx_inner
    seen: list[tuple[object, bool]] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((kwargs.get("cudagraphs"), inductor_config.triton.cudagraphs))
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    lines = [
        _op("b", 1, aten.mul.Tensor, Var("a", 0), 2.0),
        DelLine(["a"], "    del a  # free a", donatable=donating),
        _op("c", 2, aten.add.Tensor, Var("b", 1), 1.0),
    ]
    _, (seg,) = fold_segments(lines, lambda v: _layout(v))
    assert bool(seg.donated) is donating
    compiled = segments.compile_segment(seg, torch.device("cpu"))
    ((boxed, config_then),) = seen
    assert boxed is not None and boxed.value is False and config_then is False
    x = torch.randn(64)
    (_, c) = compiled([x.clone()])
    torch.testing.assert_close(c, x * 2.0 + 1.0)


def test_a_cat_onto_a_legacy_empty_is_laid_out_as_eager_lays_it_out() -> None:
    """transformers' cache cats transposed keys onto torch.tensor([]): eager's
    cat makes a new contiguous tensor, Inductor's decomposition cloned the keys
    with their strides, and a view the trace recorded after it failed, leaving
    GPT-2's attention runs eager."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(keys: torch.Tensor) -> torch.Tensor:  # (batch, tokens, heads, head size)
        cached = torch.ops.aten.cat.default([torch.empty(0), keys.transpose(1, 2)], -2)
        return torch.ops.aten.view.default(cached.transpose(-2, -1).mul(2.0), [8, 32, 16])

    keys = torch.randn(4, 16, 2, 32)
    eager = step(keys)
    table = {**select_decomp_table(), torch.ops.aten.cat.default: segments._cat_laid_out_as_eager}
    traced = make_fx(step, decomposition_table=table, tracing_mode="fake")(keys)
    assert torch.equal(traced(keys), eager)
    with pytest.raises(ValueError, match="Cannot view"):  # Inductor's own decomposition
        make_fx(step, decomposition_table=select_decomp_table(), tracing_mode="fake")(keys)
    # anything else is Inductor's decomposition (NotImplemented: the op itself)
    a, b = torch.randn(2, 3), torch.randn(4, 3)
    out = segments._cat_laid_out_as_eager([a, b])
    assert out is NotImplemented or torch.equal(out, torch.cat([a, b]))
