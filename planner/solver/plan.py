"""A Plan: what to do with every tensor, as an explicit schedule of actions.

Plain data that round-trips through JSON, so a report, a test, a benchmark or the
code generator can read it without running anything.

Semantics of the schedule (the contract between solver, validator and codegen).
For each step ``t`` in order:

1. the actions with ``step == t and when == "before"`` run, in list order;
2. op ``t`` runs: every tensor it reads must be resident (on the device and not
   waiting on a prefetch); its outputs and its workspace are allocated;
3. the actions with ``step == t and when == "after"`` run, in list order.

Nothing is freed implicitly: a tensor leaves the device only by ``free``.

Action kinds (``tensor`` names a Problem tensor):

- ``prefetch`` (tier): allocate the tensor on the device now and start an async copy
  from ``tier``, which must hold a complete copy. Not resident until ``wait``.
- ``offload`` (tier): start an async copy of a resident tensor to ``tier``. The
  device copy stays until ``free``; the tier copy is complete after ``wait``. A
  quantized device copy travels quantized, and a later ``prefetch`` brings back
  whatever the tier holds (then ``dequantize`` before a use).
- ``wait``: block until the tensor's pending copy finishes.
- ``free``: drop the device copy. Not allowed while an offload of it is pending.
- ``recompute``: run the tensor's producer op again (its inputs must be resident);
  it costs the op's seconds and briefly holds the op's other outputs and workspace.
- ``quantize`` (format): replace the device copy with a quantized one.
- ``dequantize``: restore the full-precision device copy from the quantized one
  (both exist while it runs). For a weight stored quantized (below) the quantized
  copy stays: ``dequantize`` makes a full copy for one use, ``free`` drops it.
- ``deliver`` (tier): a parameter's gradient (a ``deliverable`` tensor, resident
  in full precision, no copy pending) is handed to the parameter's ``.grad``, and
  then counts as returned. To the disk tier (a CPU device): written at once into a
  file-backed map, it leaves the device then. To the host tier (CUDA; only for a
  parameter whose home is a tier): a copy like an offload's write, then ``wait``
  and ``free`` as for an offload. A buffer's update (``writes_home_of``: a
  key/value cache's) is delivered the same ways over its buffer's copy in the
  buffer's home tier, which must be that tier.

Initial state: weights and buffers with ``home == "device"`` and user inputs are
resident; weights with ``home == "device:<format>"`` are stored quantized on the
device (the codes stay resident throughout; an op listed in the tensor's
``fused_uses`` reads them directly, any other use needs a ``dequantize`` first);
weights with ``home == "<tier>:<format>"`` have a quantized copy in that tier: a
``prefetch`` reads the codes, which fused uses read directly and a ``dequantize``
turns into a full copy; weights with another home have a complete copy in that
tier and none on the device. At the end, tensors returned to the caller must be resident (or
delivered), and no
fetched weight may remain (the next call starts from the same state).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTION_KINDS = (
    "prefetch",
    "offload",
    "wait",
    "free",
    "recompute",
    "quantize",
    "dequantize",
    "deliver",
)
PLAN_VERSION = 1


@dataclass(frozen=True)
class Action:
    step: int
    when: str  # "before" | "after"
    kind: str
    tensor: str
    tier: str | None = None  # prefetch / offload: "host" | "disk"; quantize: format

    def __post_init__(self) -> None:
        if self.when not in ("before", "after"):
            raise ValueError(f"Action.when must be 'before' or 'after', got {self.when!r}")
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; use one of {ACTION_KINDS}")


@dataclass
class TensorDecision:
    """The per-tensor summary the report prints.

    ``decision``: keep, offload:host, offload:disk, recompute, quantize:<format>,
    or several joined by "+" when different gaps between uses differ. ``gaps``:
    ``[start, end, choice]`` for each interval between two consecutive steps at
    which the tensor is needed.
    """

    name: str
    nbytes: int
    kind: str
    home: str
    decision: str
    live: tuple[int, int]
    gaps: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass
class SolverStats:
    name: str
    status: str
    seconds: float
    objective: float | None = None
    bound: float | None = None

    @property
    def gap(self) -> float | None:
        """Relative gap between the incumbent's objective and the bound."""
        if self.objective is None or self.bound is None or self.objective <= 0:
            return None
        return max(0.0, (self.objective - self.bound) / self.objective)


@dataclass
class Plan:
    mode: str
    budget_bytes: int
    fingerprint: str
    tensors: list[TensorDecision]
    actions: list[Action]
    predicted_peak_bytes: int
    estimated_seconds: float
    unplanned_peak_bytes: int
    unplanned_estimated_seconds: float
    solver: SolverStats
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: resident bytes per step, as the validator replayed the plan
    timeline: list[int] = field(default_factory=list)
    #: the same while an op (or a recompute) runs, and at the moments between
    #: (memory actions): ``timeline`` is the higher of the two
    op_timeline: list[int] = field(default_factory=list)
    between_ops_timeline: list[int] = field(default_factory=list)
    #: kernels="inductor" planned by measured room (``planner.measured_room``): the
    #: higher budget the schedule was solved and replayed under, op by op; its
    #: compiled runs hold less than their ops one by one, and ``budget_bytes`` is
    #: what the module holds to. None: the schedule was solved for ``budget_bytes``.
    op_level_budget_bytes: int | None = None
    #: kernels="inductor": the peak the executor holds with its runs compiled: the
    #: replay's bytes at eager steps, and at each compiled run its bytes before
    #: the run plus what the run allocated when measured (``composed_levels``)
    compiled_peak_bytes: int | None = None
    version: int = PLAN_VERSION

    @property
    def replay_budget_bytes(self) -> int:
        """The budget the validator replays the schedule against."""
        return self.op_level_budget_bytes or self.budget_bytes

    def decision_of(self, name: str) -> TensorDecision:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["solver"]["gap"] = self.solver.gap
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            what = "null" if data is None else f"a {type(data).__name__}"
            raise ValueError(f"a saved plan is a JSON object, not {what}")
        data = dict(data)
        version = data.pop("version", None)
        if version != PLAN_VERSION:
            raise ValueError(f"plan format version {version!r} is not {PLAN_VERSION}; re-plan")
        _check_fields(data)
        solver = dict(data.pop("solver"))
        solver.pop("gap", None)
        return cls(
            tensors=[
                TensorDecision(
                    **{**t, "live": tuple(t["live"]), "gaps": [tuple(g) for g in t["gaps"]]}
                )
                for t in data.pop("tensors")
            ],
            actions=[Action(**a) for a in data.pop("actions")],
            solver=SolverStats(**solver),
            **data,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))


_INT, _NUMBER, _OPTIONAL_INT = (int,), (int, float), (int, type(None))
#: a saved plan's fields and their JSON types (those without a default required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "mode": ((str,), True),
    "budget_bytes": (_INT, True),
    "fingerprint": ((str,), True),
    "tensors": ((list,), True),
    "actions": ((list,), True),
    "predicted_peak_bytes": (_INT, True),
    "estimated_seconds": (_NUMBER, True),
    "unplanned_peak_bytes": (_INT, True),
    "unplanned_estimated_seconds": (_NUMBER, True),
    "solver": ((dict,), True),
    "baselines": ((dict,), False),
    "timeline": ((list,), False),
    "op_timeline": ((list,), False),
    "between_ops_timeline": ((list,), False),
    "op_level_budget_bytes": (_OPTIONAL_INT, False),
    "compiled_peak_bytes": (_OPTIONAL_INT, False),
}
_ACTION_FIELDS = {"step": _INT, "when": (str,), "kind": (str,), "tensor": (str,)}
_TENSOR_FIELDS = {
    "name": (str,),
    "nbytes": _INT,
    "kind": (str,),
    "home": (str,),
    "decision": (str,),
}


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _check_fields(data: dict[str, Any]) -> None:
    """A saved plan's fields are present, known and of their types: one edited by
    hand (a budget as a string, an action's step as one) was taken in, and failed
    later as a bare TypeError or ValueError from the code that read it."""
    unknown = sorted(set(data) - set(_FIELDS) - {"version"})
    missing = [name for name, (_, required) in _FIELDS.items() if required and name not in data]
    if unknown or missing:
        parts = [f"unknown fields {unknown}"] if unknown else []
        parts += [f"missing fields {missing}"] if missing else []
        raise ValueError(f"not a saved plan as Plan.save writes one: {', '.join(parts)}")

    def check(where: str, value: Any, types: tuple[type, ...]) -> None:
        if not _typed(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{where} is {value!r}, not {names}: edited, or not a saved plan")

    for name, (types, _) in _FIELDS.items():
        if name in data:
            check(name, data[name], types)
    for k, action in enumerate(data["actions"]):
        check(f"actions[{k}]", action, (dict,))
        for name, types in _ACTION_FIELDS.items():
            check(f"actions[{k}].{name}", action.get(name), types)
        check(f"actions[{k}].tier", action.get("tier"), (str, type(None)))
    for k, tensor in enumerate(data["tensors"]):
        check(f"tensors[{k}]", tensor, (dict,))
        for name, types in _TENSOR_FIELDS.items():
            check(f"tensors[{k}].{name}", tensor.get(name), types)
