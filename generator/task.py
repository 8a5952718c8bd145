"""The generator's training task: what the platform's worker loop calls (pure torch).

A class-conditional DiT learns the diffusion objective on normalised tokenizer latents;
an exponential moving average (``vitok.layers.EMA``, with warm-up; the tokenizer's stage 2
keeps one of its decoder too) of its weights is kept for sampling, as in DiT.

Batches are ``{"z": (B, t, h, w, c) float, normalised latents, "label": (B,) int}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vitok.generator.config import GeneratorConfig
from vitok.generator.diffusion import Objective, build_objective
from vitok.generator.dit import DiT
from vitok.layers import EMA, load_average


@dataclass
class GeneratorTask:
    """Diffusion training of a DiT over latents with ``latent_channels`` channels."""

    model: GeneratorConfig
    latent_channels: int
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels={self.latent_channels!r} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must lie in [0, 1)")
        self.objective: Objective = build_objective(self.model)
        self._ema: EMA | None = None

    # -- building -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        dit = DiT(self.model, self.latent_channels)
        self._ema = EMA(dit, self.ema_decay)
        return dit

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- one step -------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, batch: Mapping[str, Tensor], step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """batch["z"]: (B, t, h, w, c) normalised latents, batch["label"]: (B,) int."""
        z, y = batch["z"], batch["label"].long()
        # Randomness (timesteps, noise, label dropout) comes from the loop's per-step seed.
        return self.objective.training_loss(model, z, y)

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self._ema is not None:
            self._ema.update(model)

    # -- state and evaluation --------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"ema": self._ema.state_dict()} if self._ema is not None else {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if self._ema is not None and "ema" in state:
            self._ema.load_state_dict(state["ema"])

    def eval_module(self, model: nn.Module) -> nn.Module:
        """A copy of the DiT carrying the EMA weights (the live model before any update)."""
        if self._ema is None or self._ema.num_updates == 0:
            return model
        averaged = copy.deepcopy(model)
        self._ema.copy_to(averaged)
        return averaged


def load_generator(
    model_state: Mapping[str, Tensor],
    cfg: GeneratorConfig,
    latent_channels: int,
    extra_state: Mapping[str, Any] | None = None,
) -> DiT:
    """A DiT from saved weights; with ``extra_state`` holding an updated EMA, its average."""
    dit = DiT(cfg, latent_channels)
    dit.load_state_dict(dict(model_state))
    load_average(dit, (extra_state or {}).get("ema"))
    return dit.eval()
