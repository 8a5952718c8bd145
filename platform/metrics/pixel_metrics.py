"""Pixel metrics of clips: PSNR, SSIM and LPIPS (injected), and the conversions they share.

Clips are channels-last ``(B, T, H, W, 3)``, uint8 or float in [-1, 1]; floats are first
quantised by ``to_uint8``. PSNR and SSIM are per frame (data_range 255), then the mean over
a clip's frames; they match scikit-image (see ``vitok.platform.metrics.evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vitok.platform.data.clips import pixels_to_unit

LpipsFn = Callable[[Tensor, Tensor], Tensor]
PSNR_MAX_DB = 10 * math.log10(255.0**2 / 1e-10)  # identical frames: a finite ceiling, not inf


# ----------------------------------------------------------------------------- conversion
def to_uint8(x: Tensor) -> Tensor:
    """uint8 passes through; float in [-1, 1] -> uint8 via round((x + 1) * 127.5), clamped."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float in [-1, 1], got {x.dtype}")
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_unit_float(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 -> ``dtype`` in [-1, 1] (the model-boundary range); float passes through. The
    uint8 case is ``clips.pixels_to_unit``, the conversion training batches get on the
    device: metrics and the MLflow model see the same values."""
    if x.dtype == torch.uint8:
        return pixels_to_unit(x, dtype)
    return x


def as_clips(x: Tensor) -> Tensor:
    """(B, H, W, 3) images -> (B, 1, H, W, 3); (B, T, H, W, 3) passes through."""
    if x.ndim == 4:
        x = x.unsqueeze(1)
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected (B, T, H, W, 3) or (B, H, W, 3), got {tuple(x.shape)}")
    return x


def pair_clips(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Both as uint8 clips (B, T, H, W, 3) of the same shape (else ValueError)."""
    real, fake = as_clips(to_uint8(real)), as_clips(to_uint8(fake))
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    return real, fake


# ----------------------------------------------------------------------------- PSNR / SSIM
def psnr(real: Tensor, fake: Tensor) -> Tensor:
    """real, fake: (B, T, H, W, 3) uint8 or float in [-1, 1] -> (B,) PSNR in dB, per clip.

    Per frame 10 log10(255^2 / MSE) over (H, W, 3), then the mean over the T frames.
    """
    real, fake = pair_clips(real, fake)
    diff = real.double() - fake.double()
    mse = diff.square().mean(dim=(2, 3, 4))  # (B, T)
    frame_db = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))  # (B, T)
    return frame_db.mean(dim=1).float()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    # scipy.ndimage.gaussian_filter's kernel; radius 5 -> 11 taps for sigma 1.5.
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(real: Tensor, fake: Tensor) -> Tensor:
    """real, fake: (B, T, H, W, 3) uint8 or float in [-1, 1] -> (B,) SSIM, per clip.

    scikit-image's Gaussian SSIM (sigma 1.5, 11 taps, population covariance, data_range 255,
    K1 0.01, K2 0.03), averaged over channels and the valid area (5 pixels from each border are
    cropped, which is exactly the part where scikit-image's reflect padding would matter, so a
    'valid' convolution gives the same numbers). Computed on [0, 1]-scaled values in float32
    (SSIM is invariant to that scaling with constants scaled alike), batched on the device.
    """
    real, fake = pair_clips(real, fake)
    b, t, h, w, _ = real.shape
    window = _gaussian_window().to(device=real.device, dtype=torch.float32)
    k = window.numel()
    if min(h, w) < k:
        raise ValueError(f"SSIM needs frames of at least {k}x{k}, got {h}x{w}")
    x = rearrange(real, "b t h w c -> (b t) c h w").float() / 255.0
    y = rearrange(fake, "b t h w c -> (b t) c h w").float() / 255.0
    kernel_h = window.view(1, 1, k, 1).expand(3, 1, k, 1)
    kernel_w = window.view(1, 1, 1, k).expand(3, 1, 1, k)

    def blur(z: Tensor) -> Tensor:  # separable depthwise 'valid' Gaussian filter
        return F.conv2d(F.conv2d(z, kernel_h, groups=3), kernel_w, groups=3)

    # One pass over the five stacked moments: (5 * BT, 3, H - 10, W - 10).
    stats = blur(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    ux, uy, uxx, uyy, uxy = stats.chunk(5, dim=0)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_frame = s.double().mean(dim=(1, 2, 3)).view(b, t)  # (B, T)
    return per_frame.mean(dim=1).float()


def lpips_per_clip(lpips_fn: LpipsFn, real: Tensor, fake: Tensor) -> Tensor:
    """Mean of the injected LPIPS over each clip's frames: -> (B,).

    `lpips_fn(real, fake)` gets frames (B*T, H, W, 3) float in [-1, 1] and returns one
    distance per frame (any shape with B*T elements).
    """
    real, fake = pair_clips(real, fake)
    b, t = real.shape[:2]
    frames_real = to_unit_float(rearrange(real, "b t h w c -> (b t) h w c"))
    frames_fake = to_unit_float(rearrange(fake, "b t h w c -> (b t) h w c"))
    with torch.no_grad():
        per_frame = lpips_fn(frames_real, frames_fake).float().reshape(b, t)  # (B, T)
    return per_frame.mean(dim=1)
