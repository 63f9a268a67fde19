"""Straight-line runs of the executor's ops, compiled by TorchInductor.

The emitter records each op call as an ``OpLine`` and each free as a ``DelLine``.
With ``kernels="inductor"``, ``fold_segments`` walks the lines: a run of
op calls and frees with no memory step of the plan between them (no prefetch,
wait, offload, quantize or delivery) becomes one FX graph, and the run's source
becomes one call of that graph compiled by Inductor (fused kernels, as
``torch.compile`` builds them). The plan's memory steps stay where they were, so
what the plan moves, when, is unchanged; inside a run Inductor frees each buffer
at its last use and never materializes the intermediates it fuses away.

Why the run's inputs are passed in a list (Inductor's boxed calling convention):
the compiled code clears the list and frees each input after its last use, so
an input the plan frees inside the run is freed there, not held to the run's
end. The executor deletes its own names for those inputs before the call.

Why the budget still holds: ``compile_segments`` runs each compiled run once
beside its eager form and keeps it only if it allocates no more at its end, and
at its peak no more than the plan's spare room over those steps allows (for a
schedule solved op by op for more than the budget, ``planner.measured_room``,
that room is negative: the run must save the excess); ``composed_levels`` then
states what the executor holds at each step, as the meter sees it.

Random ops (dropout) are never compiled: Inductor draws its own random numbers,
and the executor's must be the ones eager draws.
"""

from __future__ import annotations

import logging
import operator
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.fx

from planner.codegen.compile_limit import CompileTimeout, compile_time_limit, timed_out
from planner.errors import first_line
from planner.ir.fused_loss import DECOMPOSITIONS as FUSED_LOSS_DECOMPOSITIONS
from planner.ir.meta import draws_random

log = logging.getLogger(__name__)

#: A run is compiled only if it has at least this many ops that compute (views
#: and getitems not counted): one op gains nothing from Inductor.
MIN_COMPUTE_OPS = 2


@dataclass(frozen=True)
class Var:
    """A variable of the generated source in an op's arguments, and the program
    value it holds (whose traced layout a compiled run's example input copies)."""

    name: str
    value: int


@dataclass
class OpLine:
    """One op call of the executor: its eager source and its structure."""

    source: list[str]  # the lines that run it eagerly (an ``out=`` call, getitems)
    target: Any
    args: tuple
    kwargs: dict
    #: (position in a tuple result or None for a single result, variable, value)
    outputs: list[tuple[int | None, str, int]]
    compilable: bool


@dataclass
class DelLine:
    """A ``del`` of the executor: the variables it frees, and its source line.

    ``donatable``: the tensor they name is the executor's alone (an op's output or
    a copy read back, not the caller's, a parameter, or a copy still being
    written), so a compiled run that frees it may write its results into it."""

    names: list[str]
    source: str
    donatable: bool = False


class Layout(NamedTuple):
    """A value's traced layout, and the storage it lives in: inputs of one
    storage are views of one buffer (the run's example inputs share it too)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    storage: int


@dataclass
class Segment:
    """One compiled run: an FX graph of ATen ops and its inputs' traced layouts."""

    name: str
    graph: torch.fx.GraphModule
    #: each input's traced layout, in call order
    input_layouts: list[Layout]
    #: first and last step of the run: the steps whose levels it is held to
    #: (``run_headroom``, ``composed_levels``), and named in messages
    steps: tuple[int, int]
    num_ops: int
    #: positions of the inputs the run frees (the executor holds the others)
    freed: list[int] = field(default_factory=list)
    #: positions of those whose buffers the run may reuse (the executor's alone)
    donated: list[int] = field(default_factory=list)
    #: the run as the eager executor would run it: a function of the same list of
    #: inputs (the fallback, and the reference the compiled run's memory must meet)
    eager_source: str = ""
    #: "inductor", or why the run is left eager (set by ``compile_segments``)
    kernel: str = "not compiled yet"
    #: the executor's variables: the inputs (call order), what the run returns,
    #: and those it frees without reading them (deleted before the call)
    inputs: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    early: list[str] = field(default_factory=list)
    #: the run's lines and the layouts of their values, to build parts of it from
    items: list[Any] = field(default_factory=list, repr=False)
    layout_of: Callable[[int], Layout] | None = field(default=None, repr=False)
    #: a run compiled in parts (``split_run``): the parts, each compiled or eager
    parts: list[Segment] = field(default_factory=list)
    #: compiled: (eager, compiled) peak bytes the run allocated above its inputs
    #: when measured (``run_allocations``), for ``composed_levels``
    allocations: tuple[int, int] | None = None

    @property
    def compiled_ops(self) -> int:
        """Ops this run runs in compiled graphs."""
        if self.parts:
            return sum(p.compiled_ops for p in self.parts)
        return self.num_ops if self.kernel == "inductor" else 0


def _computes(item: Any) -> bool:
    """Whether ``item`` is an op call that computes (not a view or a getitem)."""
    return isinstance(item, OpLine) and not _is_view_like(item.target)


def _compute_ops(items: list[Any]) -> int:
    return sum(1 for it in items if _computes(it))


def joins_run(item: Any) -> bool:
    """Whether ``item`` may be inside a compiled run: a compilable op call, a free,
    or a comment; anything else (a memory step, an op Inductor must not run) ends
    the run before it."""
    return (
        (isinstance(item, OpLine) and item.compilable)
        or isinstance(item, DelLine)
        or (isinstance(item, str) and _is_comment(item))
    )


def step_line_at_or_before(items: Sequence[Any], i: int) -> tuple[int, int] | None:
    """(index, step) of the nearest step comment at ``items[i]`` or before it."""
    while i >= 0:
        item = items[i]
        if isinstance(item, str) and (match := STEP_COMMENT.match(item)):
            return i, int(match.group(1))
        i -= 1
    return None


def compilable_target(target: Any) -> bool:
    """Whether Inductor may run ``target``: an ATen op that draws no random numbers."""
    return isinstance(target, torch._ops.OpOverload) and not draws_random(target)


def _is_view_like(target: Any) -> bool:
    if target is operator.getitem:
        return True
    return isinstance(target, torch._ops.OpOverload) and bool(
        target._schema.returns and target._schema.returns[0].alias_info is not None
    )


def fold_segments(
    lines: Sequence[Any],
    layout_of: Callable[[int], Layout] | None,
) -> tuple[list[str], list[Segment]]:
    """Render ``lines`` (strings, ``OpLine``s, ``DelLine``s) as source. With
    ``layout_of`` (a value's traced ``Layout``), each run of compilable op calls
    is replaced by a call of a compiled ``Segment``; without, every op runs
    eagerly."""
    out: list[str] = []
    segments: list[Segment] = []
    run: list[Any] = []
    step = -1  # the step whose lines are being read
    run_step = -1  # the step in effect where the run began

    def flush(carry_comments: bool = False) -> list[str]:
        """Fold the run; returns the comments after its last free (they belong to
        the steps that follow it) if ``carry_comments``, else emits them."""
        assert layout_of is not None
        trailing: list[str] = []
        while run and isinstance(run[-1], str):
            trailing.insert(0, run.pop())
        built = None
        if _compute_ops(run) >= MIN_COMPUTE_OPS:
            built = _build(run, f"segment_{len(segments)}", layout_of, run_step)
        if built is None:
            out.extend(_eager_source(run))
        else:
            segments.append(built[0])
            out.extend(built[1])
        run.clear()
        if carry_comments:
            return trailing
        out.extend(trailing)
        return []

    if layout_of is None:
        return _eager_source(lines), []
    for item in lines:
        if not run:
            run_step = step
        if isinstance(item, str) and (match := STEP_COMMENT.match(item)):
            step = int(match.group(1))
        if isinstance(item, DelLine) and not run:
            out.extend(_eager_source([item]))  # a free alone opens no run
        elif joins_run(item):
            run.append(item)  # a step's comment, too, opens the run its op may join
        else:
            # a memory step (a line of source) between a step's comment and its op
            # (a read made at once before the op): the comment goes on with the
            # next run, whose steps then include that op's, so the run is held to
            # that step's level (a run that read the step as not its own was
            # composed 1,296 bytes under what the meter saw, GPT-NeoX at its
            # smallest budget). An op that runs eagerly keeps its own comment.
            carried = flush(carry_comments=not isinstance(item, OpLine))
            out.extend(_eager_source([item]))
            run.extend(carried)
    flush()
    return out, segments


STEP_COMMENT = re.compile(r"\s*# step (\d+):")


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _eager_source(items: Sequence[Any]) -> list[str]:
    src: list[str] = []
    for it in items:
        if isinstance(it, OpLine):
            src.extend(it.source)
        elif isinstance(it, DelLine):
            src.append(it.source)
        else:
            src.append(it)
    return src


def _build(
    items: list[Any],
    name: str,
    layout_of: Callable[[int], Layout],
    step_at_start: int = -1,
) -> tuple[Segment, list[str]] | None:
    """The run's FX graph and the source that calls it (None: nothing it computes
    outlives the run, so there is nothing to return and it runs eagerly).

    ``step_at_start``: the step that ops before the run's first step comment
    belong to (a run that begins after an eager op of that step, or a part cut
    inside one); the run is held to that step's level too. Read as the next
    step's, a part that recomputed a value for step 930 of Mamba's backward was
    composed 65,536 bytes under what the meter saw.

    Ops whose results nothing outside the run reads are dropped (a ``detach``
    whose output is freed at once), and so are inputs only they read: an input
    passed to the compiled graph but unused would be held to its end, where the
    eager run frees it at once."""
    graph = torch.fx.Graph()
    defined: dict[str, torch.fx.Node] = {}
    order: list[str] = []  # variables defined in the run, in definition order
    placeholders: dict[str, torch.fx.Node] = {}
    values: dict[str, int] = {}
    freed: set[str] = set()  # variables the run frees (defined in it, or read by it)
    donatable: set[str] = set()
    comments: list[str] = []
    steps: list[int] = []
    op_nodes: list[tuple[OpLine, torch.fx.Node]] = []

    def node_of(x: Any) -> Any:
        if isinstance(x, Var):
            if x.name in defined:
                return defined[x.name]
            if x.name not in placeholders:
                placeholders[x.name] = graph.placeholder(f"in_{len(placeholders)}")
                values[x.name] = x.value
            return placeholders[x.name]
        if isinstance(x, (list, tuple)):
            return type(x)(node_of(a) for a in x)
        if isinstance(x, dict):
            return {k: node_of(v) for k, v in x.items()}
        return x

    for it in items:
        if isinstance(it, OpLine):
            if not steps and step_at_start >= 0:
                steps.append(step_at_start)
            node = graph.call_function(it.target, node_of(it.args), node_of(it.kwargs))
            op_nodes.append((it, node))
            for position, var, _value in it.outputs:
                defined[var] = (
                    node
                    if position is None
                    else graph.call_function(operator.getitem, (node, position))
                )
                order.append(var)
        elif isinstance(it, DelLine):
            freed.update(it.names)
            if it.donatable:
                donatable.update(it.names)
        else:
            comments.append(it)
            match = STEP_COMMENT.match(it)
            if match:
                steps.append(int(match.group(1)))
    results = [v for v in order if v not in freed]
    if not results:
        return None
    graph.output([defined[v] for v in results])
    graph.eliminate_dead_code()
    live_ops = [(it, node) for it, node in op_nodes if _alive(node)]
    inputs = [n for n, node in placeholders.items() if node.users]
    for node in placeholders.values():
        if not node.users:
            graph.erase_node(node)
    live = set(inputs) | {var for it, _ in live_ops for _, var, _ in it.outputs}
    # frees of variables made before the run that it no longer reads go before the
    # call (variables of dropped ops are never made)
    early = [
        n
        for it in items
        if isinstance(it, DelLine)
        for n in it.names
        if n not in live and n not in defined
    ]
    freed_positions = [i for i, n in enumerate(inputs) if n in freed]
    eager: list[str] = []  # the run's eager lines, for the live ops
    live_lines = {id(it) for it, _ in live_ops}
    for it in items:
        if isinstance(it, OpLine) and id(it) in live_lines:
            eager.extend(it.source)
        elif isinstance(it, DelLine) and (kept := [n for n in it.names if n in live]):
            eager.append(f"    del {', '.join(kept)}")
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    unpack = [f"    {', '.join(inputs)}{',' if len(inputs) == 1 else ''} = args"] if inputs else []
    eager_source = "\n".join(
        [f"def {name}_eager(args):", *unpack, "    args.clear()"]
        + eager
        + [f"    return [{', '.join(results)}]", ""]
    )
    layouts = [layout_of(values[n]) for n in inputs]
    shared = Counter(layout.storage for layout in layouts)
    # an input is donated only if it is its storage's one view here: Inductor
    # writes a donated input's buffer in place, which the other view still reads
    donatable = {n for n, layout in zip(inputs, layouts) if shared[layout.storage] == 1} & donatable
    segment = Segment(
        name,
        gm,
        layouts,
        (min(steps, default=-1), max(steps, default=-1)),
        len(live_ops),
        freed_positions,
        [i for i, n in enumerate(inputs) if n in donatable],
        eager_source,
        inputs=inputs,
        results=results,
        early=early,
        items=list(items),
        layout_of=layout_of,
    )
    ind = "    "
    src = [
        f"{ind}# {name}: steps {segment.steps[0]}-{segment.steps[1]}, {segment.num_ops} ops "
        f"in one TorchInductor graph"
    ]
    src += comments
    if early:
        src.append(f"{ind}del {', '.join(early)}  # freed within the run, not read by it")
    src.append(f"{ind}segment_args = [{', '.join(inputs)}{',' if len(inputs) == 1 else ''}]")
    if freed_positions:
        freed_inputs = ", ".join(inputs[i] for i in freed_positions)
        src.append(f"{ind}del {freed_inputs}  # {name} frees them after their last use")
    targets = ", ".join(results) + ("," if len(results) == 1 else "")
    src.append(f"{ind}{targets} = {name}(segment_args)")
    return segment, src


def _alive(node: torch.fx.Node) -> bool:
    """Whether ``node`` survived dead-code elimination (erased nodes are unlinked)."""
    return node.graph is not None and node in node.graph.nodes


def _examples(segment: Segment, device: torch.device, zero: bool = False) -> list:
    """Tensors of the segment's input layouts, inputs of one storage views of one
    buffer as in the executor (zeros: valid indices, no NaNs)."""
    spans: dict[int, int] = {}
    for layout in segment.input_layouts:
        end = layout.offset + sum((n - 1) * s for n, s in zip(layout.shape, layout.stride)) + 1
        nbytes = 0 if 0 in layout.shape else end * layout.dtype.itemsize
        spans[layout.storage] = max(spans.get(layout.storage, 0), nbytes)
    buffers = {
        s: torch.empty(n, dtype=torch.uint8, device=device).untyped_storage()
        for s, n in spans.items()
    }
    out = []
    for layout in segment.input_layouts:
        t = torch.empty(0, dtype=layout.dtype, device=device)
        t.set_(buffers[layout.storage], layout.offset, layout.shape, layout.stride)
        out.append(t.zero_() if zero else t)
    return out


def _cat_laid_out_as_eager(tensors: list[torch.Tensor], dim: int = 0) -> Any:
    """Inductor's decomposition of ``aten.cat``, except where all inputs but one
    are legacy empties (``torch.tensor([])``, which cat skips): there Inductor
    clones the one left, keeping its strides, where eager's cat makes a new tensor
    laid out by its memory format. transformers' cache starts each layer from
    such an empty and cats the transposed keys onto it: a ``view`` the trace
    recorded after it then failed ("Cannot view a tensor with shape [4, 2, 32, 16]
    and strides (1024, 32, 1, 64)"), and GPT-2's attention runs stayed eager."""
    from torch._inductor.decomposition import cat as inductor_cat
    from torch._prims_common import suggest_memory_format

    kept = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]
    if len(kept) == 1 < len(tensors) and all(t.dtype == kept[0].dtype for t in tensors):
        return kept[0].clone(memory_format=suggest_memory_format(kept[0]))
    return inductor_cat(tensors, dim)


def compile_segment(segment: Segment, device: torch.device) -> Callable[[list], list]:
    """Compile ``segment`` with Inductor for inputs of its traced layouts on
    ``device``; the result takes a list of inputs (which it empties) and returns
    the run's outputs."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = _examples(segment, device)
    decompositions: dict[Any, Callable[..., Any]] = {
        **select_decomp_table(),
        **FUSED_LOSS_DECOMPOSITIONS,
        torch.ops.aten.cat.default: _cat_laid_out_as_eager,
    }
    traced = make_fx(segment.graph, decomposition_table=decompositions, tracing_mode="fake")(
        *examples
    )
    traced = _joint_graph_passes(traced, device)
    # every output is read by the executor's next ops, which expect the traced
    # layout: Inductor keeps a graph output's layout only if it is "user visible"
    # (torch.compile marks them in compile_fx; this is compile_fx_inner's caller)
    outputs = next(n for n in reversed(traced.graph.nodes) if n.op == "output")
    outputs.meta["user_visible_output_idxs"] = list(range(len(outputs.args[0])))
    # never CUDA graphs (the user's TORCHINDUCTOR_CUDAGRAPHS or config may ask for
    # them): a graph copies its inputs into buffers of its own, keeps a pool for
    # the process's life and overwrites its outputs at the next replay, none of
    # which the plan counts or allows for
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import BoxedBool

    no_graphs = {"triton.cudagraphs": False}
    if not segment.donated:
        with inductor_config.patch(no_graphs):
            return compile_fx_inner(traced, examples, cudagraphs=BoxedBool(False))  # type: ignore[return-value]
    # Inductor reuses the buffers of a backward graph's donated inputs; it reads
    # them from the tracing context that AOTAutograd would set up. Its graph cache
    # does not key on them, so a donating compile neither reads nor fills it.
    context = torch._guards.TracingContext(None)
    context.fw_metadata = SimpleNamespace(  # type: ignore[assignment]
        bw_donated_idxs=list(segment.donated),
        static_input_indices=[],
        num_mutated_inp_runtime_indices=0,
    )
    with (
        torch._guards.tracing(context),
        inductor_config.patch({**no_graphs, "fx_graph_cache": False}),
    ):
        return compile_fx_inner(  # type: ignore[return-value]
            traced, examples, is_backward=True, cudagraphs=BoxedBool(False)
        )


def _joint_graph_passes(traced: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """Inductor's joint-graph passes, as ``torch.compile`` runs them on the same ops
    before compiling (``compile_fx_inner`` alone does not). They matter for memory:
    one rewrites a scatter into a fresh zero tensor (``nll_loss_backward``) as a
    pointwise select, so the loss gradient needs no full-size zero buffer (32 MiB
    for GPT-2's logits, and on the CPU as many fresh pages to fault in). The
    passes trace their replacements under the graph's fake mode."""
    from torch._guards import detect_fake_mode
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._inductor.virtualized import V

    fake_mode = detect_fake_mode([n.meta["val"] for n in traced.graph.nodes if "val" in n.meta])
    assert fake_mode is not None, "make_fx(tracing_mode='fake') records fake values"
    with V.set_fake_mode(fake_mode), fake_mode:
        return joint_graph_passes(traced, device)


def eager_function(segment: Segment, ops: dict[str, Any]) -> Callable[[list], list]:
    """The run as the eager executor runs it, called like the compiled one."""
    namespace: dict[str, Any] = {"torch": torch, **ops}
    exec(compile(segment.eager_source, f"<planner {segment.name}>", "exec"), namespace)
    return namespace[f"{segment.name}_eager"]


def run_allocations(
    fn: Callable[[list], list], segment: Segment, device: torch.device
) -> tuple[int, int]:
    """(peak, final) bytes allocated during one call of ``fn`` on fresh inputs,
    held as the executor holds them: those the run frees only by the call's list
    (after a warm-up call: first calls allocate caches). Final counts the
    outputs, held until the count is taken. On CUDA under the allocator setting
    the executor runs with (``exact_blocks``), so the blocks are those it gets."""
    from planner.ir.build import allocated_bytes
    from planner.runtime.exact_blocks import exact_blocks
    from planner.runtime.meter import measure

    held: list[torch.Tensor] = []
    inputs_bytes = 0

    def call() -> list:
        nonlocal inputs_bytes
        args = _examples(segment, device, zero=True)
        held.extend(t for i, t in enumerate(args) if i not in segment.freed)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in args}
        inputs_bytes = sum(allocated_bytes(n, device) for n in storages.values())
        return fn(args)

    with exact_blocks(device):
        fn(_examples(segment, device, zero=True))
        # the inputs are made inside the measured call: the CPU profiler does not
        # see frees of blocks allocated before it started
        out, measured = measure(call, device=device)
    held.clear()
    del out
    return (
        measured.peak_allocated_bytes - inputs_bytes,
        measured.final_allocated_bytes - inputs_bytes,
    )


#: Calls of each form of a run timed when choosing between them.
TIMING_REPEATS = 3
#: A compiled run stays eager only if it is slower than this times the eager run:
#: closer than that is timing noise, and in place (its inputs just written by the
#: ops before it) the fused form reads memory less than in these isolated calls.
SLOWER_MARGIN = 1.05
#: A compiled run that times slower than its eager form, but by less than this
#: factor, is timed again (``RETIME_REPEATS`` calls each) before it is left eager:
#: on a loaded machine three calls of each can misjudge a close call.
RETIME_BELOW = 1.5
RETIME_REPEATS = 7


def best_seconds(
    fns: Sequence[Callable[[list], list]],
    segment: Segment,
    device: torch.device,
    repeats: int = TIMING_REPEATS,
) -> list[float]:
    """The fastest of ``repeats`` calls of each of ``fns`` on fresh inputs of the
    run's layouts, called in turn (a burst of other load then slows one sample of
    each, not all samples of one); inputs are made outside the timed call."""
    # the run's own GPU, not the current one
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            args = _examples(segment, device, zero=True)
            sync()
            start = time.perf_counter()
            fn(args)
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


#: How many times a run whose compiled form allocates too much is cut in two
#: (``split_run``): up to 2**MAX_SPLITS parts.
MAX_SPLITS = 3


def compile_segments(
    segments: Sequence[Segment],
    device: torch.device,
    ops: dict[str, Any],
    headroom: Callable[[Segment], int] = lambda segment: 0,
) -> dict[str, Callable[[list], list]]:
    """A callable per segment: Inductor's, where it compiles, allocates no more
    than the run does eagerly at its end, and at its peak no more than that plus
    ``headroom(segment)`` (bytes the plan leaves free under the budget over the
    run's steps), so the budget still holds, and is not slower than the eager run
    (a short run of a convolution and its neighbours can be: measured 0.68 ms
    compiled against 0.30 ms eager on a 2-core CPU); else the eager run, with the
    reason in ``segment.kernel``. A negative headroom (a plan solved op by op for
    more than the budget, ``planner.measured_room``) says the eager run would not
    fit: the compiled form is then kept however it times, and where none fits
    the eager run stays (``composed_levels`` then exceed the budget). A run whose
    compiled form allocates too much is cut in parts, each compiled where it
    fits and eager where not (see ``split_run``). Inductor caches kernels by
    their code, so a model's repeated blocks compile once."""
    chosen: dict[str, Callable[[list], list]] = {}
    start = time.perf_counter()
    for i, segment in enumerate(segments):
        eager = eager_function(segment, ops)
        chosen[segment.name] = eager
        fitting = None
        if indexes_through_uninitialized(segment):
            segment.kernel = (
                "eager: it indexes through memory it leaves uninitialized, which made-up "
                "inputs cannot fill in"
            )
        else:
            fitting = _fitting_form(segment, eager, device, ops, headroom, MAX_SPLITS)
        if fitting is not None and headroom(segment) < 0:  # eager would not fit
            chosen[segment.name] = fitting
        elif fitting is not None:  # timed only once it fits: one that does not is eager
            stays_eager = _why_not_faster(fitting, eager, segment, device)
            if stays_eager is not None:
                segment.parts = []
                segment.allocations = None
                segment.kernel = stays_eager
            else:
                chosen[segment.name] = fitting
        log.info(
            "inductor: %s (%d of %d, %d ops): %s, %.1f s so far",
            segment.name,
            i + 1,
            len(segments),
            segment.num_ops,
            segment.kernel,
            time.perf_counter() - start,
        )
    return chosen


def _why_not_faster(
    fitting: Callable[[list], list],
    eager: Callable[[list], list],
    segment: Segment,
    device: torch.device,
) -> str | None:
    """Why ``segment`` stays eager although ``fitting`` fits: it times slower, or
    its parts, each measured alone, fail called in turn (the whole ran eagerly on
    the same inputs, so each part sees what it would there, up to the rounding of
    compiled kernels; a failure here is more likely a fault in the parts' wiring,
    warned of, than the inputs'). None: keep ``fitting``."""
    try:
        compiled_s, eager_s = best_seconds((fitting, eager), segment, device)
        if SLOWER_MARGIN * eager_s < compiled_s <= RETIME_BELOW * eager_s:
            again = best_seconds((fitting, eager), segment, device, RETIME_REPEATS)
            compiled_s, eager_s = min(compiled_s, again[0]), min(eager_s, again[1])
    except _DEVICE_FAILURES:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        why = f"eager: its parts fail called in turn ({first_line(exc)})"
        log.warning("inductor: %s (steps %s) stays eager: %s", segment.name, segment.steps, why)
        return why
    if compiled_s > SLOWER_MARGIN * eager_s:
        return (
            f"eager: compiled it runs slower ({compiled_s * 1e3:.3f} ms vs {eager_s * 1e3:.3f} ms)"
        )
    return None


_aten = torch.ops.aten
#: Ops whose result is uninitialized memory until something writes it.
_UNINITIALIZED = frozenset(
    {
        _aten.empty_like.default,
        _aten.empty.memory_format,
        _aten.empty_strided.default,
        _aten.empty_permuted.default,
        _aten.new_empty.default,
        _aten.new_empty_strided.default,
    }
)
#: Ops that read or write at positions a tensor of indices gives: the position of
#: that argument (functional forms only: the graphs are functionalized).
_INDEX_ARGUMENT = {
    _aten.index.Tensor: 1,
    _aten._unsafe_index.Tensor: 1,
    _aten.index_put.default: 1,
    _aten._unsafe_index_put.default: 1,
    _aten._unsafe_masked_index.default: 2,
    _aten._unsafe_masked_index_put_accumulate.default: 2,
    _aten.index_select.default: 2,
    _aten.index_add.default: 2,
    _aten.index_copy.default: 2,
    _aten.index_fill.int_Tensor: 2,
    _aten.index_fill.int_Scalar: 2,
    _aten.index_reduce.default: 2,
    _aten.gather.default: 2,
    _aten.scatter.src: 2,
    _aten.scatter.value: 2,
    _aten.scatter.reduce: 2,
    _aten.scatter.value_reduce: 2,
    _aten.scatter_add.default: 2,
    _aten.scatter_reduce.two: 2,
    _aten.take.default: 1,
    _aten.take_along_dim.default: 1,
    _aten.put.default: 1,
    _aten.embedding.default: 1,
    _aten._embedding_bag.default: 1,
}


def _vars_in(x: Any) -> list[str]:
    if isinstance(x, Var):
        return [x.name]
    if isinstance(x, (list, tuple)):
        return [name for item in x for name in _vars_in(item)]
    return []


def indexes_through_uninitialized(segment: Segment) -> bool:
    """Whether the run indexes with values computed from memory it leaves
    uninitialized: an inverse permutation (``empty_like``, then ``index_put`` at
    a permutation's positions, then indexing with the result: Mixtral's
    routing). On made-up inputs the permutation is zeros, most of the buffer
    keeps whatever the allocator left there, and a compiled kernel indexing with
    it checks bounds inside a parallel loop, where a failed check aborts the
    process. Such a run is never measured, so never compiled; the replay accounts
    for it op by op. Followed through the run's values: an op's outputs derive
    from uninitialized memory when any of its arguments does."""
    derived: set[str] = set()
    for item in segment.items:
        if not isinstance(item, OpLine):
            continue
        args = list(item.args) + list(item.kwargs.values())
        position = _INDEX_ARGUMENT.get(item.target)
        if position is not None and position < len(item.args):
            if derived.intersection(_vars_in(item.args[position])):
                return True
        if item.target in _UNINITIALIZED or derived.intersection(_vars_in(args)):
            derived.update(var for _, var, _ in item.outputs)
    return False


#: graphs of runs whose compile passed the time limit (``compile_limit``)
_COMPILE_TIMED_OUT: set[str] = set()

#: Failures that say nothing about a run's made-up inputs: out of memory, and a
#: CUDA device-side assert, after which the device is unusable for every run.
_DEVICE_FAILURES: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
    if cls is not None
)


def _fitting_form(
    segment: Segment,
    eager: Callable[[list], list],
    device: torch.device,
    ops: dict[str, Any],
    headroom: Callable[[Segment], int],
    splits: int,
) -> Callable[[list], list] | None:
    """``segment`` compiled, or compiled in parts (up to ``splits`` cuts deep), in
    a form that allocates no more than ``eager`` plus the headroom; None if there
    is none (``segment.kernel`` says why)."""
    # the eager form first, before compiling: on a CPU, ATen's ops raise on bad
    # indices where a compiled kernel's check inside a parallel loop aborts the
    # process; and such a run is not cut in parts, which would hand one part's
    # bad indices to the next, compiled
    try:
        peak_e, final_e = run_allocations(eager, segment, device)
    except _DEVICE_FAILURES:
        raise
    except Exception as exc:  # noqa: BLE001 - any op's own error on made-up data
        segment.kernel = f"eager: it fails on made-up inputs ({first_line(exc)})"
        log.info("inductor: %s (steps %s): %s", segment.name, segment.steps, segment.kernel)
        return None
    code = segment.graph.code
    try:
        if code in _COMPILE_TIMED_OUT:
            raise CompileTimeout("compiling the same graph timed out before in this process")
        with compile_time_limit():
            compiled = compile_segment(segment, device)
    except Exception as exc:  # an op Inductor cannot take: this run stays eager
        if timed_out(exc):
            _COMPILE_TIMED_OUT.add(code)
        segment.kernel = f"eager: Inductor failed: {first_line(exc)}"
        log.warning(
            "inductor: %s (steps %s) stays eager: %s", segment.name, segment.steps, segment.kernel
        )
        return None
    try:
        peak_c, final_c = run_allocations(compiled, segment, device)
    except _DEVICE_FAILURES:
        raise
    except Exception as exc:  # noqa: BLE001 - the eager form ran: not the inputs' doing
        segment.kernel = f"eager: compiled it fails where eager runs ({first_line(exc)})"
        log.warning(
            "inductor: %s (steps %s) stays eager: %s", segment.name, segment.steps, segment.kernel
        )
        return None
    spare = headroom(segment)
    if peak_c <= peak_e + spare and final_c <= final_e:
        segment.kernel = "inductor"
        segment.allocations = (peak_e, peak_c)
        return compiled
    segment.kernel = (
        f"eager: compiled it allocates more (peak {peak_c:,} vs {peak_e:,} bytes "
        f"+ {spare:,} spare, end {final_c:,} vs {final_e:,})"
    )
    parts = split_run(segment) if splits > 0 else None
    if parts is None:
        return None
    forms = []
    for part in parts:
        part_eager = eager_function(part, ops)
        form = None
        if _compute_ops(part.items) >= MIN_COMPUTE_OPS:
            form = _fitting_form(part, part_eager, device, ops, headroom, splits - 1)
        else:
            part.kernel = "eager: too short to compile"
        forms.append(form or part_eager)
    compiled_ops = sum(p.compiled_ops for p in parts)
    if compiled_ops == 0:
        return None
    whole = segment.kernel.removeprefix("eager: ")
    segment.parts = parts
    segment.kernel = (
        f"inductor in {len(leaf_runs([segment]))} parts ({compiled_ops} of {segment.num_ops} ops "
        f"compiled; whole, {whole})"
    )
    return _run_parts(segment, forms)


def leaf_runs(segments: Sequence[Segment]) -> list[Segment]:
    """The runs as called: each segment, or its parts (recursively)."""
    return [leaf for s in segments for leaf in (leaf_runs(s.parts) if s.parts else [s])]


def composed_levels(
    segments: Sequence[Segment], op_timeline: Sequence[int], between_ops_timeline: Sequence[int]
) -> list[int]:
    """The highest bytes the executor holds at each step with ``segments``
    compiled as chosen.

    Per step: the resident bytes between ops (memory steps, never in a compiled
    run), and while its op runs: the replay's bytes (``op_timeline``) where no
    compiled run covers the step, else the run's bytes before it (the replay's
    highest over the run less what the run allocated eagerly) plus what it
    allocated compiled. Why this is what the meter sees: the eager executor's
    timeline is the meter's to a few bytes (see
    ``planner.codegen.assemble.run_headroom``), and the compiled run was measured
    on inputs of its layouts by the same meter."""
    compiled: dict[int, int] = {}  # step -> the highest level of a compiled run there
    for leaf in leaf_runs(segments):
        first, last = leaf.steps
        if leaf.kernel != "inductor" or leaf.allocations is None or first < 0:
            continue
        eager_peak, compiled_peak = leaf.allocations
        level = max(op_timeline[first : last + 1]) - eager_peak + compiled_peak
        for t in range(first, last + 1):
            compiled[t] = max(level, compiled.get(t, level))
    return [
        max(compiled.get(t, at_op), between)
        for t, (at_op, between) in enumerate(zip(op_timeline, between_ops_timeline))
    ]


def split_run(segment: Segment) -> list[Segment] | None:
    """``segment`` cut in two at the step nearest the middle of its ops, each half
    a run of its own; None if it cannot be (too few ops, or a half would read a
    value the run does not have). Why: Inductor's buffer planning can hold a few
    more buffers than the eager run around one op (a BatchNorm backward, whose
    eager form writes into its dying input), and one such op left a whole 39-op
    backward run of the CNN eager; cut in parts, the rest compiles. Donation is
    off in the parts: a later part may read another view of a donated buffer."""
    items, layout_of = segment.items, segment.layout_of
    computing = [i for i, it in enumerate(items) if _computes(it)]
    if layout_of is None or len(computing) < 2:
        return None
    middle = computing[len(computing) // 2]  # the first op of the second half
    # back to its step's comment, so a step's lines stay together
    step_line = step_line_at_or_before(items, middle)
    cut = step_line[0] if step_line is not None and step_line[0] > computing[0] else middle
    # the step each half's first ops belong to, should they come before its first
    # step comment (the cut inside a step, or the run begun inside one)
    inside = step_line_at_or_before(items, cut - 1)
    starts = (segment.steps[0], inside[1] if inside is not None else segment.steps[0])
    parts = []
    for k, half in enumerate((items[:cut], items[cut:])):
        built = _build(half, f"{segment.name}{'ab'[k]}", layout_of, starts[k])
        if built is None:
            return None
        part = built[0]
        part.donated = []
        parts.append(part)
    available = set(segment.inputs)
    for part in parts:
        if not set(part.inputs) <= available:
            return None
        available |= set(part.results)
    if not set(segment.results) <= available:
        return None
    return parts


def _run_parts(segment: Segment, forms: list[Callable[[list], list]]) -> Callable[[list], list]:
    """One callable, called like the run's (a list of its inputs, emptied), that
    calls its parts in turn, each with its own inputs, dropping what a part frees
    before calling it."""
    parts = segment.parts

    def run(args: list) -> list:
        env = dict(zip(segment.inputs, args))
        args.clear()
        for part, form in zip(parts, forms):
            for name in part.early:
                env.pop(name, None)
            part_args = [env[n] for n in part.inputs]
            for i in part.freed:
                del env[part.inputs[i]]
            env.update(zip(part.results, form(part_args)))
        return [env[n] for n in segment.results]

    return run


def kernels_summary(segments: Sequence[Segment], op_calls: int) -> dict[str, Any]:
    """What ran compiled, for the report: runs and ops, and why runs stayed eager
    (reasons without their byte counts, so that like ones group)."""
    compiled = [s for s in segments if s.compiled_ops]
    reasons = Counter(
        re.sub(r" \(.*", "", s.kernel.removeprefix("eager: "))
        for s in segments
        if not s.compiled_ops
    )
    return {
        "runs": len(segments),
        "compiled": len(compiled),
        "in_parts": sum(1 for s in compiled if s.parts),
        "ops": op_calls,
        "compiled_ops": sum(s.compiled_ops for s in compiled),
        "eager_reasons": dict(reasons),
    }
