"""A StyleGAN2-style discriminator (residual downsampling conv blocks) with hinge losses.

Used in stage 2 (decoder fine-tuning). Video is judged per frame, as in the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class _ResBlock(nn.Module):
    """conv3x3-lrelu-conv3x3-lrelu-avgpool2, plus a 1x1 skip of the pooled input, / sqrt 2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H/2, W/2)."""
        skip = self.skip(F.avg_pool2d(x, 2))
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.avg_pool2d(F.leaky_relu(self.conv2(x), 0.2), 2)
        return (x + skip) / math.sqrt(2)


def _minibatch_stddev(x: Tensor, group: int = 4) -> Tensor:
    """Append StyleGAN's minibatch standard-deviation channel: (N, C, H, W) -> (N, C+1, H, W)."""
    n = x.shape[0]
    g = max(d for d in range(1, min(group, n) + 1) if n % d == 0)
    y = rearrange(x, "(g m) c h w -> g m c h w", g=g)
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (M,)
    std = std.repeat(g)[:, None, None, None].expand(n, 1, *x.shape[2:])  # (N, 1, H, W)
    return torch.cat([x, std], dim=1)


class Discriminator(nn.Module):
    """Per-frame real/fake logits.

    forward(x: (B, T, H, W, 3) or (B, H, W, 3) in [-1, 1]) -> (B * T,) logits.
    Downsamples by 2 per block until the short side is <= 4 (at least one block), then
    minibatch-stddev, conv, a 4x4 adaptive pool and two linears (any H, W >= 8 works).
    """

    def __init__(self, channels: int = 64, max_channels: int = 512, min_side: int = 16) -> None:
        super().__init__()
        self.from_rgb = nn.Conv2d(3, channels, 1)
        blocks, ch, side = [], channels, min_side
        while True:
            out = min(ch * 2, max_channels)
            blocks.append(_ResBlock(ch, out))
            ch, side = out, side // 2
            if side <= 4:
                break
        self.blocks = nn.ModuleList(blocks)
        self.min_side = min_side
        self.final_conv = nn.Conv2d(ch + 1, ch, 3, padding=1)
        self.fc = nn.Linear(ch * 16, ch)
        self.out = nn.Linear(ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x[:, None]  # (B, 1, H, W, 3)
        h = rearrange(x, "b t h w c -> (b t) c h w")  # frames judged independently
        h = F.leaky_relu(self.from_rgb(h), 0.2)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.final_conv(_minibatch_stddev(h)), 0.2)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)  # (N, C*16)
        return self.out(F.leaky_relu(self.fc(h), 0.2)).squeeze(-1)  # (N,)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake))."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator (decoder) hinge loss: -mean(fake logits)."""
    return -logits_fake.mean()
