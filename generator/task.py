"""The generator's training task: what the platform's worker loop calls (pure torch).

A class-conditional DiT learns the diffusion objective on normalised tokenizer latents;
an exponential moving average (``vitok.layers.EMA``, with warm-up; the tokenizer's stage 2
keeps one of its decoder too) of its weights is kept for sampling, as in DiT.

Batches are ``{"z": (B, t, h, w, c) float, normalised latents, "label": (B,) int}``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
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
    """A DiT from saved weights; with ``extra_state`` holding an updated EMA, its average.
    Checkpoints from before the blocks owned their layers (``blocks.N.block.attn...``) load
    under today's names (``blocks.N.attn...``)."""
    dit = DiT(cfg, latent_channels)
    dit.load_state_dict(_current_names(model_state))
    ema = dict((extra_state or {}).get("ema") or {})
    if ema.get("shadow"):
        ema["shadow"] = _current_names(ema["shadow"])
    load_average(dit, ema or None)
    return dit.eval()


_OLD_BLOCK = re.compile(r"^(blocks\.\d+\.)block\.")


def _current_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_OLD_BLOCK.sub(r"\1", k): v for k, v in state.items()}


@dataclass(frozen=True)
class DiffusionLoss:
    """The diffusion loss of a batch for evaluation (no label dropout; timesteps and noise
    drawn from a fixed seed and the batch's index, ``repeats`` draws per clip): the batch's
    mean of each draw, once per clip (so batches weigh by their size). The platform's
    ``MeanEvaluator`` averages it over a split and across workers."""

    cfg: GeneratorConfig
    repeats: int = 4
    seed: int = 1234
    names: ClassVar[tuple[str, ...]] = ("diffusion_loss",)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        objective = build_objective(dataclasses.replace(self.cfg, class_dropout=0.0))
        z, y = batch["z"], batch["label"].long()  # (B, t, h, w, c), (B,)
        draws = []
        for r in range(self.repeats):
            gen = torch.Generator(device=z.device)
            gen.manual_seed(self.seed + 1000 * index + r)
            loss, _ = objective.training_loss(model, z, y, generator=gen)
            draws.append(loss.detach().float().expand(z.shape[0]))  # (B,)
        return {"diffusion_loss": torch.cat(draws)}  # (repeats * B,)
