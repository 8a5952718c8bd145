"""vitok.layers: the pure-torch building blocks both models are made of.

RMSNorm, SwiGLU, RoPE attention and the pre-norm ``Block`` (``transformer``), axial RoPE
tables (``rope``), trunk sizes (``ModelSize``) and the parameter average (``EMA``).
``vitok.tokenizer`` and ``vitok.generator`` import these and never each other; this package
imports only torch and einops (tests/test_foundation.py checks both).
"""

from vitok.layers.ema import EMA, load_average
from vitok.layers.rope import Rope, apply_rope, axial_rope, grid_positions, rope_from_positions
from vitok.layers.transformer import (
    Attention,
    Block,
    ModelSize,
    RMSNorm,
    SwiGLU,
    init_linear,
    modulate,
    swiglu_hidden,
)

__all__ = [
    "EMA",
    "Attention",
    "Block",
    "ModelSize",
    "RMSNorm",
    "Rope",
    "SwiGLU",
    "apply_rope",
    "axial_rope",
    "grid_positions",
    "init_linear",
    "load_average",
    "modulate",
    "rope_from_positions",
    "swiglu_hidden",
]
