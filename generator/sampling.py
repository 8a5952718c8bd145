"""Sampling from a trained DiT: per-sample labels and seeded starting noise (so a sampled set
is the same whatever the batch size or the number of workers), DDIM + classifier-free
guidance through the objective, and decoding by the tokenizer.

The tokenizer and the latent statistics come in as arguments (anything with ``decode`` /
``denormalise``): the generator package never imports them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from vitok.generator.diffusion import Objective
from vitok.generator.dit import DiT


class LatentDecoder(Protocol):
    """What sampling needs of a tokenizer (``vitok.tokenizer.ViTok`` is one)."""

    def to(self, device: torch.device) -> nn.Module: ...

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, t, h, w, c) latents -> clips (B, T, H, W, 3) in about [-1, 1]."""
        ...


class LatentNormaliser(Protocol):
    """What sampling needs of the latent statistics
    (``vitok.platform.data.latents.LatentStats``)."""

    def denormalise(self, z: Tensor) -> Tensor: ...


def sample_labels(indices: Tensor, num_labels: int) -> Tensor:
    """Sample i's class: i % num_labels (classes balanced to within one sample)."""
    return indices.long() % num_labels


def sample_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """Starting noise (N, *shape): sample i's from its own generator seeded by (seed, i)."""
    draws = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
        for i in indices
    ]
    return torch.stack(draws)


@torch.no_grad()
def generate(
    dit: DiT,
    objective: Objective,
    stats: LatentNormaliser,
    tokenizer: LatentDecoder,
    labels: Tensor,
    latent_shape: tuple[int, ...],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample latents for ``labels`` (B,) with DDIM + CFG, then decode them.

    ``noise`` (B, *latent_shape) is the starting point (else drawn from ``seed``). Returns
    (latents (B, t, h, w, c) in the tokenizer's space, clips (B, T, H, W, 3) float in
    [-1, 1]). Everything runs on ``dit``'s device.
    """
    device = next(dit.parameters()).device
    labels = labels.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (labels.shape[0], *latent_shape)
    z = objective.sample(
        dit, shape, labels, steps=steps, guidance=guidance, generator=gen, noise=noise
    )
    z = stats.denormalise(z)  # (B, t, h, w, c)
    clips = tokenizer.to(device).decode(z).float().clamp(-1, 1)  # (B, T, H, W, 3)
    return z, clips
