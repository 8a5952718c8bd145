"""The tokenizer's training task: what the platform's worker loop calls (pure torch).

Stage 1 trains the whole auto-encoder on MSE/L1 + beta * KL (+ LPIPS). Stage 2 freezes the
encoder and fine-tunes the decoder against a StyleGAN-style discriminator (hinge loss),
keeping an EMA of the decoder for evaluation, as in the paper.

Stage 2 runs on one optimizer (so DeepSpeed wraps a single module): the decoder's
adversarial term sees the discriminator through detached weights (no gradient reaches
the discriminator from it), and the discriminator's hinge term sees a detached
reconstruction (no gradient reaches the decoder). One backward of their sum therefore gives
each network exactly its own GAN gradient; the discriminator has its own LR and warm-up.

Batches are ``{"x": (B, T, H, W, 3) float in [-1, 1], ...}``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.discriminator import Discriminator
from vitok.tokenizer.ema import EMA
from vitok.tokenizer.losses import (
    LossConfig,
    build_discriminator,
    build_lpips,
    discriminator_loss,
    reconstruction_loss,
)
from vitok.tokenizer.model import ViTok


class Stage2Module(nn.Module):
    """The tokenizer (encoder frozen) and its discriminator, trained as one module."""

    def __init__(self, tokenizer: ViTok, discriminator: Discriminator) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        for p in tokenizer.encoder_parameters():
            p.requires_grad_(False)


@dataclass
class TokenizerTask:
    """Stage 1 or 2 of one tokenizer. ``init_weights`` returns the state dict to start from
    (stage 2 starts from stage 1's weights); it is called where the model is built, so it
    fetches its file on that node."""

    model: TokenizerConfig
    loss: LossConfig
    stage: int = 1
    init_weights: Callable[[], Mapping[str, Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage={self.stage!r} must be 1 or 2")
        self._lpips: nn.Module | None = None
        self._ema: EMA | None = None

    # -- building -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        tokenizer = ViTok(self.model)
        if self.init_weights:
            state = {
                k.removeprefix("tokenizer."): v
                for k, v in self.init_weights().items()
                if not k.startswith("discriminator.")
            }
            tokenizer.load_state_dict(state)
        self._lpips = build_lpips(self.loss) if self.loss.lpips_weight > 0 else None
        if self._lpips is not None:
            self._lpips.requires_grad_(False).eval()
        if self.stage == 1:
            return tokenizer
        _, height, width = self.model.input_size
        module = Stage2Module(tokenizer, build_discriminator(self.loss, min(height, width)))
        self._ema = EMA(_DecoderView(tokenizer), decay=self.loss.ema_decay)
        return module

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        if self.stage == 1:
            return [{"params": [p for p in model.parameters() if p.requires_grad]}]
        assert isinstance(model, Stage2Module)
        return [
            {"params": [p for p in model.tokenizer.decoder_parameters()]},
            {
                "params": list(model.discriminator.parameters()),
                "lr": self.loss.disc_lr,
                "warmup_steps": self.loss.disc_warmup_steps,
            },
        ]

    # -- one step -------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, batch: Mapping[str, Tensor], step: int
    ) -> tuple[Tensor, dict[str, float]]:
        x = batch["x"]  # (B, T, H, W, 3) in [-1, 1]
        if self._lpips is not None:
            self._lpips.to(x.device)
        if self.stage == 1:
            recon, posterior = model(x)
            return reconstruction_loss(recon, x, posterior, self.loss, self._lpips)
        assert isinstance(model, Stage2Module)
        tokenizer, disc = model.tokenizer, model.discriminator
        with torch.no_grad():
            posterior = tokenizer.encode(x)  # frozen encoder
        recon = tokenizer.decode(posterior.sample())
        total, logs = reconstruction_loss(recon, x, posterior, self.loss, self._lpips)
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_adv = -functional_call(disc, frozen, (recon,)).mean()  # hinge G loss
        d_loss, d_logs = discriminator_loss(disc, x, recon)
        total = total + self.loss.gan_weight * g_adv + d_loss
        logs.update(d_logs, gan_g=g_adv.item(), loss=total.item())
        return total, logs

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self._ema is not None:
            self._ema.update(_DecoderView(_tokenizer_of(model)))

    # -- state and evaluation --------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"ema": self._ema.state_dict()} if self._ema is not None else {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if self._ema is not None and "ema" in state:
            self._ema.load_state_dict(dict(state["ema"]))

    def eval_module(self, model: nn.Module) -> nn.Module:
        """The tokenizer to evaluate: in stage 2, a copy carrying the decoder's EMA."""
        tokenizer = _tokenizer_of(model)
        if self._ema is None or self._ema.num_updates == 0:
            return tokenizer
        averaged = copy.deepcopy(tokenizer)
        self._ema.copy_to(_DecoderView(averaged))
        return averaged

    @property
    def lpips(self) -> nn.Module | None:
        """The LPIPS network built on this worker (None without weight files)."""
        return self._lpips


def _tokenizer_of(model: nn.Module) -> ViTok:
    return model.tokenizer if isinstance(model, Stage2Module) else model  # type: ignore[return-value]


class _DecoderView(nn.Module):
    """The decoder's modules under one parent, so an EMA tracks exactly them."""

    def __init__(self, tokenizer: ViTok) -> None:
        super().__init__()
        self.from_latent = tokenizer.from_latent
        self.decoder = tokenizer.decoder
        self.tubelet_unembed = tokenizer.tubelet_unembed
