"""ViTok sizes, variant strings and the tokenizer config.

A variant `ViTok {enc}-{dec}/{q}x{p}` names the encoder size, decoder size, tubelet depth q
and patch size p (`S-B/4x8` for video, `S-B/16` for images, where q = 1). The latent
channels c are separate. E = L * c floats is the bottleneck size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitok.layers import ModelSize

# The paper's sizes (S is wide and shallow; L is 1152 wide so head_dim 72 splits three ways),
# plus small CPU sizes for tests and laptop demos (N < M < T).
SIZES: dict[str, ModelSize] = {
    "N": ModelSize(width=48, depth=1, heads=2),  # nano, tests
    "M": ModelSize(width=64, depth=2, heads=2),  # micro, CPU demos
    "T": ModelSize(width=128, depth=4, heads=4),  # tiny, CPU demos
    "S": ModelSize(width=768, depth=6, heads=12),
    "B": ModelSize(width=768, depth=12, heads=12),
    "L": ModelSize(width=1152, depth=24, heads=16),
}

_VARIANT = re.compile(r"^([A-Za-z]+)-([A-Za-z]+)/(?:(\d+)x)?(\d+)$")
VARIANT_FORM = "'{enc}-{dec}/{q}x{p}' or '{enc}-{dec}/{p}', e.g. 'S-B/4x8' or 'S-B/16'"


def parse_variant(variant: str) -> tuple[str, str, int, int]:
    """'S-B/4x8' -> ('S', 'B', 4, 8); 'S-B/16' -> ('S', 'B', 1, 16).

    Raises ValueError with the expected form for anything else (including unknown sizes).
    """
    m = _VARIANT.match(variant.strip())
    if m is None:
        raise ValueError(f"variant={variant!r} is not of the form {VARIANT_FORM}")
    enc, dec, q, p = m.group(1), m.group(2), int(m.group(3) or 1), int(m.group(4))
    for name in (enc, dec):
        if name not in SIZES:
            raise ValueError(
                f"variant={variant!r}: unknown size {name!r}; sizes are {sorted(SIZES)}"
            )
    return enc, dec, q, p


@dataclass(frozen=True)
class TokenizerConfig:
    """One ViTok tokenizer.

    input_size is (T, H, W) frames x pixels; images are T = 1 with tubelet = 1.
    Every field is validated; errors name the field and the bad value.
    """

    encoder_size: str = "S"
    decoder_size: str = "B"
    patch: int = 16  # p: spatial tubelet side
    tubelet: int = 1  # q: temporal tubelet depth
    channels: int = 16  # c: latent channels per token
    input_size: tuple[int, ...] = (1, 256, 256)  # (T, H, W)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("encoder_size", "decoder_size"):
            value = getattr(self, name)
            if value not in SIZES:
                raise ValueError(f"{name}={value!r} is not one of {sorted(SIZES)}")
        for name in ("patch", "tubelet", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if len(self.input_size) != 3 or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.input_size
        ):
            raise ValueError(
                f"input_size={self.input_size!r} must be three positive ints (T, H, W)"
            )
        t, h, w = self.input_size
        if t % self.tubelet:
            raise ValueError(f"input_size: T={t} frames is not divisible by tubelet={self.tubelet}")
        if h % self.patch or w % self.patch:
            raise ValueError(
                f"input_size: H x W = {h} x {w} is not divisible by patch={self.patch}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0")

    @classmethod
    def from_variant(
        cls,
        variant: str,
        channels: int = 16,
        input_size: tuple[int, int, int] | None = None,
    ) -> TokenizerConfig:
        """Build from 'S-B/4x8' (or 'S-B/16').

        input_size defaults to (1, 256, 256) for image variants (q = 1) and (16, 128, 128)
        for video variants, the paper's settings.
        """
        enc, dec, q, p = parse_variant(variant)
        if input_size is None:
            input_size = (1, 256, 256) if q == 1 else (16, 128, 128)
        return cls(
            encoder_size=enc,
            decoder_size=dec,
            patch=p,
            tubelet=q,
            channels=channels,
            input_size=tuple(input_size),
        )

    @property
    def variant(self) -> str:
        """'S-B/16' for images (q = T = 1), else 'S-B/4x8'."""
        sizes = f"{self.encoder_size}-{self.decoder_size}"
        if self.tubelet == 1 and self.input_size[0] == 1:
            return f"{sizes}/{self.patch}"
        return f"{sizes}/{self.tubelet}x{self.patch}"

    @property
    def encoder(self) -> ModelSize:
        return SIZES[self.encoder_size]

    @property
    def decoder(self) -> ModelSize:
        return SIZES[self.decoder_size]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent token grid (t, h, w) = (T/q, H/p, W/p)."""
        t, h, w = self.input_size
        return t // self.tubelet, h // self.patch, w // self.patch

    @property
    def num_tokens(self) -> int:
        """L = t * h * w."""
        t, h, w = self.grid
        return t * h * w

    @property
    def latent_floats(self) -> int:
        """E = L * c, the bottleneck size."""
        return self.num_tokens * self.channels

    @property
    def pixels_per_float(self) -> float:
        """T * H * W * 3 / E."""
        t, h, w = self.input_size
        return t * h * w * 3 / self.latent_floats

    @property
    def patch_dim(self) -> int:
        """Values per tubelet: q * p * p * 3."""
        return self.tubelet * self.patch * self.patch * 3
