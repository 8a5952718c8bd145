"""The tokenizer's training task: what the platform's worker loop calls (pure torch).

Stage 1 trains the whole auto-encoder on MSE/L1 + beta * KL (+ LPIPS). Stage 2 freezes the
encoder and fine-tunes the decoder against a StyleGAN-style discriminator (hinge loss),
keeping an EMA (with warm-up) of the decoder for evaluation, as in the paper.

Stage 2 has two optimizer parts (``optimizer_parts``), so the decoder and the
discriminator each get their own AdamW, gradient clipping and LR schedule (the stage's
warm-up + cosine for the decoder; the paper's linear warm-up to ``disc_lr``, then constant,
for the discriminator), and ``training_step`` returns one loss per part. The decoder's
adversarial term sees the discriminator through detached weights (no gradient reaches the
discriminator from it), and the discriminator's hinge term sees a detached reconstruction
(no gradient reaches the decoder): each network is stepped with its own GAN gradient only.

Batches are ``{"x": (B, T, H, W, 3) float in [-1, 1], ...}``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vitok.layers import EMA, load_average
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.discriminator import Discriminator
from vitok.tokenizer.losses import (
    LossConfig,
    build_discriminator,
    build_lpips,
    disc_lr_scale,
    discriminator_loss,
    generator_loss,
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
            tokenizer.load_state_dict(tokenizer_weights(self.init_weights()))
        self._lpips = build_lpips(self.loss) if self.loss.lpips_weight > 0 else None
        if self._lpips is not None:
            self._lpips.requires_grad_(False).eval()
        if self.stage == 1:
            return tokenizer
        _, height, width = self.model.input_size
        module = Stage2Module(tokenizer, build_discriminator(self.loss, min(height, width)))
        self._ema = EMA(tokenizer.decoder_modules(), decay=self.loss.ema_decay)
        return module

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Stage 1: one optimizer over the whole tokenizer (stage 2: ``optimizer_parts``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def optimizer_parts(self, model: nn.Module) -> dict[str, dict[str, Any]] | None:
        """Stage 2: the decoder (the tokenizer module, encoder frozen; the stage's LR,
        schedule and clipping) and the discriminator (``disc_lr`` with a linear warm-up over
        ``disc_warmup_steps``, then constant; ``disc_grad_clip``). Stage 1: None."""
        if self.stage == 1:
            return None
        assert isinstance(model, Stage2Module)
        return {
            "decoder": {"module": model.tokenizer},
            "discriminator": {
                "module": model.discriminator,
                "lr": self.loss.disc_lr,
                "lr_schedule": functools.partial(disc_lr_scale, self.loss),
                "grad_clip": self.loss.disc_grad_clip,
            },
        }

    # -- one step -------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, batch: Mapping[str, Tensor], step: int
    ) -> tuple[Tensor | dict[str, Tensor], dict[str, float]]:
        """Stage 1: (loss, logs). Stage 2: ({"decoder": loss, "discriminator": loss}, logs)."""
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
        frozen = {k: v.detach() for k, v in disc.named_parameters()}

        def judge(frames: Tensor) -> Tensor:  # the discriminator, no gradient to its weights
            return functional_call(disc, frozen, (frames,))

        decoder_loss, logs = generator_loss(recon, x, posterior, self.loss, judge, self._lpips)
        d_loss, d_logs = discriminator_loss(disc, x, recon)  # recon detached inside
        logs.update(d_logs)
        return {"decoder": decoder_loss, "discriminator": d_loss}, logs

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self._ema is not None:
            self._ema.update(_tokenizer_of(model).decoder_modules())

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
        self._ema.copy_to(averaged.decoder_modules())
        return averaged

    @property
    def lpips(self) -> nn.Module | None:
        """The LPIPS network built on this worker (None without weight files)."""
        return self._lpips


def tokenizer_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tokenizer's own weights from a stage-1 state dict (as is) or a stage-2 one (the
    ``tokenizer.`` entries of a ``Stage2Module``, without the discriminator's)."""
    if not any(k.startswith("tokenizer.") for k in state):
        return dict(state)
    return {k.removeprefix("tokenizer."): v for k, v in state.items() if k.startswith("tokenizer.")}


def load_tokenizer(
    model_state: Mapping[str, Tensor],
    cfg: TokenizerConfig,
    extra_state: Mapping[str, Any] | None = None,
) -> ViTok:
    """A ViTok from saved weights (stage 1 or 2), in eval mode; with ``extra_state`` holding
    an updated decoder EMA (stage 2), the decoder carries its average."""
    tokenizer = ViTok(cfg)
    tokenizer.load_state_dict(tokenizer_weights(model_state))
    load_average(tokenizer, (extra_state or {}).get("ema"))
    return tokenizer.eval()


def reconstruct(model: nn.Module, x: Tensor) -> Tensor:
    """The evaluation pass: x (B, T, H, W, 3) in [-1, 1] -> the reconstruction decoded from
    the posterior mean (no sampling), same shape."""
    recon, _ = model(x, sample=False)
    return recon


def _tokenizer_of(model: nn.Module) -> ViTok:
    return model.tokenizer if isinstance(model, Stage2Module) else model  # type: ignore[return-value]
