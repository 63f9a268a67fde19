"""The weights a plan stores quantized, quantized once at plan time.

A weight whose home is ``device:<format>`` is held as codes on the device; one
whose home is ``<tier>:<format>`` is written to its tier as codes. Either way its
round-trip error is recorded (the report's measured error), and a weight that a
lookup reads (an embedding: ``fused.reads_exact_rows``) also gets its full
copy written to the offload directory, where the lookup gathers exact rows.

The modules of one model's input shapes (``planner.shapes``) share these: the
first quantizes and writes each weight, the others reuse what it made.
"""

from __future__ import annotations

import torch

from planner.ir.program import Program
from planner.model_slots import compact
from planner.runtime import fused
from planner.runtime.quant import Quantized
from planner.runtime.runtime import Runtime
from planner.runtime.store import DiskStore
from planner.solver.problem import Problem
from planner.solver.problem import Tensor as ProblemTensor

#: per weight name: its codes on the device (``Quantized``), or None where a
#: tier holds them, and its round-trip error
Made = dict[str, tuple[Quantized | None, dict[str, float]]]


class WeightQuantizer:
    def __init__(
        self,
        runtime: Runtime,
        disk: DiskStore,
        program: Program,
        problem: Problem,
        device: torch.device,
        made: Made,
        weight_keys: set[str],
    ) -> None:
        """``made`` and ``weight_keys`` are shared by the modules of one model's
        input shapes: what was quantized already, and the keys of the files
        written at plan time (which a failed run must not remove)."""
        self.runtime = runtime
        self.disk = disk
        self.program = program
        self.problem = problem
        self.device = device
        self.made = made
        self.weight_keys = weight_keys
        #: per quantized tensor, its round-trip error (weights here, activations by
        #: ``PlannedModule.measure_quantization_error``)
        self.errors: dict[str, dict[str, float]] = {}
        #: weights stored quantized whose lookups read exact rows from their file
        self.exact_lookups: set[str] = set()

    def in_tier(self, tensor: ProblemTensor, tier: str, fmt: str, weight: torch.Tensor) -> None:
        """Write a weight its plan reads quantized (home ``<tier>:<format>``) to the
        tier as codes, once, recording its round-trip error; plus its full copy if a
        lookup reads it (exact rows, as for a weight stored on the device)."""
        name = tensor.name
        if self._reuse(name):  # stored by another shape's module
            return
        with self.runtime.recording_errors(self.errors):
            q = self.runtime.quantize(weight.to(self.device), fmt, name)
        self.weight_keys.update(self.runtime.store_quantized_now(name, tier, q))
        rows = self._exact_rows_copy(tensor, weight)
        if rows is not None:
            self.runtime.exact_rows[name] = rows
        self.made[name] = (None, self.errors.get(name, {}))

    def on_device(
        self, stored_values: list[tuple[int, str]], tensors: dict[str, torch.Tensor]
    ) -> list[Quantized]:
        """The codes of the weights the executor reads quantized on the device
        (``stored_values``: program value and format, in the executor's order),
        each quantized once from its full copy in ``tensors``, by source name."""
        stored: list[Quantized] = []
        for vi, fmt in stored_values:
            value = self.program.values[vi]
            tensor = self.problem.tensors[value.storage]
            if self._reuse(tensor.name):  # the same homes: on the device
                q = self.made[tensor.name][0]
                assert q is not None, f"{tensor.name} is stored in a tier there"
            else:
                weight = tensors[value.source].detach().to(self.device)  # type: ignore[index]
                with self.runtime.recording_errors(self.errors):
                    q = self.runtime.quantize(weight, fmt, tensor.name)
                q.exact_rows = self._exact_rows_copy(tensor, weight)
                self.made[tensor.name] = (q, self.errors.get(tensor.name, {}))
            stored.append(q)
        return stored

    def _reuse(self, name: str) -> bool:
        """Whether another shape's module stored weight ``name`` quantized already;
        if so its error and exact-rows lookup are recorded here too."""
        if name not in self.made:
            return False
        q, error = self.made[name]
        if error:
            self.errors[name] = error
        if name in self.runtime.exact_rows or getattr(q, "exact_rows", None) is not None:
            self.exact_lookups.add(name)
        return True

    def _exact_rows_copy(self, tensor: ProblemTensor, weight: torch.Tensor) -> torch.Tensor | None:
        """The weight's full copy as a map of a file in the offload directory, if a
        lookup of it reads exact rows (``fused.reads_exact_rows``), else None."""
        name = tensor.name
        targets = {self.program.ops[step].target for step, _ in tensor.fused_uses}
        if not any(fused.reads_exact_rows(t, self.problem.tiers) for t in targets):
            return None
        key = f"rows:{name}"
        self.disk.write(key, compact(weight.detach().cpu()))
        self.weight_keys.add(key)
        self.exact_lookups.add(name)
        return self.disk.map_shared(key)
