"""Axial rotary position embeddings (RoPE) over an N-d token grid.

Tokens are ``x: (B, L, D)`` with L the flattened grid in row-major order (``(t h w)`` for a
3D grid). The tables are computed once per forward by ``axial_rope(grid, head_dim)`` and
passed to every attention layer as a ``(cos, sin)`` pair of ``(L, head_dim // 2)`` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (L, head_dim // 2)


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
