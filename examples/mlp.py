"""A deep MLP: the simplest chain graph for the planner.

Eight Linear+GELU layers of width 512 on a batch of 64. Every layer's input is
saved for the backward, so training holds one activation per layer at the
forward/backward turn: a long, uniform chain where checkpointing and offloading
trade off cleanly.

Run with ``python examples/mlp.py``; the CLI takes ``examples/mlp.py:make_mlp``.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 8
WIDTH = 512
BATCH = 64


class MLP(nn.Module):
    """``depth`` Linear+GELU blocks followed by a linear head."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, out_features: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the MLP and one input batch, deterministically."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(BATCH, WIDTH)
    return model, (x,)


if __name__ == "__main__":
    model, inputs = make_mlp()
    out = model(*inputs)
    print(f"{type(model).__name__}: output shape {tuple(out.shape)}")
