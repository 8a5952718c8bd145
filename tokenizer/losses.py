"""Tokenizer losses. Every weight lives in `LossConfig`, none in the model.

Stage 1: recon (L1 or MSE) + kl_weight * KL + lpips_weight * LPIPS.
Stage 2 (decoder fine-tune): the same + gan_weight * hinge generator loss, and a separate
hinge discriminator loss; the discriminator has its own LR (linear warm-up, ``disc_lr_scale``)
and gradient clipping. Each loss returns (total loss tensor, {name: float} logs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from vitok.tokenizer.discriminator import Discriminator, hinge_d_loss, hinge_g_loss
from vitok.tokenizer.lpips import LPIPS
from vitok.tokenizer.model import DiagonalGaussian


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and the stage-2 discriminator settings (paper defaults)."""

    recon: Literal["l1", "mse"] = "mse"
    recon_weight: float = 1.0
    kl_weight: float = 1e-3  # beta
    lpips_weight: float = 1.0  # 0 disables LPIPS (no weight files needed)
    gan_weight: float = 0.05  # stage 2 only
    vgg_weights: str | None = None  # torchvision vgg16 state dict file
    lpips_weights: str | None = None  # the lpips package's vgg.pth (linear heads)
    disc_lr: float = 2e-5
    disc_warmup_steps: int = 1000  # linear warm-up of the discriminator LR
    disc_grad_clip: float = 1.0  # the discriminator's own gradient-norm clip (0 = none)
    disc_channels: int = 64
    disc_max_channels: int = 512
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "mse"):
            raise ValueError(f"recon={self.recon!r} must be one of ['l1', 'mse']")
        for name in ("recon_weight", "kl_weight", "lpips_weight", "gan_weight"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr={self.disc_lr!r} must be > 0")
        if self.disc_warmup_steps < 0:
            raise ValueError(f"disc_warmup_steps={self.disc_warmup_steps!r} must be >= 0")
        if self.disc_grad_clip < 0:
            raise ValueError(f"disc_grad_clip={self.disc_grad_clip!r} must be >= 0 (0 = none)")
        for name in ("disc_channels", "disc_max_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in [0, 1)")
        if self.lpips_weight > 0 and (self.vgg_weights is None) != (self.lpips_weights is None):
            raise ValueError(
                "vgg_weights and lpips_weights must be given together "
                f"(vgg_weights={self.vgg_weights!r}, lpips_weights={self.lpips_weights!r})"
            )

    @property
    def lpips_available(self) -> bool:
        """Both LPIPS weight files are set."""
        return self.vgg_weights is not None and self.lpips_weights is not None


def build_lpips(config: LossConfig) -> LPIPS | None:
    """The LPIPS network from the config's files, or None when they are not set."""
    if not config.lpips_available:
        return None
    return LPIPS.from_files(str(config.vgg_weights), str(config.lpips_weights))


def build_discriminator(config: LossConfig, min_side: int) -> Discriminator:
    """A discriminator sized for frames whose short side is `min_side` pixels."""
    return Discriminator(config.disc_channels, config.disc_max_channels, min_side=min_side)


def disc_lr_scale(config: LossConfig, step: int) -> float:
    """Linear warm-up factor in [0, 1] for the discriminator LR at `step` (0-based optimizer
    steps), then constant: the discriminator part's LR schedule in stage 2."""
    if config.disc_warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / config.disc_warmup_steps)


def reconstruction_loss(
    recon: Tensor,
    target: Tensor,
    posterior: DiagonalGaussian,
    config: LossConfig,
    lpips: LPIPS | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Stage-1 loss. recon, target: (B, T, H, W, 3) in [-1, 1].

    Raises ValueError if lpips_weight > 0 but no LPIPS network is passed (set the weight to
    0 when no weight files exist, and say so in the run).
    """
    if config.recon == "l1":
        rec = F.l1_loss(recon.float(), target.float())
    else:
        rec = F.mse_loss(recon.float(), target.float())
    kl = posterior.kl().mean()
    total = config.recon_weight * rec + config.kl_weight * kl
    logs = {"recon": rec.item(), "kl": kl.item()}
    if config.lpips_weight > 0:
        if lpips is None:
            raise ValueError(
                f"lpips_weight={config.lpips_weight} but no LPIPS network was given; "
                "set vgg_weights and lpips_weights or lpips_weight=0"
            )
        perceptual = lpips(recon, target).mean()
        total = total + config.lpips_weight * perceptual
        logs["lpips"] = perceptual.item()
    logs["loss"] = total.item()
    return total, logs


def generator_loss(
    recon: Tensor,
    target: Tensor,
    posterior: DiagonalGaussian,
    config: LossConfig,
    discriminator: Callable[[Tensor], Tensor],
    lpips: LPIPS | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Stage-2 decoder loss: the stage-1 terms + gan_weight * hinge G loss (per frame).

    ``discriminator`` maps frames to logits; stage 2 passes one whose weights are detached,
    so this loss's gradient reaches the decoder and never the discriminator.
    """
    total, logs = reconstruction_loss(recon, target, posterior, config, lpips)
    g = hinge_g_loss(discriminator(recon))
    total = total + config.gan_weight * g
    logs["gan_g"] = g.item()
    logs["loss"] = total.item()
    return total, logs


def discriminator_loss(
    discriminator: Discriminator, real: Tensor, fake: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Hinge D loss on real (B, T, H, W, 3) vs detached fake frames."""
    logits_real = discriminator(real)
    logits_fake = discriminator(fake.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    logs = {
        "disc_loss": loss.item(),
        "logits_real": logits_real.mean().item(),
        "logits_fake": logits_fake.mean().item(),
    }
    return loss, logs
