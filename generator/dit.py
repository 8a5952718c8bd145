"""A class-conditional DiT over tokenizer latents, with adaLN-Zero and Llama-style blocks.

The tokenizer's latent z: (B, t, h, w, c) is read as L = t*h*w tokens of c channels, with no
further patchify (as in the ViTok paper): Linear(c -> width) embeds each token, 3D axial RoPE
over the (t, h, w) latent grid gives positions, and each block is built from the parts the
tokenizer's blocks use (`vitok.layers`: RMSNorm, RoPE attention, SwiGLU) with adaLN-Zero
modulation from the timestep and class embeddings. Images are latents with t = 1.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from vitok.generator.config import GeneratorConfig
from vitok.layers import (
    Attention,
    RMSNorm,
    Rope,
    SwiGLU,
    axial_rope,
    init_linear,
    modulate,
    swiglu_hidden,
)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal features -> MLP: t (B,) -> (B, width)."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width)
        )

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """t: (B,) float, possibly fractional -> (B, dim) [cos | sin] features (as in DiT)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (half,)
        args = t.float()[:, None] * freqs[None, :]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoidal(t, self.frequency_dim)  # (B, frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, width)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, width); index `num_classes` is the null class used by CFG.

    Label dropout for training is the objective's job (`diffusion.drop_labels`); this table
    only owns the extra row it drops to.
    """

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, width)


class DiTBlock(nn.Module):
    """A pre-norm block with adaLN-Zero: shift/scale/gate per branch from the conditioning.

    `adaLN_modulation` is zero-initialised, so a fresh block is the identity.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        # Norms without weights: the modulation supplies the per-channel scale and shift.
        self.norm1 = RMSNorm(width, affine=False)
        self.attn = Attention(width, heads)
        self.norm2 = RMSNorm(width, affine=False)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, cond: Tensor, rope: Rope | None) -> Tensor:
        """x: (B, L, D), cond: (B, D) conditioning, rope: (cos, sin) (L, head_dim/2)
        -> (B, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then Linear(width -> c): (B, L, D) -> (B, L, c), c the latent
    channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width, affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, L, D), cond: (B, D) conditioning -> (B, L, c)."""
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer over latents z: (B, t, h, w, c).

    `forward(z_t, t, y)` predicts the noise eps with z_t's shape; `forward_with_cfg` applies
    classifier-free guidance. t: (B,) diffusion timesteps (integers in [0, T) for the eps
    objective; any float works), y: (B,) labels in [0, num_classes], num_classes = null.
    """

    def __init__(self, cfg: GeneratorConfig, latent_channels: int) -> None:
        super().__init__()
        size = cfg.dit_size
        self.num_classes = cfg.num_classes
        self.latent_channels = latent_channels
        self.width = size.width
        self.heads = size.heads
        self.head_dim = size.head_dim

        self.token_embed = nn.Linear(latent_channels, size.width)
        self.t_embedder = TimestepEmbedder(size.width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, size.width)
        self.blocks = nn.ModuleList(
            DiTBlock(size.width, size.heads, cfg.mlp_ratio) for _ in range(size.depth)
        )
        self.final_layer = FinalLayer(size.width, latent_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Every Linear (token embed, attention, SwiGLU): Xavier-uniform weights, zero biases.
        init_linear(self)
        # Class embedding table (null row included): N(0, 0.02), as in DiT.
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        # Timestep MLP: N(0, 0.02), as in DiT.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulation, so every gate is 0 and each block starts as identity.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        # Output layer: zero modulation and zero projection, so a fresh model predicts 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, z_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """z_t: (B, t, h, w, c) noisy latents, t: (B,) diffusion timesteps, y: (B,) int
        -> eps: (B, t, h, w, c). In the body the latent grid is (nt, nh, nw) and ``cond`` the
        conditioning vector; ``c`` is only ever the latent channel axis."""
        _, nt, nh, nw, _ = z_t.shape
        x = rearrange(z_t, "b t h w c -> b (t h w) c")  # (B, L, c)
        x = self.token_embed(x.to(self.token_embed.weight.dtype))  # (B, L, D), bf16 under DS
        rope = axial_rope((nt, nh, nw), self.head_dim, device=x.device)  # (L, head_dim/2) x 2
        cond = self.t_embedder(t) + self.y_embedder(y)  # (B, D) timestep + class
        for blk in self.blocks:
            x = blk(x, cond, rope)
        x = self.final_layer(x, cond)  # (B, L, c)
        return rearrange(x, "b (t h w) c -> b t h w c", t=nt, h=nh, w=nw)

    def forward_with_cfg(self, z_t: Tensor, t: Tensor, y: Tensor, guidance: float) -> Tensor:
        """Classifier-free guidance: eps_uncond + guidance * (eps_cond - eps_uncond), one
        batched pass.

        Same shapes as `forward`; guidance 1 is the conditional prediction, 0 the
        unconditional one.
        """
        y_null = torch.full_like(y, self.num_classes)
        out = self(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, y_null]))
        eps_cond, eps_uncond = out.chunk(2, dim=0)  # (B, t, h, w, c) each
        return eps_uncond + guidance * (eps_cond - eps_uncond)
