"""Channels-last activations for convolutions, as TorchInductor lays them out.

Why: a convolution's kernels are faster on channels-last (NHWC) tensors than on
the NCHW ones a model traces with: oneDNN on the CPU works in an NHWC-like
layout and converts NCHW tensors on every call (a stride-2 3x3 backward on 8x16
channels of 32x32: 0.86 ms in NCHW, 0.20 ms channels-last, on a 2-core CPU).
Inductor lays a graph with convolutions out channels-last for the same reason
(its layout optimization, ``GraphLowering.decide_layout_opt``; on a CPU with
oneDNN, whenever a graph has a convolution). Compiled runs of a plan cannot get
this on their own: each run keeps the layouts the graph was traced with at its
edges, so a run with a convolution would convert its inputs and outputs, and the
convolutions left eager would not. Measured on the CNN example's training step
at a 5 MiB budget, with compiled runs: 10.5 ms with this rewrite against 11.6 ms
without.

What: ``channels_last_convolutions`` rewrites the captured graph so that every
4-D convolution (forward and backward) takes a channels-last activation and
weight. Where one is not channels-last it inserts a copy,
``clone(x, memory_format=channels_last)``: one per use for a placeholder (a
weight or the image, held anyway, so the copy lives for one call), else one shared
by the forward convolution and the backward one. The ops after a convolution
then keep channels-last on their own (BatchNorm, ReLU, pooling, additions follow
their input's layout). Graph outputs (the parameters' gradients, an inference
output) are copied back to their traced layout, so ``.grad`` and outputs land as
in eager. The copies are ordinary ops that the plan places and may recompute like
any other. Memory drops too: NCHW convolutions on oneDNN allocate conversion
buffers (the UNet example's smallest feasible budget: 5.5 MB for inference and
8.8 MB for training in NCHW, 4.4 and 5.7 MB with this rewrite).

When: only for ``kernels="inductor"`` (a compiled plan is not bit-identical to
eager anyway; an eager-kernel plan must be), and only where Inductor itself would
use channels-last for the graph (``_wants_channels_last``).

Why it is checked against real kernels: the plan and the compiled runs trust the
fake strides, and a kernel that returns another layout than its fake kernel
promises would break a compiled run's input assertion at run time (see
``layout.py`` for one such kernel). Every op whose layout the rewrite changed is
run once on random inputs of its new layout, and the rewrite is dropped if any
returns other strides.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

from planner.errors import first_line
from planner.ir.layout import propagate_fake_values
from planner.ir.meta import fake_value, random_inputs

log = logging.getLogger(__name__)

_aten = torch.ops.aten
#: op -> positions of the tensors it convolves: the activation and the weight.
#: oneDNN takes its channels-last path when the activation is channels-last, but
#: reorders an NCHW weight on every call (a 64-channel 3x3 backward on 8x8
#: images: 238 us with both channels-last, 289 us with the activation only)
CONV_INPUTS = {
    _aten.convolution.default: (0, 1),
    _aten.convolution_backward.default: (1, 2),
    # an exported inference graph keeps these composites whole
    _aten.conv2d.default: (0, 1),
    _aten.conv_transpose2d.input: (0, 1),
}
#: Rounds of copying inputs and propagating layouts before the rest go at once.
MAX_ROUNDS = 8
#: the forward convolutions among them
FORWARD_CONVS = (_aten.convolution.default, _aten.conv2d.default, _aten.conv_transpose2d.input)


def channels_last_convolutions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` rewritten (a new GraphModule; ``gm`` itself is left alone) so that
    its convolutions take channels-last inputs, or ``gm`` when there is nothing to
    do, Inductor would not use channels-last, or a kernel disagrees with the fake
    layouts after the rewrite (logged)."""
    if not _wants_channels_last(gm):
        return gm
    try:
        return _rewritten(gm)
    except Exception as exc:  # noqa: BLE001 - an optimization: any failure leaves gm
        # e.g. a view traced on the NCHW layout that the channels-last one cannot
        # take (Swin's attention output, reshaped after its patch embedding's conv)
        log.info("channels-last convolutions dropped: %s", first_line(exc))
        return gm


def _rewritten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The rewrite itself (see ``channels_last_convolutions``); raises where the
    new layouts cannot be propagated through the graph."""
    graph = torch.fx.Graph()
    old_to_new: dict[torch.fx.Node, torch.fx.Node] = {}
    out_node = graph.graph_copy(gm.graph, old_to_new)  # meta dicts are copied shallowly
    graph.output(out_node)
    new = torch.fx.GraphModule(gm, graph)
    before = {old_to_new[n]: _strides(fake_value(n)) for n in gm.graph.nodes if n.op != "output"}
    mode = _fake_mode(new)
    inserted: dict[tuple[torch.fx.Node, torch.fx.Node | None], torch.fx.Node] = {}
    # Placeholders' layouts (weights, the image) never change: all at once. Any
    # other input may turn channels-last once an earlier one is: the first alone,
    # then the layouts after it are propagated again; after MAX_ROUNDS rounds (each
    # propagates the whole graph), every one left at once.
    for round_ in range(MAX_ROUNDS):
        found = _non_channels_last_inputs(new.graph, every=round_ == MAX_ROUNDS - 1)
        if not found:
            break
        for conv, position in found:
            source = conv.args[position]
            assert isinstance(source, torch.fx.Node)
            # a placeholder (a weight, the image) is held anyway: a copy per use
            # lives for that use alone. Another tensor's copy is shared, and its
            # NCHW original may then die early.
            key = (source, conv) if source.op == "placeholder" else (source, None)
            if key not in inserted:
                with new.graph.inserting_before(conv):
                    inserted[key] = new.graph.call_function(
                        _aten.clone.default, (source,), {"memory_format": torch.channels_last}
                    )
            conv.update_arg(position, inserted[key])
        propagate_fake_values(new, mode)
    if not inserted:
        return gm
    if not _restore_output_layouts(new, before):
        return gm
    new.graph.lint()
    propagate_fake_values(new, mode)
    changed = [
        n
        for n in new.graph.nodes
        if n.op == "call_function" and n in before and _strides(fake_value(n)) != before[n]
    ]
    mismatch = _first_real_layout_mismatch(changed)
    if mismatch is not None:
        log.info(
            "channels-last convolutions dropped: %s does not keep the traced strides", mismatch
        )
        return gm
    log.info(
        "channels-last convolutions: %d input copies, %d ops change layout",
        len(inserted),
        len(changed),
    )
    return new


def _wants_channels_last(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph has a 4-D convolution and Inductor would lay it out
    channels-last. Inductor's heuristic counts only ``aten.convolution`` nodes,
    which an exported graph's ``conv2d`` becomes only when Inductor decomposes it;
    its first rule (on a CPU with oneDNN, always) is applied to those here."""
    from torch._inductor import config

    convs = [n for n in gm.graph.nodes if n.target in FORWARD_CONVS]
    inputs = [fake_value(n.args[0]) for n in convs]
    if not config.layout_optimization or not any(
        isinstance(x, torch.Tensor) and x.dim() == 4 for x in inputs
    ):
        return False
    if (
        torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
        and all(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in inputs)
    ):
        return True
    try:
        from torch._inductor.graph import GraphLowering

        return bool(GraphLowering.decide_layout_opt(gm, is_inference=False))
    except Exception as exc:  # a private heuristic: no opinion, no rewrite
        log.debug("channels-last convolutions: Inductor's heuristic failed: %s", exc)
        return False


def _non_channels_last_inputs(
    graph: torch.fx.Graph, every: bool = False
) -> list[tuple[torch.fx.Node, int]]:
    """Convolution inputs (op, argument position) to copy channels-last in this
    round: every one that is a placeholder, else the first other one (``every``:
    all of them)."""
    found: list[tuple[torch.fx.Node, int]] = []
    for node in graph.nodes:
        for position in CONV_INPUTS.get(node.target, ()):  # type: ignore[arg-type]
            source = node.args[position]
            value = fake_value(source)
            if (
                not isinstance(value, torch.Tensor)
                or value.dim() != 4
                or value.is_contiguous(memory_format=torch.channels_last)
            ):
                continue
            if source.op != "placeholder" and not every:
                # an earlier placeholder's copy may make this one channels-last
                return found or [(node, position)]
            found.append((node, position))
    return found


def _restore_output_layouts(
    gm: torch.fx.GraphModule, before: dict[torch.fx.Node, tuple | None]
) -> bool:
    """Copy each graph output whose layout changed back to its traced one (dense:
    contiguous or channels-last), right where it is made; False if one had
    another layout."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    restored: dict[torch.fx.Node, torch.fx.Node] = {}

    def restore(x: Any) -> Any:
        if not isinstance(x, torch.fx.Node) or _strides(fake_value(x)) == before.get(x):
            return x
        if x not in restored:
            value = fake_value(x)
            traced = torch.empty_strided(value.shape, before[x][1], device="meta")  # type: ignore[index]
            formats = [
                f
                for f in (torch.contiguous_format, torch.channels_last)
                if traced.is_contiguous(memory_format=f)
            ]
            if not formats:
                raise _KeepTraced(x.name)
            with gm.graph.inserting_after(x):  # the changed layout dies at once
                restored[x] = gm.graph.call_function(
                    _aten.clone.default, (x,), {"memory_format": formats[0]}
                )
        return restored[x]

    try:
        output.args = torch.fx.node.map_aggregate(output.args, restore)
    except _KeepTraced as exc:
        log.info("channels-last convolutions dropped: output %s has an unusual layout", exc)
        return False
    return True


class _KeepTraced(Exception):
    pass


def _strides(value: Any) -> tuple | None:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.stride()))
    if isinstance(value, (tuple, list)):
        return tuple(_strides(v) for v in value)
    return None


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"])
    assert mode is not None, "captured graphs record fake values"
    return mode


def _first_real_layout_mismatch(nodes: list[torch.fx.Node]) -> str | None:
    """The first of ``nodes`` whose kernel, run on random inputs of the traced
    layouts, returns tensors of other strides than traced (dims of size one
    aside), or cannot run on such inputs (then its layout is unchecked); None if
    all agree."""
    for node in nodes:
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        value = fake_value(node)
        first = value[0] if isinstance(value, (tuple, list)) else value
        if not isinstance(first, torch.Tensor):
            continue
        try:
            args, kwargs = random_inputs(node, first.device.type)
            with torch.no_grad():
                real = node.target(*args, **kwargs)
        except Exception as exc:  # an op that needs real data: its layout is unchecked
            return f"{node.format_node()} (failed on random inputs: {exc})"
        if not _same_layouts(real, fake_value(node)):
            return node.format_node()
    return None


def _same_layouts(real: Any, fake: Any) -> bool:
    if isinstance(fake, torch.Tensor):
        if not isinstance(real, torch.Tensor) or real.shape != fake.shape:
            return False
        return all(
            size == 1 or a == b for size, a, b in zip(fake.shape, real.stride(), fake.stride())
        )
    if isinstance(fake, (tuple, list)):
        return isinstance(real, (tuple, list)) and all(
            _same_layouts(r, f) for r, f in zip(real, fake)
        )
    return True
