"""ViTok: a Vision-Transformer auto-encoder with a KL bottleneck (arXiv 2501.09755).

x (B, T, H, W, 3) in [-1, 1]
  -> patchify into q x p x p tubelets, Linear -> encoder ViT -> norm -> Linear(C_f -> 2c)
  -> DiagonalGaussian over z (B, t, h, w, c), t = T/q, h = H/p, w = W/p
  -> Linear(c -> C_g) -> decoder ViT -> norm -> Linear -> unpatchify -> x (B, T, H, W, 3)

Channels-last everywhere; images are T = 1 with tubelet q = 1. Any input whose (T, H, W) is
divisible by (q, p, p) works, not only `config.input_size` (RoPE positions follow the grid).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from einops import rearrange
from torch import Tensor, nn

from vitok.layers import Block, ModelSize, RMSNorm, axial_rope, init_linear
from vitok.tokenizer.config import TokenizerConfig


def patchify(x: Tensor, tubelet: int, patch: int) -> Tensor:
    """x: (B, T, H, W, C) -> (B, t, h, w, q*p*p*C) tubelets, exact inverse of `unpatchify`."""
    b, t, h, w, c = x.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(
            f"input T x H x W = {t} x {h} x {w} is not divisible by the tubelet "
            f"q x p x p = {tubelet} x {patch} x {patch}"
        )
    return rearrange(
        x, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=tubelet, ph=patch, pw=patch
    )


def unpatchify(tokens: Tensor, tubelet: int, patch: int) -> Tensor:
    """tokens: (B, t, h, w, q*p*p*C) -> (B, t*q, h*p, w*p, C)."""
    return rearrange(
        tokens, "b t h w (pt ph pw c) -> b (t pt) (h ph) (w pw) c", pt=tubelet, ph=patch, pw=patch
    )


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents z: (B, t, h, w, c)."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps: (B, t, h, w, c)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean, used for evaluation and latent extraction: (B, t, h, w, c)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) averaged over the latent dims (t, h, w, c): (B,)."""
        mean, logvar = self.mean.float(), self.logvar.float()  # float32 under bf16 too
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).mean(dim=1)


class _Trunk(nn.Module):
    """A stack of pre-norm blocks followed by a final norm: (B, L, D) -> (B, L, D)."""

    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(size.width, size.heads) for _ in range(size.depth)])
        self.norm = RMSNorm(size.width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


class ViTok(nn.Module):
    """The ViTok tokenizer for one `TokenizerConfig`.

    encode(x: (B, T, H, W, 3) float in [-1, 1]) -> DiagonalGaussian over z (B, t, h, w, c)
    decode(z: (B, t, h, w, c)) -> (B, T, H, W, 3), unbounded (train it towards [-1, 1])
    forward(x, sample=True) -> (recon, posterior); sample=False decodes the mean.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = config.encoder, config.decoder
        # Encoder: tubelet embed (patchify + Linear), ViT, Linear to mean and log-variance.
        self.tubelet_embed = nn.Linear(config.patch_dim, enc.width)
        self.encoder = _Trunk(enc)
        self.to_moments = nn.Linear(enc.width, 2 * config.channels)
        # Decoder: Linear from latent, ViT, Linear tubelet un-embed + unpatchify.
        self.from_latent = nn.Linear(config.channels, dec.width)
        self.decoder = _Trunk(dec)
        self.tubelet_unembed = nn.Linear(dec.width, config.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All weight init in one place."""
        # Every Linear (qkv, proj, SwiGLU, embeddings): Xavier-uniform, zero bias.
        init_linear(self)
        for module in self.modules():
            if isinstance(module, RMSNorm) and module.weight is not None:
                # Norms start as plain RMS normalisation.
                nn.init.ones_(module.weight)
        # Bottleneck head: small weights, so the posterior starts near mean 0, logvar 0.
        nn.init.normal_(self.to_moments.weight, std=0.02)
        nn.init.zeros_(self.to_moments.bias)

    # -- parameter groups (stage 2 freezes the encoder and tunes the decoder) --------------

    def encoder_modules(self) -> nn.ModuleDict:
        """Tubelet embed, encoder ViT and the moments head, under one parent."""
        parts = ("tubelet_embed", "encoder", "to_moments")
        return nn.ModuleDict({name: getattr(self, name) for name in parts})

    def decoder_modules(self) -> nn.ModuleDict:
        """Latent projection, decoder ViT and the tubelet un-embed, under one parent (stage 2
        tunes them; its EMA tracks exactly them, by these names)."""
        parts = ("from_latent", "decoder", "tubelet_unembed")
        return nn.ModuleDict({name: getattr(self, name) for name in parts})

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder_modules().parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.decoder_modules().parameters()

    # -- encode / decode --------------------------------------------------------------------

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, T, H, W, 3) float in [-1, 1] -> posterior over z (B, t, h, w, c)."""
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected x of shape (B, T, H, W, 3), got {tuple(x.shape)}")
        cfg = self.config
        tokens = patchify(x, cfg.tubelet, cfg.patch)  # (B, t, h, w, q*p*p*3)
        b, t, h, w, _ = tokens.shape
        rope = axial_rope((t, h, w), cfg.encoder.head_dim, cfg.rope_theta, device=x.device)
        tokens = rearrange(tokens, "b t h w d -> b (t h w) d")  # (B, L, q*p*p*3)
        tokens = self.encoder(self.tubelet_embed(tokens), rope)  # (B, L, C_f)
        moments = self.to_moments(tokens)  # (B, L, 2c)
        moments = rearrange(moments, "b (t h w) c -> b t h w c", t=t, h=h, w=w)
        mean, logvar = moments.chunk(2, dim=-1)  # (B, t, h, w, c) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, t, h, w, c) -> reconstruction (B, t*q, h*p, w*p, 3)."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.channels:
            raise ValueError(
                f"expected z of shape (B, t, h, w, {cfg.channels}), got {tuple(z.shape)}"
            )
        b, t, h, w, _ = z.shape
        rope = axial_rope((t, h, w), cfg.decoder.head_dim, cfg.rope_theta, device=z.device)
        tokens = self.from_latent(rearrange(z, "b t h w c -> b (t h w) c"))  # (B, L, C_g)
        tokens = self.tubelet_unembed(self.decoder(tokens, rope))  # (B, L, q*p*p*3)
        tokens = rearrange(tokens, "b (t h w) d -> b t h w d", t=t, h=h, w=w)
        return unpatchify(tokens, cfg.tubelet, cfg.patch)  # (B, T, H, W, 3)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """x: (B, T, H, W, 3) in [-1, 1] -> (recon (B, T, H, W, 3), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior
