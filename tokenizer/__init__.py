"""vitok.tokenizer: the ViTok model, its losses, LPIPS, discriminator and compute counts."""

from vitok.tokenizer.config import SIZES, ModelSize, TokenizerConfig, parse_variant
from vitok.tokenizer.discriminator import Discriminator, hinge_d_loss, hinge_g_loss
from vitok.tokenizer.flops import count_params, forward_flops, meta_model, param_counts
from vitok.tokenizer.losses import (
    LossConfig,
    build_discriminator,
    build_lpips,
    disc_lr_scale,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from vitok.tokenizer.lpips import LPIPS
from vitok.tokenizer.model import DiagonalGaussian, ViTok, patchify, unpatchify

__all__ = [
    "LPIPS",
    "SIZES",
    "DiagonalGaussian",
    "Discriminator",
    "LossConfig",
    "ModelSize",
    "TokenizerConfig",
    "ViTok",
    "build_discriminator",
    "build_lpips",
    "count_params",
    "disc_lr_scale",
    "discriminator_loss",
    "forward_flops",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "meta_model",
    "param_counts",
    "parse_variant",
    "patchify",
    "reconstruction_loss",
    "unpatchify",
]
