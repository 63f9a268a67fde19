"""A Llama (small config, random weights) from Hugging Face transformers.

Two layers, width 128, four query heads sharing two key/value heads (grouped-query
attention), SwiGLU feed-forward of width 344, RMSNorm, rotary position embeddings,
untied input and output embeddings, vocabulary 1024, on a batch of two sequences
of 64 token ids. Built from a config, so nothing is downloaded.

What it brings beside GPT-2: the ops of a modern decoder (RMSNorm's rsqrt and
mean, the rotary embedding's cos/sin tables and half-rotations, SiLU gating, the
key/value heads repeated for grouped-query attention), and, in training, logits
returned to the caller: a forward output large enough to be worth moving, which
the plan must still hand over when the forward ends.

``make_llama`` wraps the model so that ``forward(input_ids)`` returns the logits
tensor alone (``use_cache=False``: no key/value cache among the outputs).
Attention uses ``attn_implementation="sdpa"``, which ``torch.export`` captures.

Run with ``python examples/llama.py``; the CLI takes ``examples/llama.py:make_llama``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

BATCH = 2
SEQ_LEN = 64
VOCAB_SIZE = 1024


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )


class LlamaLogits(nn.Module):
    """``LlamaForCausalLM`` whose forward returns the logits tensor only."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def make_llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Llama returning logits of shape (batch, seq, vocab), and one batch of ids."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    input_ids = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ_LEN))
    return LlamaLogits(model), (input_ids,)


if __name__ == "__main__":
    model, inputs = make_llama()
    out = model(*inputs)
    print(f"{type(model).__name__}: output shape {tuple(out.shape)}")
