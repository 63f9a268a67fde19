"""examples/generate_llama.py: greedy generation through one planned decoding step
of a Llama with a static key/value cache, at a budget below its weight bytes. The
cache is a set of buffers the step writes in place, reached by attention through
the cache object (planner/ir/aliased_state.py)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from conftest import EXAMPLES

import planner


def _example():
    spec = importlib.util.spec_from_file_location("generate_llama", EXAMPLES / "generate_llama.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_llama"] = module
    spec.loader.exec_module(module)
    return module


def _caches(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if "_cache_" in n}


# the reference's own export: the cache tensors as attention reaches them
@pytest.mark.filterwarnings("ignore:A model attribute .* requires gradient")
def test_generation_below_the_weight_bytes_is_bit_identical_to_the_exported_step() -> None:
    example = _example()
    step, inputs = example.make_llama_decoder()
    exported = torch.export.export(copy.deepcopy(step), (), inputs, strict=False).module()
    weights = sum(p.numel() * p.element_size() for p in step.parameters())
    peak = planner.analyze(step, inputs, profile="cpu").unplanned_peak_bytes
    pm = planner.plan(step, int(peak * 0.3), inputs, profile="cpu")
    try:
        assert pm.plan.budget_bytes < weights / 2
        rows = {row.name: row for row in pm.report.tensors}
        assert rows["key_cache_0"].updated and not rows["model.lm_head.weight"].updated
        assert "buffer (updated)" in str(pm.report)
        assert all(not pm.state_tensor(n).any() for n in _caches(exported)), "planning wrote it"
        prompt = example.PROMPT[:4]
        tokens, logits = example.generate(pm, prompt, 4)
        expected_tokens, expected_logits = example.generate(exported, prompt, 4)
        assert tokens == expected_tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
        written = {name: pm.state_tensor(name) for name in _caches(exported)}
        assert written and all(written[n].any() for n in written)
        for name, cache in _caches(exported).items():
            assert torch.equal(written[name], cache), f"{name} differs from the exported step's"
        pm.run_measured(**inputs)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()


@pytest.mark.filterwarnings("ignore:A model attribute .* requires gradient")
def test_a_cache_larger_than_the_budget_takes_turns_on_the_device() -> None:
    """A 2048-position cache (4 MiB over 4 layers) and a budget below it: each
    layer's keys and values are fetched from the offload store before its attention
    writes the new token into them, and written back after their last read. The
    cache object's own references to the cache are emptied (it is stale once the
    plan writes the updates to the store)."""
    example = _example()
    config = example.llama_config()
    config.num_hidden_layers = 4
    step = example.static_cache_step(config, 2048)
    inputs = {"input_ids": torch.tensor([[example.PROMPT[0]]]), "cache_position": torch.tensor([0])}
    exported = torch.export.export(copy.deepcopy(step), (), inputs, strict=False).module()
    cache_bytes = sum(c.numel() * c.element_size() for c in _caches(step).values())
    pm = planner.plan(step, int(cache_bytes * 0.6), inputs, profile="cpu")
    try:
        moved = {row.name: row.decision for row in pm.report.tensors if "_cache_" in row.name}
        assert len(moved) == 8 and all(d.startswith("offload") for d in moved.values()), moved
        assert not any(layer.keys.numel() for layer in step.static_cache.layers)
        prompt = example.PROMPT[:4]
        tokens, logits = example.generate(pm, prompt, 3)
        expected_tokens, expected_logits = example.generate(exported, prompt, 3)
        assert tokens == expected_tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
        for name, cache in _caches(exported).items():
            assert torch.equal(pm.state_tensor(name), cache), f"{name} differs"
        pm.run_measured(**inputs)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes < cache_bytes
    finally:
        pm.close()


def test_generate_example_runs() -> None:
    result = _example().main(["--budget", "40%", "--new-tokens", "3"])
    assert result["budget"] < result["weights"]
    assert result["measured_peak"] <= result["budget"]
    assert any("proj" in name for name in result["offloaded"])
    assert len(result["planned"]) == 3
    assert result["planned"] == result["eager"]


def test_generate_example_with_a_long_cache_keeps_it_on_disk() -> None:
    result = _example().main(["--budget", "20%", "--max-cache-len", "1024", "--new-tokens", "3"])
    assert result["cache_on_disk"]
    assert result["measured_peak"] <= result["budget"]
    assert result["planned"] == result["eager"]


@pytest.mark.filterwarnings("ignore:A model attribute .* requires gradient")
def test_a_prompt_in_one_call_then_tokens_is_bit_identical_to_the_exported_steps() -> None:
    """Planned for one token and for the prompt (``extra_example_inputs``), below
    the weight bytes: the prompt's call and each token's give the logits and cache
    of the two exported steps (sharing one cache) bit for bit, each call within
    the budget by the meter."""
    example = _example()
    step, inputs = example.make_llama_decoder()
    prompt = example.PROMPT
    chunk = example.prompt_inputs(prompt)
    reference = copy.deepcopy(step)
    exported = {  # by the number of tokens a call takes; one cache (reference's)
        call["input_ids"].shape[1]: torch.export.export(reference, (), call, strict=False).module()
        for call in (inputs, chunk)
    }

    def exported_step(**call: torch.Tensor) -> torch.Tensor:
        return exported[call["input_ids"].shape[1]](**call)

    weights = sum(p.numel() * p.element_size() for p in step.parameters())
    pm = planner.plan(step, "30%", inputs, profile="cpu", extra_example_inputs=[chunk])
    try:
        assert pm.plan.budget_bytes < weights / 2
        tokens, logits = example.generate(pm, prompt, 4, chunk=len(prompt))
        expected_tokens, expected_logits = example.generate(
            exported_step, prompt, 4, chunk=len(prompt)
        )
        assert tokens == expected_tokens and len(logits) == 4
        assert logits[0].shape[1] == len(prompt)
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
        for name, cache in _caches(exported[1]).items():
            assert torch.equal(pm.state_tensor(name), cache), f"{name} differs"
        for call in (inputs, chunk):
            pm.run_measured(**call)
            assert pm.measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()


def test_generate_example_prefills_the_prompt_in_one_call() -> None:
    result = _example().main(["--budget", "40%", "--new-tokens", "3", "--prefill"])
    assert result["budget"] < result["weights"]
    assert result["measured_peak"] <= result["budget"]
    assert len(result["planned"]) == 3
    assert result["planned"] == result["eager"]


@pytest.mark.filterwarnings("ignore:A model attribute .* requires gradient")
def test_a_prompt_in_padded_chunks_generates_what_token_by_token_does() -> None:
    """Chunks of 3 tokens (8 = 3 + 3 + 2 and a pad): the padded position's keys
    and values are overwritten by the first generated token's call before any
    query reads them. The chunks' logits (their prompt rows) are the exported
    chunk step's bit for bit, and the tokens are those of the exported step fed
    token by token."""
    example = _example()
    step, inputs = example.make_llama_decoder()
    prompt = example.PROMPT
    chunk = example.prompt_inputs(prompt[:3])
    reference, fresh = copy.deepcopy(step), copy.deepcopy(step)
    exported = {
        n: torch.export.export(reference, (), call, strict=False).module()
        for n, call in ((1, inputs), (3, chunk))
    }

    def exported_step(**call: torch.Tensor) -> torch.Tensor:
        return exported[call["input_ids"].shape[1]](**call)

    pm = planner.plan(step, "30%", inputs, profile="cpu", extra_example_inputs=[chunk])
    try:
        tokens, logits = example.generate(pm, prompt, 5, chunk=3)
        expected_tokens, expected_logits = example.generate(exported_step, prompt, 5, chunk=3)
        assert [x.shape[1] for x in logits[:3]] == [3, 3, 2]
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
        assert tokens == expected_tokens
    finally:
        pm.close()
    token_by_token, _ = example.generate(
        torch.export.export(fresh, (), inputs, strict=False).module(), prompt, 5
    )
    assert tokens == token_by_token
