"""A small U-Net: long skip connections from encoder to decoder.

The encoder halves the resolution three times (64 -> 8 on a 64x64 input); the
decoder upsamples back and concatenates each level's encoder output. Those skips
are the planner's hard case: the largest activations are produced first and used
last, so they are live across the whole network and are the natural candidates to
offload (and prefetch back) or recompute.

Run with ``python examples/unet.py``; the CLI takes ``examples/unet.py:make_unet``.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 4
IMAGE_SIZE = 64
IN_CHANNELS = 3
OUT_CHANNELS = 2
BASE_CHANNELS = 16


class DoubleConv(nn.Module):
    """(3x3 conv, BatchNorm, ReLU) twice: the U-Net's unit at every level."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Up(nn.Module):
    """Upsample by 2 (transposed conv), concatenate the skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Three down-sampling levels, a bottleneck, three up-sampling levels."""

    def __init__(
        self,
        in_channels: int = IN_CHANNELS,
        out_channels: int = OUT_CHANNELS,
        base: int = BASE_CHANNELS,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = DoubleConv(in_channels, c1)
        self.enc2 = DoubleConv(c1, c2)
        self.enc3 = DoubleConv(c2, c3)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c3, c4)
        self.up3 = Up(c4, c3)
        self.up2 = Up(c3, c2)
        self.up1 = Up(c2, c1)
        self.head = nn.Conv2d(c1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)  # full resolution: the longest-lived skip
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        y = self.bottleneck(self.pool(s3))
        y = self.up3(y, s3)
        y = self.up2(y, s2)
        y = self.up1(y, s1)
        return self.head(y)


def make_unet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the U-Net and one image batch, deterministically."""
    torch.manual_seed(0)
    model = UNet()
    x = torch.randn(BATCH, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return model, (x,)


if __name__ == "__main__":
    model, inputs = make_unet()
    out = model(*inputs)
    print(f"{type(model).__name__}: output shape {tuple(out.shape)}")
