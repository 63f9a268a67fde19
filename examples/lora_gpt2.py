"""Fine-tune GPT-2 with LoRA adapters over a frozen base the plan may store
quantized (QLoRA's idea), under a memory budget.

The GPT-2 example returning its LM loss (``gpt2.GPT2LMLoss``), one sequence a step,
with a rank-8 adapter beside each attention and MLP projection; every
other parameter is frozen. ``planner.plan(..., mode="train",
quantize={"weights": "int4"})`` may then keep any frozen weight as int4 codes (on
the device or in its offload store) and dequantize it for each use, forward and
backward; the adapters and everything else that trains stay in full precision.
The script runs a few AdamW steps over the adapters, prints what the plan stored
quantized, the measured peak of one step (forward + backward, by the meter that
never reads the plan) against the budget, and the same loop run eagerly over the
base replaced by its quantization round trip: the losses agree bit for bit, since
that is what the plan computes (a lookup of a quantized embedding reads exact rows
from the weight's full copy on disk, so the round trip leaves those out).

    python examples/lora_gpt2.py                       # 35% of the unplanned peak, int4
    python examples/lora_gpt2.py --budget 50% --format int8 --steps 3
    python examples/lora_gpt2.py --gpu-pricing
    python examples/lora_gpt2.py --from-checkpoint     # the base never loaded into RAM

``--from-checkpoint`` saves the base GPT-2 to a safetensors file first (as a
downloaded checkpoint is), then builds the model on the meta device, attaches the
file (``planner.attach_checkpoint``: memory-mapped, nothing read), wraps the
projections with adapters (which renames their weights, so the file is attached
first) and plans that: the base reaches memory only where the plan keeps it, and
the file is never written.

Which frozen weights are stored quantized is the solver's choice, by time: on a
GPU a weight read back over PCIe costs far more than dequantizing its codes in
device memory. On a CPU the torch reference dequantizes at about 1 GB/s, on the
compute thread, while the offload store's reads overlap compute, so the plan
offloads the base losslessly instead; ``--gpu-pricing`` prices (de)quantization at
memory speed, as a GPU's kernels run, to show the plan a GPU would get (what it
computes, and its measured peak, are real either way).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpt2  # noqa: E402  (the example next to this file)

import planner  # noqa: E402
from planner.runtime import quant  # noqa: E402
from planner.runtime.meter import resident_bytes  # noqa: E402

#: the projections that get an adapter (transformers' GPT-2 ``Conv1D`` layers)
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRA(nn.Module):
    """``base(x) + (x @ a) @ b * scale`` over a frozen GPT-2 ``Conv1D`` (weight
    laid out (in, out)); ``b`` starts at zero, so the adapted model starts as the
    base, as LoRA initializes it."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        fan_in, fan_out = base.weight.shape
        self.base = base
        self.a = nn.Parameter(torch.randn(fan_in, rank) / rank)
        self.b = nn.Parameter(torch.zeros(rank, fan_out))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a) @ self.b * self.scale


def make_lora_gpt2(batch: int = 1, rank: int = 8) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The GPT-2 example returning its LM loss, with adapters; only the adapters
    train. One sequence a step by default: the frozen weights, not activations,
    dominate memory, as when fine-tuning a large model."""
    lm, inputs = gpt2._build(batch=batch)
    return _with_adapters(gpt2.GPT2LMLoss(lm), rank), inputs


def _with_adapters(model: nn.Module, rank: int) -> nn.Module:
    """``model`` frozen, with an adapter (seeded) beside each adapted projection."""
    model.requires_grad_(False)
    torch.manual_seed(1)
    for block in model.model.transformer.h:
        for path in ADAPTED:
            owner_path, _, leaf = path.rpartition(".")
            owner = block.get_submodule(owner_path)
            setattr(owner, leaf, LoRA(getattr(owner, leaf), rank))
    return model


def make_lora_gpt2_from_checkpoint(
    path: Path, batch: int = 1, rank: int = 8
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``make_lora_gpt2``'s model and inputs with the base's weights viewing the
    safetensors file ``path`` (written here from the same seed): built on the meta
    device, the file attached before the adapters rename the projections' weights."""
    from safetensors.torch import save_model
    from transformers import GPT2LMHeadModel

    base, inputs = gpt2._build(batch=batch)
    save_model(base, str(path))  # a tied weight is saved once, under one name
    del base
    with torch.device("meta"):
        lm = GPT2LMHeadModel(gpt2.gpt2_config())
    planner.attach_checkpoint(lm, path)
    return _with_adapters(gpt2.GPT2LMLoss(lm), rank), inputs


def train(step: nn.Module, inputs: tuple[torch.Tensor, ...], steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps over the parameters that require grad."""
    torch.manual_seed(2)
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = step(*inputs)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", default="35%", help="bytes, '120MiB', or a share of the unplanned peak"
    )
    parser.add_argument("--format", default="int4", choices=("int8", "int4"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--gpu-pricing",
        action="store_true",
        help="price (de)quantization at memory speed, as the Triton kernels run on a GPU",
    )
    parser.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="save the base to a safetensors file, then plan a meta model over it",
    )
    args = parser.parse_args(argv)
    profile = planner.get_profile(None)
    if args.gpu_pricing:
        profile = dataclasses.replace(
            profile,
            quantize_bandwidth=profile.memory_bandwidth,
            dequantize_bandwidth=profile.memory_bandwidth,
        )

    with tempfile.TemporaryDirectory() as tmp:
        return _run(args, profile, Path(tmp) / "gpt2.safetensors")


def _run(args: argparse.Namespace, profile: planner.DeviceProfile, checkpoint: Path) -> dict:
    pristine, inputs = make_lora_gpt2(args.batch)
    if args.from_checkpoint:
        model, _ = make_lora_gpt2_from_checkpoint(checkpoint, args.batch)
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        size, in_ram = checkpoint.stat().st_size / 2**20, resident_bytes(model) / 2**20
        print(f"base saved to {checkpoint.name} ({size:.1f} MiB), attached to a meta model: "
              f"{in_ram:.1f} MiB in RAM")  # fmt: skip
    else:
        model = copy.deepcopy(pristine)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"GPT-2 with LoRA: {trainable:,} trainable parameters, frozen base {frozen / 2**20:.1f} MiB"
    )
    pm = planner.plan(
        model,
        args.budget,
        example_inputs=inputs,
        mode="train",
        quantize={"weights": args.format},
        profile=profile,
    )
    quantized = {d.name: d.home for d in pm.plan.tensors if d.home.endswith(args.format)}
    saved = sum(row["saved_bytes"] for row in pm.report.quantized)
    print(
        f"budget {pm.plan.budget_bytes / 2**20:.1f} MiB: {len(quantized)} frozen weights stored "
        f"{args.format} ({saved / 2**20:.1f} MiB saved), "
        f"predicted peak {pm.plan.predicted_peak_bytes / 2**20:.1f} MiB"
    )
    pm.run_measured_step(*inputs)
    assert pm.measured is not None
    for p in pm.parameters():
        p.grad = None
    print(f"measured peak of one step: {pm.measured.peak_bytes / 2**20:.2f} MiB")
    # a lookup (embedding) of a weight stored quantized reads exact rows from its
    # full copy on disk; every other read (the tied head's) computes with the round trip
    rows = pm.report.quantized  # (the report is built anew on each access)
    stored = {row["tensor"] for row in rows}
    exact = {row["tensor"] for row in rows if row["exact_lookups"]}
    reference = quant.round_tripped(pristine, stored, args.format, exact_lookups=exact)
    planned = train(pm, inputs, args.steps, args.lr)
    eager = train(reference, inputs, args.steps, args.lr)
    for i, (a, b) in enumerate(zip(planned, eager)):
        print(f"step {i}: loss {a:.6f} planned, {b:.6f} eager over the round-tripped base")
    same = planned == eager
    print("planned and eager losses " + ("bit-identical" if same else "DIFFER"))
    pm.close()
    unwritten = None
    if args.from_checkpoint:
        unwritten = hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
        print("checkpoint file " + ("unchanged" if unwritten else "CHANGED"))
    return {
        "checkpoint_unchanged": unwritten,
        "budget": pm.plan.budget_bytes,
        "measured_peak": pm.measured.peak_bytes,
        "quantized": quantized,
        "planned": planned,
        "eager": eager,
        "same": same,
    }


if __name__ == "__main__":
    main()
