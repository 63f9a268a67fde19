"""Plan + IR -> the executor's Python source.

The generated function runs the ops in schedule order with the plan's memory
steps between them, one commented block per step, so a user can print it and
follow it. Tensors are plain local variables: ``del`` frees one exactly where the
plan frees its storage (every variable of the storage, views included, goes at
once). After a storage comes back (prefetch, recompute, dequantize) its views are
re-derived from the new base on first use by replaying the view ops, so no stale
view can pin an evicted storage.
"""

from __future__ import annotations

import keyword
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from planner.codegen.in_place_updates import WRITTEN_IN_PLACE
from planner.codegen.layout_ops import AS_TRACED
from planner.codegen.segments import (
    DelLine,
    Layout,
    OpLine,
    Segment,
    Var,
    compilable_target,
    fold_segments,
    joins_run,
    step_line_at_or_before,
)
from planner.errors import PlannerValueError
from planner.ir.grad_mode_ops import needs_grad_mode, with_grad_mode
from planner.ir.meta import FX_NODE_NAMES, PARAM_GRADS, fake_value, op_name_parts
from planner.ir.program import Program, ValueKind
from planner.runtime.copy_engine import CPU, completes_at_issue
from planner.runtime.fused import reads_exact_rows
from planner.solver.plan import Action, Plan
from planner.solver.problem import Problem
from planner.solver.translate import ROWS_WRITTEN

#: How the executor runs ops: one eager ATen call each, or runs of them as
#: TorchInductor graphs.
KERNELS = ("eager", "inductor")


def check_kernels(kernels: object) -> None:
    """Refuse a ``kernels=`` value other than those of ``KERNELS``."""
    if kernels not in KERNELS:
        raise PlannerValueError(
            f"kernels must be one of {', '.join(map(repr, KERNELS))}, got {kernels!r}: "
            f"'eager' for bit-identical results, 'inductor' for fused kernels"
        )


@dataclass
class Executor:
    """Generated source and what calling it needs."""

    source: str
    function_name: str
    ops: dict[str, Any]  # global name -> op callable
    state_values: list[int]  # value index of each device-resident persistent input
    input_values: list[int]  # value index of each user input, in flat order
    tangent_values: list[int] = field(default_factory=list)
    #: training: the backward function (the forward one returns its carry)
    backward_function_name: str | None = None
    #: weights stored quantized on the device: (value index, format); their
    #: ``Quantized`` objects follow the tensors of ``state_values`` in ``state``
    stored_values: list[tuple[int, str]] = field(default_factory=list)
    #: kernels="inductor": the runs of ops the source calls as compiled graphs
    #: (``segment_0``, ...), to compile before the source runs
    segments: list[Segment] = field(default_factory=list)
    #: op calls, recomputes and view re-derivations included (``segments`` hold a share)
    op_calls: int = 0
    #: resident bytes per step as this source runs the plan (the plan's timeline,
    #: plus reads it makes early); empty if the plan has none
    timeline: list[int] = field(default_factory=list)
    #: the same while ops run, and between them (``Plan.op_timeline``, ...)
    op_timeline: list[int] = field(default_factory=list)
    between_ops_timeline: list[int] = field(default_factory=list)


def touches_host_tensors(node: torch.fx.Node, device: torch.device) -> bool:
    """Whether ``node`` reads or makes a CPU tensor while the executor runs on
    another device: an ATen op takes a CPU scalar beside CUDA tensors (a
    ``torch.tensor(8.0)`` made in ``forward``), but a compiled run is specialized to
    inputs on the run's device, and its kernels would get the host pointer."""
    if device.type == "cpu":
        return False
    for n in (node, *node.all_input_nodes):
        value = n.meta.get("val")
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                return True
    return False


class ReadNow(str):
    """A line that reads a copy back at once (``rt.read_now``), with the bytes it
    brings: ``_Emitter.read_early`` may move it up to where a compiled run
    starts, so that it does not split that run in two."""

    nbytes: int

    def __new__(cls, line: str, nbytes: int) -> ReadNow:
        self = super().__new__(cls, line)
        self.nbytes = nbytes
        return self


def _ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit() or keyword.iskeyword(s):
        s = "v_" + s
    return s


def format_arg(x: Any, name_of: Any, constant: Any = None) -> str:
    """A Python expression for an FX argument. ``constant``: given a
    ``torch.device``, the name of a global the executor binds to it once (built in
    the expression, ``torch.device('cpu')`` was made again at every call: 0.2 us
    each, 7 per call of a small GPT-2)."""
    if isinstance(x, torch.fx.Node):
        return name_of(x)
    if isinstance(x, Var):
        return x.name
    if isinstance(x, (list, tuple)):
        inner = ", ".join(format_arg(a, name_of, constant) for a in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner}{',' if len(x) == 1 else ''})"
    if isinstance(x, dict):
        return (
            "{"
            + ", ".join(f"{k!r}: {format_arg(v, name_of, constant)}" for k, v in x.items())
            + "}"
        )
    if isinstance(x, float):
        if math.isinf(x):
            return "float('inf')" if x > 0 else "float('-inf')"
        if math.isnan(x):
            return "float('nan')"
        return repr(x)
    if isinstance(x, complex):  # ``h * 1j``: the parts as floats are (inf, nan too)
        return f"complex({format_arg(x.real, name_of)}, {format_arg(x.imag, name_of)})"
    if isinstance(x, torch.device):
        return constant(x) if constant is not None else f"torch.device({str(x)!r})"
    if isinstance(x, (torch.dtype, torch.layout, torch.memory_format)):
        return str(x)
    if isinstance(x, (int, bool, str, type(None))):
        return repr(x)
    raise TypeError(f"cannot emit argument {x!r} of type {type(x).__name__}")


class _Emitter:
    def __init__(
        self,
        program: Program,
        gm: torch.fx.GraphModule,
        problem: Problem,
        plan: Plan,
        kernels: str = "eager",
        device: torch.device = CPU,
    ) -> None:
        check_kernels(kernels)
        self.kernels = kernels
        self.device = device
        #: resident bytes per step: the plan's, plus reads moved up (``read_early``);
        #: a plan saved before the validator told ops from the moments between has
        #: only the overall timeline, which then stands for both
        self.timeline = list(plan.timeline)
        self.op_timeline = list(plan.op_timeline or plan.timeline)
        self.between_ops_timeline = list(plan.between_ops_timeline or plan.timeline)
        self.program = program
        self.problem = problem
        self.plan = plan
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.op_nodes = [self.nodes[n] for n in program.meta[FX_NODE_NAMES]]
        self.value_by_name = {v.name: v.index for v in program.values}
        #: source lines, op calls (``OpLine``) and frees (``DelLine``) in order;
        #: ``_render`` turns them into the source
        self.lines: list[Any] = []
        self.ops: dict[str, Any] = {}
        self.var: dict[int, str] = {}  # value -> variable holding it now
        self.storage_vars: dict[int, list[str]] = defaultdict(list)
        self.handles: dict[int, str] = {}  # storage -> pending copy variable
        self.quantized: dict[int, str] = {}
        self.stored: dict[int, str] = {}  # storage -> variable of its stored codes
        self.writing: set[int] = set()  # storages with an offload's write in flight
        self.quantized_in_tier: set[int] = set()  # storages whose tier copy is quantized
        self.delivered: set[int] = set()  # gradients handed to their parameter already
        self.homes = {d.name: d.home for d in plan.tensors}
        #: updates whose rows were written over their buffer's home at their op
        self.rows_written: set[int] = set()
        self.read_at_once: set[int] = set()  # this step's reads waited for right away
        #: storages whose copy was made when issued (``read_now``/``write_now``):
        #: their wait has nothing to wait for, and emits no line (a line would split
        #: a compiled run of ops in two)
        self.done_at_once: set[int] = set()
        # the returned value (a gradient) held by each storage, for ``deliver``
        self.returned_value = {program.values[v].storage: v for v in program.outputs}
        self.versions: dict[str, int] = defaultdict(int)
        # every value's own name is reserved up front so versions cannot collide
        self.used: set[str] = {"rt", "state", "inputs", "carry", "tangents", "torch"}
        self.reserved = {_ident(v.name) for v in program.values}
        self.storage_by_name = {t.name: t.index for t in problem.tensors}

    # -- names -------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        """A new variable name: the value's own name the first time, then
        ``name__v2``, ... never one that another value uses."""
        ident = _ident(base)
        name = ident
        while name in self.used or (name != ident and name in self.reserved):
            self.versions[ident] += 1
            name = f"{ident}__v{self.versions[ident] + 1}"
        self.used.add(name)
        return name

    def _op_name(self, target: Any, runs_as: Any = None) -> str:
        """The executor's name for ``target``, bound to the function that runs it:
        ``runs_as`` if given, else ``target`` (a few ops run into the layout their
        trace recorded, ``layout_ops``)."""
        if isinstance(target, torch._ops.OpOverload):
            name = _ident("_".join(op_name_parts(target)))
        else:
            name = _ident("op_" + getattr(target, "__name__", "op"))
        fn = runs_as or AS_TRACED.get(target, target)
        while name in self.ops and self.ops[name] is not fn:
            name += "_"
        self.ops[name] = fn
        return name

    def _constant(self, value: torch.device) -> str:
        """The executor's global name for the constant ``value`` (a device), bound
        once with its ops (``device_cpu``): the executor and a compiled run's eager
        twin read that object, not one made at each call."""
        name = _ident(f"device_{value}")
        while name in self.reserved or (name in self.used and self.ops.get(name) != value):
            name += "_"
        self.used.add(name)  # no variable takes it (a local would hide the global)
        self.ops[name] = value
        return name

    def _bind(self, value: int, var: str) -> None:
        self.var[value] = var
        self.storage_vars[self.program.values[value].storage].append(var)

    def _expr(self, value: int) -> str:
        """The variable holding ``value``, re-deriving a view from its base if the
        storage came back since the view was made."""
        if value in self.var:
            return self.var[value]
        v = self.program.values[value]
        base = self.program.storages[v.storage].base
        if v.is_view and v.producer is None and base in self.var:
            # a second graph input over the same storage (a tied weight): same tensor
            self._bind(value, self.var[base])
            return self.var[value]
        if not v.is_view or v.producer is None:
            raise AssertionError(
                f"codegen: {v.name} is not resident (the plan was validated, so this is a "
                f"codegen bug)"
            )
        self._emit_call(
            v.producer, only_storage=v.storage, indent="    ", comment=f"re-derive view {v.name}"
        )
        return self.var[value]

    # -- emission -----------------------------------------------------------
    def emit(self) -> Executor:
        program, plan = self.program, self.plan
        before: dict[int, list[Action]] = defaultdict(list)
        after: dict[int, list[Action]] = defaultdict(list)
        for a in plan.actions:
            (before if a.when == "before" else after)[a.step].append(a)
        state_values, input_values, tangent_values = [], [], []
        stored_values: list[tuple[int, str]] = []
        stored_storages: set[int] = set()
        for vi in program.inputs:
            v = program.values[vi]
            name = self.problem.tensors[v.storage].name
            home = self.homes.get(name, "device")
            if v.kind is ValueKind.TANGENT:
                tangent_values.append(vi)
            elif v.kind is ValueKind.INPUT:
                input_values.append(vi)
            elif home == "device":
                state_values.append(vi)
            elif home.startswith("device:") and v.storage not in stored_storages:
                # stored quantized: once per storage (a tied weight has two names)
                stored_values.append((vi, home.split(":", 1)[1]))
                stored_storages.add(v.storage)
            elif ":" in home:  # its tier holds it quantized: reads bring codes
                self.quantized_in_tier.add(v.storage)
        body = self.lines
        train = program.mode == "train"
        split = program.backward_start() if train else len(program.ops)
        header = (
            "def planned_forward(rt, state, inputs):"
            if train
            else "def planned(rt, state, inputs):"
        )
        body.append(header)
        op_level = (
            f" (solved op by op for {plan.op_level_budget_bytes:,}: compiled runs hold less)"
            if plan.op_level_budget_bytes
            else ""
        )
        body.append(
            f'    """Planned executor: {len(program.ops)} steps, budget '
            f"{plan.budget_bytes:,} bytes{op_level}, predicted peak "
            f'{plan.predicted_peak_bytes:,} op by op."""'
        )
        state_group = f"state[:{len(state_values)}]" if stored_values else "state"
        for group, values in ((state_group, state_values), ("inputs", input_values)):
            if values:
                names = [self._fresh(program.values[vi].name) for vi in values]
                for vi, n in zip(values, names):
                    self._bind(vi, n)
                body.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = {group}")
        if stored_values:
            names = [self._fresh(f"q_{program.values[vi].name}") for vi, _ in stored_values]
            for (vi, _), n in zip(stored_values, names):
                self.stored[program.values[vi].storage] = n
            body.append(
                f"    {', '.join(names)}{',' if len(names) == 1 else ''} = "
                f"state[{len(state_values)}:]  # weights stored quantized"
            )
        self._emit_steps(range(0, split), before, after)
        if not train:
            outs = [
                "None" if program.values[v].storage in self.delivered else self._expr(v)
                for v in program.outputs
            ]
            if self.delivered:
                body.append("    # None: a buffer's update already written back to its home")
            body.append(f"    return [{', '.join(outs)}]")
            source, segments, op_calls = self._render()
            return Executor(
                source,
                "planned",
                self.ops,
                state_values,
                input_values,
                tangent_values,
                stored_values=stored_values,
                segments=segments,
                op_calls=op_calls,
                timeline=self.timeline,
                op_timeline=self.op_timeline,
                between_ops_timeline=self.between_ops_timeline,
            )
        forward_outs = [self._expr(v) for v in program.outputs[: program.num_forward_outputs]]
        carry = list(
            dict.fromkeys(
                [n for names in self.storage_vars.values() for n in names]
                + list(self.handles.values())
                + list(self.quantized.values())
                # frozen weights stored quantized (training): the backward reads them too
                + list(self.stored.values())
            )
        )
        body.append("    # forward done: what the backward needs crosses in `carry`")
        body.append(f"    return [{', '.join(forward_outs)}], [{', '.join(carry)}]")
        body.append("")
        body.append("")
        body.append("def planned_backward(rt, carry, tangents):")
        body.append(
            '    """The backward half: carry from planned_forward, tangents = incoming '
            'output gradients."""'
        )
        if carry:
            body.append(f"    {', '.join(carry)}{',' if len(carry) == 1 else ''} = carry")
        body.append("    carry.clear()  # the caller's list must not keep freed tensors alive")
        if tangent_values:
            names = [self._fresh(program.values[vi].name) for vi in tangent_values]
            for vi, n in zip(tangent_values, names):
                self._bind(vi, n)
            body.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = tangents")
        self._emit_steps(range(split, len(program.ops)), before, after)
        grads = [
            "None" if program.values[v].storage in self.delivered else self._expr(v)
            for v in program.outputs[program.num_forward_outputs :]
        ]
        if self.delivered:
            body.append("    # None: a gradient already delivered to its parameter's .grad")
        body.append(f"    return [{', '.join(grads)}]")
        source, segments, op_calls = self._render()
        return Executor(
            source,
            "planned_forward",
            self.ops,
            state_values,
            input_values,
            tangent_values,
            "planned_backward",
            stored_values=stored_values,
            segments=segments,
            op_calls=op_calls,
            timeline=self.timeline,
            op_timeline=self.op_timeline,
            between_ops_timeline=self.between_ops_timeline,
        )

    def _render(self) -> tuple[str, list[Segment], int]:
        """The source, with runs of ops folded into compiled segments if asked,
        and the number of op calls it makes."""
        layout_of = self._layout if self.kernels == "inductor" else None
        if layout_of is not None:
            self.read_early()
        lines, segments = fold_segments(self.lines, layout_of)
        op_calls = sum(isinstance(line, OpLine) for line in self.lines)
        return "\n".join(lines) + "\n", segments, op_calls

    def read_early(self) -> None:
        """Move each read made at once (``ReadNow``) up to the start of the run of
        ops before it, where the plan has room for its bytes over the steps it
        moves across: a memory step between two runs of ops splits what Inductor
        could compile as one graph, and each run is a call and a fusion boundary
        (the training benchmark's CNN at 50% of its peak: 11 runs instead of 15).
        The room is the plan's predicted peak (or its budget, if lower: a
        plan solved op by op for more, ``planner.measured_room``), so the plan's
        numbers still hold; ``self.timeline`` (the plan's resident bytes per
        step) gains the moved bytes, for the compiled runs' spare room."""
        lines = self.lines
        timeline = self.timeline
        if not timeline:
            return
        cap = min(self.plan.predicted_peak_bytes, self.plan.budget_bytes)

        def step_at_or_before(i: int) -> tuple[int, int]:
            return step_line_at_or_before(lines, i) or (-1, 0)

        for i in range(len(lines)):
            read = lines[i]
            if not isinstance(read, ReadNow):
                continue
            j = i - 1  # the nearest line that ends a run: where the read may go
            while j >= 0 and joins_run(lines[j]):
                j -= 1
            if not any(isinstance(lines[k], OpLine) for k in range(j + 1, i)):
                continue  # no op to move across
            own_line, own_step = step_at_or_before(i)
            before_own_op = not any(isinstance(lines[k], OpLine) for k in range(own_line, i))
            last = own_step - 1 if before_own_op else own_step  # resident there already
            first = step_at_or_before(j + 1)[1]
            steps = range(first, last + 1)
            if not steps or max(timeline[t] for t in steps) + read.nbytes > cap:
                continue
            for t in steps:  # held through the ops it moves across, and between them
                timeline[t] += read.nbytes
                self.op_timeline[t] += read.nbytes
                self.between_ops_timeline[t] += read.nbytes
            lines.insert(j + 1, lines.pop(i))

    def _layout(self, value: int) -> Layout:
        """The traced layout of ``value``: what a compiled segment's input is
        specialized to."""
        name = self.program.values[value].name
        position = None
        if name not in self.nodes and name.endswith("]"):
            name, _, rest = name.rpartition("[")
            position = int(rest[:-1])
        fake = fake_value(self.nodes[name])
        if position is not None:
            fake = fake[position]
        return Layout(
            tuple(fake.shape),
            tuple(fake.stride()),
            fake.dtype,
            int(fake.storage_offset()),
            self.program.values[value].storage,
        )

    def _emit_steps(
        self, steps: range, before: dict[int, list[Action]], after: dict[int, list[Action]]
    ) -> None:
        for t in steps:
            op = self.program.ops[t]
            where = f"  # {op.stack}" if op.stack else ""
            self.lines.append(f"    # step {t}: {op.name} = {op.target}{where}")
            actions = before.get(t, [])
            waited = {a.tensor for a in actions if a.kind == "wait"}
            self.read_at_once = {
                self.storage_by_name[a.tensor]
                for a in actions
                if a.kind == "prefetch" and a.tensor in waited
            }
            for action in actions:
                self._emit_action(action)
            if self._view_of_absent(op):  # made from the storage when first read
                self.lines.append(f"    # {op.name}: a view, made when first read")
            else:
                self._emit_call(t, only_storage=None, indent="    ")
            for action in after.get(t, []):
                self._emit_action(action)

    def _view_of_absent(self, op: Any) -> bool:
        """Whether ``op`` only makes views of a storage the plan does not hold now
        (view steps are not uses, see ``translate._view_steps``)."""
        values = self.program.values
        if not self.program.makes_only_views(op):
            return False
        return any(
            vi not in self.var and not self.storage_vars.get(values[vi].storage) for vi in op.inputs
        )

    def _emit_call(
        self, step: int, only_storage: int | None, indent: str, comment: str | None = None
    ) -> None:
        """Emit op ``step``; with ``only_storage``, keep just its outputs in that
        storage (a recompute or a view re-derivation), dropping the rest."""
        op = self.program.ops[step]
        node = self.op_nodes[step]

        fused: list[str] = []

        def name_of(n: torch.fx.Node) -> Var:
            vi = self.value_by_name[n.name]
            storage = self.program.values[vi].storage
            codes = self.stored.get(storage) or self.quantized.get(storage)
            # (a view of a weight whose full copy is out now is made from that copy)
            if vi not in self.var and codes is not None and not self.storage_vars.get(storage):
                fused.append(codes)  # no full copy: the op reads the codes
                return Var(codes, vi)
            return Var(self._expr(vi), vi)

        arg_vars = torch.fx.node.map_arg(node.args, name_of)  # type: ignore[arg-type]
        kwarg_vars = torch.fx.node.map_arg(node.kwargs, name_of)  # type: ignore[arg-type]
        args = [format_arg(a, name_of, self._constant) for a in arg_vars]
        args += [f"{k}={format_arg(v, name_of, self._constant)}" for k, v in kwarg_vars.items()]
        reuse = self.problem.steps[step].reuse if only_storage is None else None
        if fused:  # the plan validated this op as a fused use of the stored weight
            call = f"rt.fused({op.target!r}, {', '.join(args)})"
            if reads_exact_rows(op.target, self.problem.tiers):
                comment = comment or "exact rows from its full copy on disk"
        elif reuse is not None:  # write the output into the dying input's buffer
            variant, out_arg = out_variant(node.target)
            # the op's own argument in that storage (all of it: the base or a
            # whole alias such as a detach), so a compiled run passes it in
            into_value = next(v for v in op.inputs if self.program.values[v].storage == reuse[0])
            into = self._expr(into_value)
            # a buffer's update: in place, not through a temporary the buffer's size
            name = self._op_name(variant, WRITTEN_IN_PLACE.get(node.target))
            call = f"{name}({', '.join(args)}, {out_arg}={into})"
        elif needs_grad_mode(node):
            call = f"{self._op_name(with_grad_mode(node.target))}({', '.join(args)})"
        else:
            call = f"{self._op_name(node.target)}({', '.join(args)})"
        outputs = [
            vi
            for vi in op.outputs
            if only_storage is None or self.program.values[vi].storage == only_storage
        ]
        note = f"  # {comment}" if comment else ""
        fake = node.meta.get("val")
        source: list[str] = []
        bound: list[tuple[int | None, str, int]] = []
        if isinstance(fake, (tuple, list)):
            tmp = self._fresh(f"{op.name}_out")
            source.append(f"{indent}{tmp} = {call}{note}")
            for vi in outputs:
                v = self.program.values[vi]
                position = (
                    int(v.name.rsplit("[", 1)[1][:-1])
                    if v.name.endswith("]")
                    else self._element_position(node, v.name)
                )
                var = self._fresh(v.name)
                source.append(f"{indent}{var} = {tmp}[{position}]")
                bound.append((position, var, vi))
            source.append(f"{indent}del {tmp}")
        elif outputs:
            var = self._fresh(self.program.values[outputs[0]].name)
            source.append(f"{indent}{var} = {call}{note}")
            bound.append((None, var, outputs[0]))
        else:
            source.append(f"{indent}{call}{note}")
        self.lines.append(
            OpLine(
                source,
                node.target,
                arg_vars,
                kwarg_vars,
                bound,
                # a buffer's update written into the buffer stays eager: compiled,
                # the run would make it in new memory (the buffer is not donated)
                compilable=bool(bound)
                and not fused
                and compilable_target(node.target)
                and not (reuse is not None and self._is_state(reuse[0]))
                and not touches_host_tensors(node, self.device)
                and not self._reads_kernel_sized(node)
                and not needs_grad_mode(node),
            )
        )
        if reuse is not None and bound and bound[0][0] is None:
            self._free(reuse[0], f"its buffer now holds {self.program.values[outputs[0]].name}")
        for _, var, vi in bound:
            self._bind(vi, var)
        if reuse is not None and bound and only_storage is None:
            self._write_rows_back(reuse[1], node, bound[0][1], arg_vars, name_of)

    def _element_position(self, node: torch.fx.Node, element_name: str) -> int:
        for user in node.users:
            if user.name == element_name:
                return int(user.args[1])  # type: ignore[arg-type]
        raise AssertionError(f"no getitem {element_name} of {node.name}")

    def _emit_action(self, a: Action) -> None:
        s = self.storage_by_name[a.tensor]
        base = self.program.storages[s].base
        key = repr(a.tensor)
        L = self.lines
        at_once = completes_at_issue(self.device, self.problem.tensors[s].nbytes)
        home = self._home_holding(s, a)
        if home is not None and a.kind == "offload":
            self.done_at_once.add(s)  # nothing to write: its buffer's home holds it
            return
        if home is not None:  # read back from there
            key = repr(home)
        if (
            a.kind == "prefetch"
            and (s in self.read_at_once or at_once)
            and s not in self.quantized_in_tier
        ):
            var = self._fresh(self.program.values[base].name)
            why = "needed now" if s in self.read_at_once else "a small copy, made at once"
            line = f"    {var} = rt.read_now({key}, {a.tier!r})  # from {a.tier}, {why}"
            L.append(ReadNow(line, nbytes=self.problem.tensors[s].nbytes))
            self._bind(base, var)
            self.done_at_once.add(s)
        elif a.kind == "wait" and s in self.done_at_once:
            self.done_at_once.discard(s)  # copied above, at once: nothing to wait for
        elif a.kind == "prefetch":
            h = self._fresh(f"pending_{self.program.values[base].name}")
            self.handles[s] = h
            codes = " (its codes)" if s in self.quantized_in_tier else ""
            L.append(f"    {h} = rt.prefetch({key}, {a.tier!r})  # {a.kind} from {a.tier}{codes}")
        elif a.kind == "wait":
            h = self.handles.pop(s)
            if s in self.writing:  # an offload's write: the device copy stays until free
                self.writing.discard(s)
                L.append(f"    rt.wait({h}); del {h}  # {a.tensor} written")
            elif s in self.quantized_in_tier:  # the tier holds it quantized
                q = self._fresh(f"q_{self.program.values[base].name}")
                L.append(f"    {q} = rt.wait({h}); del {h}  # {a.tensor} back, quantized")
                self.quantized[s] = q
            else:
                var = self._fresh(self.program.values[base].name)
                L.append(f"    {var} = rt.wait({h}); del {h}  # {a.tensor} back on the device")
                self._bind(base, var)
        elif a.kind == "offload" and at_once and s not in self.quantized:
            self.quantized_in_tier.discard(s)
            L.append(
                f"    rt.write_now({key}, {a.tier!r}, {self._expr(base)})  # a small copy, "
                f"made at once"
            )
            self.done_at_once.add(s)
        elif a.kind == "offload":
            h = self._fresh(f"pending_{self.program.values[base].name}")
            self.handles[s] = h
            self.writing.add(s)
            source = self.quantized.get(s)  # a quantized copy travels as such
            if source is None:
                self.quantized_in_tier.discard(s)
            else:
                self.quantized_in_tier.add(s)
            L.append(f"    {h} = rt.offload({key}, {a.tier!r}, {source or self._expr(base)})")
        elif a.kind == "free" and s in self.quantized:
            L.append(f"    del {self.quantized.pop(s)}  # free {a.tensor} (quantized)")
        elif a.kind == "free":
            self._free(s, f"free {a.tensor}")
        elif a.kind == "recompute":
            self._emit_recompute(s, a.tensor)
        elif a.kind == "quantize":
            q = self._fresh(f"q_{self.program.values[base].name}")
            L.append(f"    {q} = rt.quantize({self._expr(base)}, {a.tier!r}, {key})")
            self.quantized[s] = q
            self._free(s, f"keep {a.tensor} as {a.tier}")
        elif a.kind == "dequantize" and s in self.stored:
            var = self._fresh(self.program.values[base].name)
            L.append(f"    {var} = rt.dequantize({self.stored[s]})  # full copy for this use")
            self._bind(base, var)
        elif a.kind == "deliver" and self.problem.tensors[s].writes_home_of is not None:
            self._emit_write_back(s, a)
        elif a.kind == "deliver" and a.tier == "host":  # CUDA: copied in the background
            value = self.returned_value[s]
            param = self.program.meta.get(PARAM_GRADS, {}).get(value, "its parameter")
            h = self._fresh(f"pending_{self.program.values[base].name}")
            self.handles[s] = h
            self.writing.add(s)  # the device copy stays until its wait and free
            L.append(
                f"    {h} = rt.deliver({key}, {self._expr(value)})  # into {param}.grad (host)"
            )
            self.delivered.add(s)
        elif a.kind == "deliver":
            value = self.returned_value[s]
            param = self.program.meta.get(PARAM_GRADS, {}).get(value, "its parameter")
            L.append(f"    rt.deliver({key}, {self._expr(value)})  # into {param}.grad ({a.tier})")
            self.delivered.add(s)
            self._free(s, f"{a.tensor} delivered")
        elif a.kind == "dequantize":
            q = self.quantized.pop(s)
            var = self._fresh(self.program.values[base].name)
            L.append(f"    {var} = rt.dequantize({q}); del {q}")
            self._bind(base, var)
        else:
            raise ValueError(f"unknown action {a.kind!r}")

    def _home_holding(self, s: int, a: Action) -> str | None:
        """The key of the buffer whose home in ``a``'s tier holds update ``s`` already
        (its rows were written there at its op, ``_write_rows_back``): an offload
        of it between its uses then writes nothing, and its read comes from there."""
        if s not in self.rows_written or a.kind not in ("offload", "prefetch"):
            return None
        buffer = self.problem.tensors[self.problem.tensors[s].writes_home_of]  # type: ignore[index]
        return buffer.name if self.homes.get(buffer.name) == a.tier else None

    def _write_rows_back(
        self, s: int, node: torch.fx.Node, var: str, arg_vars: Any, name_of: Any
    ) -> None:
        """An update homed in a tier whose op writes rows (``ROWS_WRITTEN``: a
        cache's new token) has just those rows written over the tier's copy as the
        op makes them (on CUDA copied down in the background); its write-back then
        only frees it."""
        tensor = self.problem.tensors[s]
        if tensor.writes_home_of is None or not tensor.write_back_bytes:
            return
        buffer = self.problem.tensors[tensor.writes_home_of]
        tier = self.homes.get(buffer.name, "device")
        if tier == "device":
            return
        dim, index = (arg_vars[i] for i in ROWS_WRITTEN[str(node.target)])
        self.lines.append(
            f"    rt.write_rows({buffer.name!r}, {tier!r}, {var}, {dim!r}, "
            f"{format_arg(index, name_of)})  # the rows written, over {buffer.name}'s home"
        )
        self.rows_written.add(s)

    def _emit_write_back(self, s: int, a: Action) -> None:
        """A buffer's update, read for the last time, written over its buffer's
        copy in the home tier (``writes_home_of``), from which the next call fetches
        it: at once on a CPU device; on CUDA in the background, waited for and freed
        where the plan says (``write_done_at``)."""
        buffer = self.problem.tensors[self.problem.tensors[s].writes_home_of]  # type: ignore[index]
        self.delivered.add(s)
        if s in self.rows_written:  # its rows reached the home as the op made them
            self.done_at_once.add(s)  # nothing for the plan's wait (CUDA) to wait for
            self._free(s, f"{a.tensor}'s rows written back to {buffer.name}'s home")
            return
        value = self._expr(self.returned_value[s])
        if self.device.type == "cpu":
            self.lines.append(
                f"    rt.write_now({buffer.name!r}, {a.tier!r}, {value})  # {a.tensor} "
                f"written back to {buffer.name}'s home ({a.tier})"
            )
            self._free(s, f"{a.tensor} written back")
            return
        h = self._fresh(f"pending_{self.program.values[self.program.storages[s].base].name}")
        self.handles[s] = h
        self.writing.add(s)  # the device copy stays until its wait and free
        self.lines.append(
            f"    {h} = rt.offload({buffer.name!r}, {a.tier!r}, {value})  # {a.tensor} "
            f"written back to {buffer.name}'s home ({a.tier})"
        )

    def _emit_recompute(self, storage: int, name: str) -> None:
        """Replay the recipe of ``storage``: its chain first (each tensor freed after
        its last reader in the replay), then its producer. A chain tensor the plan
        holds now (compiled runs' chains also pass through tensors that live on) is
        read as it is, neither made again nor freed."""
        recipe = self.problem.tensors[storage].recompute
        assert recipe is not None, f"codegen: {name} has no recompute recipe"
        held = {kept for _, kept in recipe.chain if self.storage_vars.get(kept)}
        for position, (step, kept) in enumerate(recipe.replayed):
            why = f"recompute {name}" if kept < 0 else f"on the way to recompute {name}"
            if kept not in held:
                self._emit_call(
                    step, only_storage=storage if kept < 0 else kept, indent="    ", comment=why
                )
            for done in recipe.release[position] if recipe.release else ():
                if done not in held:
                    self._free(done, f"used by the recompute of {name}")

    def _reads_kernel_sized(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` reads a buffer its producer's kernel sized beyond the
        traced value (``Storage.kernel_sized``: ``nn.LSTM``'s oneDNN workspace).
        A compiled run is measured on made-up inputs of its traced layouts, and
        given an empty buffer, ``mkldnn_rnn_layer_backward`` read past it and
        crashed the process; Inductor would only call the ATen kernel anyway."""
        values, storages = self.program.values, self.program.storages
        return any(
            storages[values[self.value_by_name[n.name]].storage].kernel_sized
            for n in node.all_input_nodes
        )

    def _is_state(self, storage: int) -> bool:
        """Whether ``storage`` is the model's (no op makes it)."""
        return self.program.values[self.program.storages[storage].base].producer is None

    def _free(self, storage: int, why: str) -> None:
        names = self.storage_vars.pop(storage, [])
        for vi in self.program.storages[storage].values:
            self.var.pop(vi, None)
        if names:
            unique = list(dict.fromkeys(names))
            donatable = (
                not self._is_state(storage)
                and storage not in self.returned_value
                and storage not in self.writing
            )
            self.lines.append(DelLine(unique, f"    del {', '.join(unique)}  # {why}", donatable))


def out_variant(target: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, str]:
    """The ``out=`` overload of ``target`` (same arguments plus one written output)
    and the name of that output argument (``out``, ``grad_input``, ...)."""
    schema = [(a.name, str(a.type)) for a in target._schema.arguments]
    packet = target.overloadpacket
    for name in packet.overloads():
        overload = getattr(packet, name)
        args = overload._schema.arguments
        outs = [a.name for a in args if a.is_out]
        if len(outs) == 1 and [(a.name, str(a.type)) for a in args if not a.is_out] == schema:
            return overload, outs[0]
    raise ValueError(f"{target} has no out= overload")


def emit_executor(
    program: Program,
    gm: torch.fx.GraphModule,
    problem: Problem,
    plan: Plan,
    kernels: str = "eager",
    device: torch.device = CPU,
) -> Executor:
    """The executor for ``plan`` on ``device`` (which copies its engine makes at
    once). ``kernels="inductor"``: runs of ops between the plan's memory steps
    become TorchInductor graphs (``Executor.segments``)."""
    return _Emitter(program, gm, problem, plan, kernels, device).emit()
