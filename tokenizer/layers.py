"""Llama-style transformer layers shared by the ViTok tokenizer and the DiT generator.

Pre-norm residual blocks with RMSNorm, a SwiGLU MLP, and axial rotary position embeddings
(RoPE) over an N-d token grid, attention through `F.scaled_dot_product_attention`.

Tokens are always `x: (B, L, D)`, with L the flattened grid in row-major order
(`(t h w)` for a 3D grid). RoPE tables are computed once per forward by `axial_rope(grid,
head_dim)` and passed to every block as a `(cos, sin)` pair of `(L, head_dim // 2)` tensors.

A DiT block with adaLN-Zero composes the pieces itself::

    h = modulate(block.norm1(x), shift1, scale1)            # norms built with affine=False
    x = x + gate1[:, None] * block.attn(h, rope)
    h = modulate(block.norm2(x), shift2, scale2)
    x = x + gate2[:, None] * block.mlp(h)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (L, head_dim // 2)


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


def _axis_pairs(head_dim: int, n_axes: int) -> list[int]:
    """Split the head_dim // 2 rotation pairs across axes, the remainder going to the first.

    64 over 3 axes -> 32 pairs -> [11, 11, 10]; 72 over 3 -> [12, 12, 12].
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    pairs = head_dim // 2
    if pairs < n_axes:
        raise ValueError(f"head_dim={head_dim} has too few rotation pairs for {n_axes} axes")
    base, extra = divmod(pairs, n_axes)
    return [base + (1 if i < extra else 0) for i in range(n_axes)]


def rope_from_positions(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Rope:
    """Axial RoPE tables for arbitrary (possibly fractional or shifted) positions.

    positions: (L, n_axes) float, one coordinate per grid axis.
    Returns (cos, sin), each (L, head_dim // 2) float32. Axis i owns a contiguous block of
    rotation pairs (see `_axis_pairs`) with frequencies theta^(-k / n_i), k < n_i.
    """
    positions = positions.float()
    angles = []
    for axis, n in enumerate(_axis_pairs(head_dim, positions.shape[1])):
        freqs = theta ** (-torch.arange(n, device=positions.device, dtype=torch.float32) / n)
        angles.append(positions[:, axis, None] * freqs[None, :])  # (L, n)
    angle = torch.cat(angles, dim=-1)  # (L, head_dim // 2)
    return angle.cos(), angle.sin()


def grid_positions(grid: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """Integer coordinates of an N-d grid in row-major order: (prod(grid), len(grid))."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)  # (L, n_axes)


def axial_rope(
    grid: tuple[int, ...],
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> Rope:
    """RoPE tables for a row-major N-d token grid, e.g. (t, h, w) or a 2D latent (h, w).

    Returns (cos, sin), each (prod(grid), head_dim // 2).
    """
    return rope_from_positions(grid_positions(grid, device), head_dim, theta)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate feature pairs (i, i + D/2) of x: (B, heads, L, D) by the angles in rope.

    Computed in float32, returned in x's dtype.
    """
    cos, sin = rope
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, heads, L, D/2) each
    cos, sin = cos.to(x.device), sin.to(x.device)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(dtype)


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
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Attributes `norm1`, `attn`, `norm2`, `mlp` are public so a DiT block can compose them with
    adaLN-Zero modulation (build with `affine_norm=False` there).
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, affine_norm: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width, affine=affine_norm)
        self.attn = Attention(width, heads)
        self.norm2 = RMSNorm(width, affine=affine_norm)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))

    def forward(self, x: Tensor, rope: Rope | None) -> Tensor:
        """x: (B, L, D), rope: (cos, sin) each (L, head_dim // 2) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.mlp(self.norm2(x))
        return x


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (B, L, D), shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def init_linear(module: nn.Module, std: float | None = None) -> None:
    """Xavier-uniform (or normal with `std`) weights and zero biases for every nn.Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if std is None:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "Attention",
    "Block",
    "RMSNorm",
    "Rope",
    "SwiGLU",
    "apply_rope",
    "axial_rope",
    "grid_positions",
    "init_linear",
    "modulate",
    "rope_from_positions",
    "swiglu_hidden",
]
