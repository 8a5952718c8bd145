"""The generator's config: DiT size presets and the diffusion recipe of the paper.

A plain frozen stdlib dataclass (``generator/`` imports only torch, einops and
``vitok.layers``); the platform's reflection helpers still round-trip it through YAML and
``--set`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vitok.layers import ModelSize

SizeName = Literal["N", "T", "S", "B", "L", "XL"]

# DiT-style registry. "N" (nano) and "T" (tiny) are CPU sizes for tests and demos; S, B, L and
# XL are the DiT paper's shapes (DiT-L is the generator of the ViTok study). No patch size in
# the names: the DiT reads the tokenizer's L latent tokens directly, with no further patchify.
DIT_SIZES: dict[str, ModelSize] = {
    "N": ModelSize(width=64, depth=2, heads=2),
    "T": ModelSize(width=128, depth=4, heads=4),
    "S": ModelSize(width=384, depth=12, heads=6),
    "B": ModelSize(width=768, depth=12, heads=12),
    "L": ModelSize(width=1024, depth=24, heads=16),
    "XL": ModelSize(width=1152, depth=28, heads=16),
}

BETA_SCHEDULES = ("linear",)
OBJECTIVES = ("eps",)


@dataclass(frozen=True)
class GeneratorConfig:
    """A class-conditional DiT over tokenizer latents and its diffusion objective.

    Defaults follow the paper: 1000-step linear beta schedule (1e-4 .. 0.02, as in DiT/ADM),
    epsilon prediction, 250 DDIM steps, class dropout 0.1 and classifier-free guidance.
    """

    size: SizeName = "T"
    num_classes: int = 10
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    diffusion_steps: int = 1000
    beta_schedule: Literal["linear"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    objective: Literal["eps"] = "eps"
    sampling_steps: int = 250
    guidance: float = 2.0

    def __post_init__(self) -> None:
        if self.size not in DIT_SIZES:
            raise ValueError(f"size={self.size!r} is not allowed; choose one of {list(DIT_SIZES)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be >= 1")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be > 0")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout={self.class_dropout!r} must lie in [0, 1)")
        if self.diffusion_steps < 2:
            raise ValueError(f"diffusion_steps={self.diffusion_steps!r} must be >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule={self.beta_schedule!r} is not allowed; "
                f"choose one of {list(BETA_SCHEDULES)}"
            )
        if not 0.0 < self.beta_start < 1.0:
            raise ValueError(f"beta_start={self.beta_start!r} must lie in (0, 1)")
        if not self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"beta_end={self.beta_end!r} must lie in [beta_start={self.beta_start}, 1)"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective={self.objective!r} is not allowed; choose one of {list(OBJECTIVES)}"
            )
        if not 1 <= self.sampling_steps <= self.diffusion_steps:
            raise ValueError(
                f"sampling_steps={self.sampling_steps!r} must lie in "
                f"[1, diffusion_steps={self.diffusion_steps}]"
            )
        if self.guidance < 0.0:
            raise ValueError(
                f"guidance={self.guidance!r} must be >= 0 (0 = unconditional, 1 = no guidance)"
            )

    @property
    def dit_size(self) -> ModelSize:
        return DIT_SIZES[self.size]

    @property
    def null_class(self) -> int:
        """Label index of the unconditional ("null") class used for classifier-free guidance."""
        return self.num_classes
