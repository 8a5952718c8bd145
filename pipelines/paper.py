"""The paper's headline numbers (Hansen-Estruch et al., 2025), for side-by-side reports.

Keyed by (variant, channels, input (T, H, W)); only setups the paper reports appear here.
"""

from __future__ import annotations

from typing import Any

# Parameters (millions) of one encoder or decoder of each ViTok size (the paper's table).
SIZE_PARAMS_M: dict[str, float] = {"S": 43.3, "B": 85.8, "L": 383.7}

# 256p ImageNet (x16 spatial compression), c = 16.
_IMAGE = (1, 256, 256)
# UCF-101 16 x 128 x 128 video, c = 16.
_VIDEO = (16, 128, 128)

PAPER: dict[tuple[str, int, tuple[int, int, int]], dict[str, Any]] = {
    ("S-B/16", 16, _IMAGE): {
        "params_M": 129.0,
        "gmacs": 34.8,
        "rfid": 0.50,
        "psnr": 24.36,
        "ssim": 0.747,
        "gfid": 2.45,  # with DiT-XL
        "gen_samples": 50_000,  # gFID's sample count (the issue and DiT's protocol)
    },
    ("S-L/16", 16, _IMAGE): {
        "params_M": 426.8,
        "gmacs": 113.4,
        "rfid": 0.46,
        "psnr": 24.74,
        "ssim": 0.758,
    },
    ("S-B/4x8", 16, _VIDEO): {
        "tokens": 1024,
        "rfid": 2.13,
        "rfvd": 8.04,
        "psnr": 30.11,
        "ssim": 0.923,
        "gfvd": 27.44,
    },
    ("S-B/8x8", 16, _VIDEO): {
        "tokens": 512,
        "rfid": 2.78,
        "rfvd": 20.05,
        "psnr": 28.55,
        "ssim": 0.898,
        "gfvd": 52.71,
    },
    ("S-B/4x16", 16, _VIDEO): {
        "tokens": 256,
        "rfid": 4.46,
        "rfvd": 53.98,
        "psnr": 26.26,
        "ssim": 0.850,
        "gfvd": 92.46,
    },
}

# The paper's fitted relationships (finding 1 and 3), for the report's text.
FINDINGS = {
    "E vs reconstruction": "R^2 about 0.92-0.98 between log E and rFID, PSNR, SSIM",
    "encoder size vs reconstruction": "R^2 0.00-0.07 (no gain from a larger encoder)",
}


def paper_row(variant: str, channels: int, input_size: tuple[int, ...]) -> dict[str, Any] | None:
    return PAPER.get((variant, channels, tuple(input_size)))  # type: ignore[arg-type]
