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
from typing import Any

import torch
import torch.distributed as dist
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


class DiffusionLossEvaluator:
    """The diffusion loss over a split (no label dropout; timesteps and noise drawn from a
    fixed seed, ``repeats`` draws per clip), averaged across workers."""

    def __init__(self, cfg: GeneratorConfig, repeats: int = 4, seed: int = 1234) -> None:
        self.objective: Objective = build_objective(dataclasses.replace(cfg, class_dropout=0.0))
        self.repeats, self.seed = repeats, seed
        self.total, self.count, self.batches = 0.0, 0, 0

    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        z, y = batch["z"], batch["label"].long()  # (B, t, h, w, c), (B,)
        for r in range(self.repeats):
            gen = torch.Generator(device=z.device)
            gen.manual_seed(self.seed + 1000 * self.batches + r)
            loss, _ = self.objective.training_loss(model, z, y, generator=gen)
            self.total += float(loss.detach()) * z.shape[0]
            self.count += z.shape[0]
        self.batches += 1

    def compute(self) -> dict[str, float]:
        sums = torch.tensor([self.total, float(self.count)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                sums = sums.cuda()
            dist.all_reduce(sums)
        total, count = sums.tolist()
        return {"diffusion_loss": total / max(count, 1.0)}


@dataclass(frozen=True)
class MakeDiffusionEvaluator:
    """Picklable ``() -> DiffusionLossEvaluator`` for the platform's training job."""

    cfg: GeneratorConfig

    def __call__(self) -> DiffusionLossEvaluator:
        return DiffusionLossEvaluator(self.cfg)
