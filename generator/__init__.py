"""vitok.generator: a class-conditional DiT over tokenizer latents and its diffusion objective."""

from vitok.generator.config import DIT_SIZES, GeneratorConfig
from vitok.generator.diffusion import (
    Denoiser,
    GaussianDiffusion,
    Objective,
    build_objective,
    drop_labels,
    linear_betas,
)
from vitok.generator.dit import DiT, DiTBlock

__all__ = [
    "DIT_SIZES",
    "Denoiser",
    "DiT",
    "DiTBlock",
    "GaussianDiffusion",
    "GeneratorConfig",
    "Objective",
    "build_objective",
    "drop_labels",
    "linear_betas",
]
