"""Parameter counts, token/latent sizes and forward compute of ViTok variants.

    python pipelines/model_stats.py S-S/16 S-B/16 S-L/16 B-B/4x8 S-B/4x8
    python pipelines/model_stats.py S-B/4x8 --input 16x128x128 --channels 16
    python pipelines/model_stats.py S-B/16@512x512 S-B/4x8@16x256x256

Each variant may carry its own input size after '@' (HxW for images, TxHxW for video);
otherwise --input applies, and without it images are 256x256 and video 16x128x128 (the
paper's settings). Nothing is allocated: models are built on the meta device.

FLOPs: torch's counter counts a multiply-add as 2 FLOPs. The paper's "GFLOPs" column
(S-B/16: 34.8 at 256p) is multiply-adds, i.e. the GMACs column here.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import numpy as np

from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.flops import forward_flops, meta_model, param_counts


def tokenizer_params(model: TokenizerConfig) -> dict[str, Any]:
    """What a run logs about its tokenizer: variant, p, q, c, E, L, sizes, params, FLOPs
    (computed from the config, once per config and process: a study trial asks twice; never
    read back from a run's params)."""
    return dict(_tokenizer_params(model))


@functools.lru_cache(maxsize=64)
def _tokenizer_params(model: TokenizerConfig) -> tuple[tuple[str, Any], ...]:
    built = meta_model(model)  # one meta-device build for the counts and the FLOPs
    counts = param_counts(model, built)
    flops = forward_flops(model, model=built)
    return tuple(
        {
            "variant": model.variant,
            "encoder_size": model.encoder_size,
            "decoder_size": model.decoder_size,
            "p": model.patch,
            "q": model.tubelet,
            "c": model.channels,
            "L": model.num_tokens,
            "E": model.latent_floats,
            "log2_E": float(np.log2(model.latent_floats)),
            "pixels_per_float": model.pixels_per_float,
            "frames": model.input_size[0],
            "input": "x".join(str(n) for n in model.input_size),  # T x H x W
            "encoder_params_M": counts["encoder"] / 1e6,
            "decoder_params_M": counts["decoder"] / 1e6,
            "params_M": counts["total"] / 1e6,
            "gflops": flops["gflops"],
        }.items()
    )


def parse_input(text: str) -> tuple[int, int, int]:
    """'256x256' -> (1, 256, 256); '16x128x128' -> (16, 128, 128)."""
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) == 2:
        parts = (1, *parts)
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"input={text!r} must be HxW or TxHxW, e.g. 256x256 or 16x128x128")
    return parts  # type: ignore[return-value]


def variant_stats(
    variant: str, channels: int = 16, input_size: tuple[int, int, int] | None = None
) -> dict[str, object]:
    """One row: variant, input, params (M), L, E, pixels/float, forward GFLOPs and GMACs."""
    cfg = TokenizerConfig.from_variant(variant, channels=channels, input_size=input_size)
    built = meta_model(cfg)
    params = param_counts(cfg, built)
    flops = forward_flops(cfg, model=built)
    return {
        "variant": cfg.variant,
        "input": "x".join(str(n) for n in cfg.input_size),
        "c": cfg.channels,
        "enc_M": params["encoder"] / 1e6,
        "dec_M": params["decoder"] / 1e6,
        "total_M": params["total"] / 1e6,
        "L": cfg.num_tokens,
        "E": cfg.latent_floats,
        "px/float": cfg.pixels_per_float,
        "GFLOPs": flops["gflops"],
        "GMACs": flops["gmacs"],
    }


H100_BF16_FLOPS = 989.4e12  # dense bf16 peak of one H100 SXM
MFU = 0.40


def gpu_demand(variant: str, shape: tuple[int, ...]) -> float:
    """Training clips/s of ``variant`` at a ``(T, H, W, ...)`` input on one H100 at 40% MFU
    (a training step costs 3x the forward FLOPs): what a reader must feed one GPU."""
    stats = variant_stats(variant, input_size=tuple(shape[:3]))
    return MFU * H100_BF16_FLOPS / (3 * float(stats["GFLOPs"]) * 1e9)


def format_table(rows: list[dict[str, object]]) -> str:
    """A fixed-width text table."""
    cols = list(rows[0])
    cells = [[f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="e.g. S-B/16, S-B/4x8, S-B/16@512x512")
    parser.add_argument("--input", help="HxW or TxHxW for variants without '@'")
    parser.add_argument("--channels", type=int, default=16, help="latent channels c")
    args = parser.parse_args(argv)
    try:
        default = parse_input(args.input) if args.input else None
        rows = []
        for item in args.variants:
            variant, _, size = item.partition("@")
            rows.append(
                variant_stats(variant, args.channels, parse_input(size) if size else default)
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print("GFLOPs count a multiply-add as 2; the paper's 'GFLOPs' are multiply-adds (GMACs).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
