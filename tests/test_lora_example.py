"""examples/lora_gpt2.py: LoRA adapters over GPT-2's frozen base, which the plan
stores int4 where it pays (priced as on a GPU). Two AdamW steps: the planned
losses are bit-identical to eager's over the base's round trip, they go down, and
the metered peak of a step stays within the budget."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import EXAMPLES


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("lora_gpt2", EXAMPLES / "lora_gpt2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_gpt2"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("source", ["model", "checkpoint"])
def test_lora_example_trains_over_a_quantized_base(source: str) -> None:
    """``checkpoint``: the base saved to a file and attached to a meta model before
    the adapters wrap it; the file is never written."""
    flags = ["--from-checkpoint"] if source == "checkpoint" else []
    result = _example().main(["--budget", "35%", "--steps", "2", "--gpu-pricing", *flags])
    assert result["checkpoint_unchanged"] is (True if flags else None)
    assert result["quantized"], "at 35% priced as on a GPU the base should be stored int4"
    assert all(
        ".base.weight" in n or n.endswith(("wte.weight", "wpe.weight")) for n in result["quantized"]
    )
    assert result["same"] and result["planned"] == result["eager"]
    assert result["planned"][1] < result["planned"][0]
    assert result["measured_peak"] <= result["budget"]
