"""Greedy generation with a Llama whose weights do not fit the budget.

A plan is specific to its input shapes, and a key/value cache that grows by a token
per step changes them at every step. transformers' exportable static cache keeps
them fixed: ``TorchExportableModuleWithStaticCache`` registers each layer's keys and
values as buffers of ``MAX_CACHE_LEN`` positions, and one step takes one token and
its position (``cache_position``) and writes that token's keys and values into the
buffers in place. One planned step then serves every position: the prompt is fed
token by token, and each generated token follows. The plan writes each token's
keys and values into the cache in place, and streams what does not fit from the
offload directory in every step, as FlexGen and Accelerate's disk offload do: here
the weights; with a long cache, each layer's keys and values too, written back
after their last read.

With ``--prefill [TOKENS]`` the step is planned for a call of TOKENS tokens too
(default: the prompt's length; ``extra_example_inputs``): one module, two plans
homing each weight alike over one offload store. The prompt then goes through
in calls of TOKENS tokens, the last one padded (its positions at once: the
weights are streamed once per call, not once per token), and each generated
token follows one per call.

The model is ``examples/llama.py``'s (two layers, width 128, grouped-query
attention, vocabulary 1024), random weights, nothing downloaded.

Run with ``python examples/generate_llama.py [--budget 40%] [--new-tokens 16]
[--kernels inductor] [--max-cache-len 4096] [--prefill [TOKENS]]``;
the CLI takes ``examples/generate_llama.py:make_llama_decoder`` (one step).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import llama_config  # noqa: E402

MAX_CACHE_LEN = 48
PROMPT = [11, 407, 92, 860, 3, 512, 77, 1000]
PAD_ID = 0  # fills a prompt's last chunk (``generate``)


def static_cache_step(config: LlamaConfig, max_cache_len: int) -> torch.nn.Module:
    """A Llama built from ``config`` (seed 0) as one decoding step with a static
    cache of ``max_cache_len`` positions, batch 1."""
    torch.manual_seed(0)
    config.max_position_embeddings = max_cache_len
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        cache_config={"batch_size": 1, "max_cache_len": max_cache_len},
    )
    return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len)


def make_llama_decoder(
    max_cache_len: int = MAX_CACHE_LEN,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """One decoding step of the Llama with a static cache of ``max_cache_len``
    positions, and the example inputs of a step: a token and its position."""
    step = static_cache_step(llama_config(), max_cache_len)
    return step, prompt_inputs(PROMPT[:1])


def prompt_inputs(prompt: list[int], first: int = 0) -> dict[str, torch.Tensor]:
    """A step's inputs for ``prompt``'s tokens at positions ``first`` on."""
    return {
        "input_ids": torch.tensor([prompt]),
        "cache_position": torch.arange(first, first + len(prompt)),
    }


@torch.no_grad()
def generate(
    step: Callable[..., torch.Tensor],
    prompt: list[int],
    new_tokens: int,
    keep_logits: bool = True,
    chunk: int = 0,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding, one token per call of ``step``: the prompt's tokens in turn
    (``chunk``: in calls of that many tokens, the last one padded), then each
    argmax (prompt + new tokens, and the padded prompt, must fit the cache: a
    position past it is an IndexError). Returns the generated tokens and, with
    ``keep_logits``, every call's logits (a chunk's: its prompt tokens' rows).

    Padding is safe with a static cache: the padded positions' keys and values
    are written past the prompt, where each generated token's call writes its own
    before attention reads that position, and the causal mask keeps every query
    from the positions after its own until then."""
    tokens = list(prompt)
    logits = []
    if chunk:
        for first in range(0, len(prompt), chunk):
            part = prompt[first : first + chunk]
            out = step(**prompt_inputs(part + [PAD_ID] * (chunk - len(part)), first))
            if keep_logits:
                logits.append(out[:, : len(part)].detach().clone())
        tokens.append(int(out[0, len(part) - 1].argmax()))
    for position in range(len(prompt) if chunk else 0, len(prompt) + new_tokens - 1):
        out = step(
            input_ids=torch.tensor([[tokens[position]]]),
            cache_position=torch.tensor([position]),
        )
        if keep_logits:
            logits.append(out.detach().clone())
        if position + 1 >= len(prompt):
            tokens.append(int(out[0, -1].argmax()))
    return tokens[len(prompt) :], logits


def main(argv: list[str] | None = None) -> dict:
    """Plan one step at ``--budget``, generate with it and with the eager step, print
    and return what each did."""
    import planner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="40%", help="bytes, or a share of the unplanned peak")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--kernels", default="eager", choices=["eager", "inductor"], help="see planner.plan"
    )
    parser.add_argument(
        "--max-cache-len",
        type=int,
        default=MAX_CACHE_LEN,
        help="cache positions (e.g. 4096: a cache larger than the weights, which the "
        "plan keeps on disk layer by layer when it does not fit)",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        nargs="?",
        const=len(PROMPT),
        default=0,
        metavar="TOKENS",
        help="plan a call of TOKENS tokens too (default: the prompt's length) and feed "
        "the prompt in such calls, the last one padded",
    )
    args = parser.parse_args(argv)

    step, example = make_llama_decoder(args.max_cache_len)
    cache = sum(b.numel() * b.element_size() for n, b in step.named_buffers() if "_cache_" in n)
    eager = copy.deepcopy(step)  # its own cache: the planned step writes into step's
    weights = sum(p.numel() * p.element_size() for p in step.parameters())
    extra = [prompt_inputs(PROMPT[:1] * args.prefill)] if args.prefill else None
    pm = planner.plan(step, args.budget, example, kernels=args.kernels, extra_example_inputs=extra)
    try:
        plan = pm.plan
        moved = [t.name for t in plan.tensors if "_cache_" in t.name and t.home != "device"]
        print(
            f"budget {plan.budget_bytes / 2**20:.2f} MiB, weights {weights / 2**20:.2f} MiB, "
            f"cache {cache / 2**20:.2f} MiB ({len(moved)} of its buffers on disk), "
            f"unplanned peak {plan.unplanned_peak_bytes / 2**20:.2f} MiB"
        )
        planned_started = time.perf_counter()
        planned_tokens, _ = generate(pm, PROMPT, args.new_tokens, chunk=args.prefill)
        planned_seconds = time.perf_counter() - planned_started
        eager_started = time.perf_counter()
        eager_tokens, _ = generate(eager, PROMPT, args.new_tokens)
        eager_seconds = time.perf_counter() - eager_started
        pm.run_measured(**example)  # rewrites position 0 of the cache: generation is done
        print(f"one step under the meter: {pm.measured.peak_bytes / 2**20:.2f} MiB")
        measured_peak = pm.measured.peak_bytes
        if args.prefill:
            pm.run_measured(**prompt_inputs(PROMPT[:1] * args.prefill))
            print(f"a prompt call under the meter: {pm.measured.peak_bytes / 2**20:.2f} MiB")
            measured_peak = max(measured_peak, pm.measured.peak_bytes)
        print(f"planned: {planned_tokens}")
        print(f"eager:   {eager_tokens}")
        eager_calls = len(PROMPT) + args.new_tokens - 1  # token by token
        planned_calls = eager_calls
        if args.prefill:
            planned_calls = -(-len(PROMPT) // args.prefill) + args.new_tokens - 1
        print(
            f"generation: planned {planned_seconds * 1e3:.1f} ms in {planned_calls} calls, "
            f"eager {eager_seconds * 1e3:.1f} ms in {eager_calls} (one run each, not a "
            f"benchmark)"
        )
        return {
            "budget": plan.budget_bytes,
            "weights": weights,
            "measured_peak": measured_peak,
            "planned": planned_tokens,
            "eager": eager_tokens,
            "offloaded": [t.name for t in plan.tensors if t.decision.startswith("offload")],
            "cache_on_disk": moved,
        }
    finally:
        pm.close()


if __name__ == "__main__":
    main()
