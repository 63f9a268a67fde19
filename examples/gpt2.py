"""GPT-2 (small config, random weights) from Hugging Face transformers.

Four layers, width 256, four heads, context 128, vocabulary 8192, on a batch of
four sequences of 128 token ids. Built from a config, so nothing is downloaded.
Dropout is off (``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop`` = 0) so two runs
give the same outputs, and ``use_cache=False`` so the model returns no key/value
cache that a planner would have to treat as an output.

Two factories:
- ``make_gpt2`` wraps the model so that ``forward(input_ids)`` returns the logits
  tensor alone. ``GPT2LMHeadModel`` returns a ``ModelOutput`` (a dict-like
  dataclass); a plain tensor output keeps comparisons, losses and the planner's
  output handling simple.
- ``make_gpt2_full`` returns the raw ``GPT2LMHeadModel``, ModelOutput and all, for
  tests of capturing models whose outputs are pytrees.

Attention uses ``attn_implementation="sdpa"`` (``F.scaled_dot_product_attention``),
which ``torch.export.export(..., strict=False)`` captures; the eager implementation
would spell attention out as matmul/softmax/matmul instead.

Run with ``python examples/gpt2.py``; the CLI takes ``examples/gpt2.py:make_gpt2``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

BATCH = 4
SEQ_LEN = 128
VOCAB_SIZE = 8192
ATTN_IMPLEMENTATION = "sdpa"


def gpt2_config() -> GPT2Config:
    """The small, dropout-free configuration shared by both factories."""
    return GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_positions=SEQ_LEN,
        vocab_size=VOCAB_SIZE,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        # GPT-2's default special ids (50256) lie outside the small vocabulary.
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


class GPT2Logits(nn.Module):
    """``GPT2LMHeadModel`` whose forward returns the logits tensor only."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class GPT2LMLoss(nn.Module):
    """``GPT2LMHeadModel`` whose forward returns the language-modelling loss (labels
    are the inputs, shifted inside the model), so a training step plans the loss
    too and its incoming gradient is one scalar."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def _build(batch: int = BATCH) -> tuple[GPT2LMHeadModel, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    input_ids = torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN))
    return model, (input_ids,)


def make_gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT-2 returning logits of shape (batch, seq, vocab), and one batch of ids."""
    model, inputs = _build()
    return GPT2Logits(model), inputs


def make_gpt2_train() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT-2 returning its LM loss on a batch of 8 sequences: the training example
    (activations, not weights, dominate its memory, as in real training)."""
    model, inputs = _build(batch=8)
    return GPT2LMLoss(model), inputs


def make_gpt2_full() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The raw ``GPT2LMHeadModel`` (returns a ModelOutput), and one batch of ids."""
    return _build()


if __name__ == "__main__":
    model, inputs = make_gpt2()
    out = model(*inputs)
    print(f"{type(model).__name__}: output shape {tuple(out.shape)}")
