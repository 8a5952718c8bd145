"""Models from training checkpoints (a folder or a URI under the storage root): the platform
reads the files (``load_model_state``, ``load_task_state``), the model packages rebuild the
modules (``vitok.tokenizer.task.load_tokenizer``, ``vitok.generator.task.load_generator``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitok.generator.config import GeneratorConfig
from vitok.generator.dit import DiT
from vitok.generator.task import load_generator
from vitok.platform.data.prepare import to_model_input
from vitok.platform.training.train import load_model_state, load_task_state
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.model import ViTok
from vitok.tokenizer.task import load_tokenizer


def tokenizer_from_checkpoint(checkpoint: str | Path, model: TokenizerConfig) -> ViTok:
    """The tokenizer of a stage-1 or stage-2 checkpoint (stage 2: with the decoder's EMA)."""
    return load_tokenizer(load_model_state(checkpoint), model, load_task_state(checkpoint))


def generator_from_checkpoint(
    checkpoint: str | Path, model: GeneratorConfig, latent_channels: int
) -> DiT:
    """The DiT of a generator checkpoint, carrying its EMA weights when the checkpoint has them."""
    extra = load_task_state(checkpoint) or None
    return load_generator(load_model_state(checkpoint), model, latent_channels, extra)


@dataclass(frozen=True)
class TokenizerEncoder:
    """Picklable encoder factory for ``extract_latents``: ``factory(device) -> encode`` where
    ``encode(clips (B, T, H, W, 3) uint8) -> posterior mean (B, t, h, w, c)``."""

    checkpoint_dir: str
    model: TokenizerConfig
    crop: tuple[int, int] | None

    def __call__(self, device: str):
        tokenizer = tokenizer_from_checkpoint(self.checkpoint_dir, self.model).to(device)
        crop = self.crop

        def encode(clips: torch.Tensor) -> torch.Tensor:
            x = to_model_input(clips, crop=crop, flip=False)  # (B, T, h, w, 3) centre crop
            return tokenizer.encode(x).mode()  # (B, t, h, w, c)

        return encode
