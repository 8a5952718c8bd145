"""Llama-style transformer layers shared by the ViTok tokenizer and the DiT generator.

Pre-norm residual blocks with RMSNorm, a SwiGLU MLP and multi-head attention with axial
RoPE (``vitok.layers.rope``) through ``F.scaled_dot_product_attention``; ``ModelSize`` names a
trunk's shape. Tokens are always ``x: (B, L, D)``.

The tokenizer stacks ``Block``; the DiT builds its adaLN-Zero block from the same parts
(``RMSNorm(affine=False)``, ``Attention``, ``SwiGLU``) and ``modulate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vitok.layers.rope import Rope, apply_rope


@dataclass(frozen=True)
class ModelSize:
    """A transformer trunk: width (token dim), depth (blocks) and attention heads."""

    width: int
    depth: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: `x / rms(x) * weight`.

    With `affine=False` there is no weight (for adaLN, where the modulation supplies it).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D), computed in float32 and cast back."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        x = x.to(dtype)
        return x * self.weight if self.weight is not None else x


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden size, 2/3 * mlp_ratio * width: the same parameters as a GELU MLP.

    768 -> 2048 and 1152 -> 3072, so counts match the paper's table.
    """
    return int(2 * mlp_ratio * width / 3)


class SwiGLU(nn.Module):
    """`w2(silu(w1 x) * w3 x)`: x (B, L, D) -> (B, L, D)."""

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden if hidden is not None else swiglu_hidden(width)
        self.w1 = nn.Linear(width, hidden)  # gate
        self.w3 = nn.Linear(width, hidden)  # value
        self.w2 = nn.Linear(hidden, width)  # out

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on q and k: x (B, L, D) -> (B, L, D)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: Rope | None) -> Tensor:
        qkv = self.qkv(x)  # (B, L, 3D)
        q, k, v = rearrange(qkv, "b l (n h d) -> n b h l d", n=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_dim)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))

    def forward(self, x: Tensor, rope: Rope | None) -> Tensor:
        """x: (B, L, D), rope: (cos, sin) each (L, head_dim // 2) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.mlp(self.norm2(x))
        return x


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (B, L, D), shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def init_linear(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear (in `modules()` order)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
