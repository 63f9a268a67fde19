"""A small residual CNN: convolutions, BatchNorm, residual adds, a downsample.

Three stages of basic residual blocks (16, 32, 64 channels) on a batch of eight
32x32 images, global average pooling and a linear head. Residual adds keep a
block's input alive across the block, which gives the planner short skip
connections to place; BatchNorm brings buffers (running stats) into the graph.

Run with ``python examples/resnet_cnn.py``; the CLI takes
``examples/resnet_cnn.py:make_resnet``.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 8
IMAGE_SIZE = 32
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual add; a strided 1x1 conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Stem, three stages (the last two downsample by 2), global pool, linear head."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.stages = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
            BasicBlock(32, 32),
            BasicBlock(32, 64, stride=2),
            BasicBlock(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def make_resnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the CNN and one image batch, deterministically."""
    torch.manual_seed(0)
    model = ResNetCNN()
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    return model, (x,)


if __name__ == "__main__":
    model, inputs = make_resnet()
    out = model(*inputs)
    print(f"{type(model).__name__}: output shape {tuple(out.shape)}")
