"""Diffusion objectives for the latent generator, behind a small interface.

`Objective` is what the training loop and the generation eval call: `training_loss` for a
batch of clean latents and `sample` for new ones. `GaussianDiffusion` implements the paper's
setup (DiT / ADM): a 1000-step linear beta schedule, epsilon prediction with an MSE loss,
class dropout to the null label for classifier-free guidance, and deterministic DDIM
sampling (eta = 0) over evenly spaced timesteps. A flow-matching objective can be added later
as another class with the same two methods.

Latents are channels-last `z: (B, t, h, w, c)`; any shape with a leading batch dim works.
An optional `torch.Generator` must live on the latents' device (it seeds timesteps, noise and
label dropout, so a seeded call is reproducible).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from vitok.generator.config import GeneratorConfig


class Denoiser(Protocol):
    """What an objective needs from the network (`vitok.generator.dit.DiT` is one)."""

    def __call__(self, z_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """z_t: (B, ...) noisy latents, t: (B,) timesteps, y: (B,) labels -> (B, ...)."""
        ...

    def forward_with_cfg(self, z_t: Tensor, t: Tensor, y: Tensor, guidance: float) -> Tensor:
        """Classifier-free guided prediction, same shapes as `__call__`."""
        ...


class Objective(Protocol):
    """A generative objective over latents: its training loss and its sampler."""

    def training_loss(
        self,
        model: Denoiser,
        x0: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """x0: (B, ...) clean latents, y: (B,) int labels -> (scalar loss, float logs)."""
        ...

    def sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        y: Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """y: (B,) int labels -> latents of `shape` (B, ...); None = the configured default.
        `noise` (shape) is the starting point instead of a draw from `generator`."""
        ...


def drop_labels(
    y: Tensor, null_class: int, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label with `null_class` with probability p (classifier-free guidance).

    y: (B,) int -> (B,) int, a new tensor.
    """
    if p <= 0.0:
        return y.clone()
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p  # (B,)
    return torch.where(drop, torch.full_like(y, null_class), y)


def linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule, (steps,) float64. 1000 steps: 1e-4 .. 0.02 (DiT / ADM)."""
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table: (T,) float64, t: (B,) int -> (B, 1, ..., 1) broadcastable to `like`."""
    out = table.to(t.device)[t].to(like.dtype)  # (B,)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with epsilon prediction and DDIM sampling.

    The schedule lives in float64 on the CPU and is gathered per batch onto the latents'
    device and dtype. Timesteps are integers in [0, T); the model sees them as given.
    """

    def __init__(
        self,
        num_classes: int,
        class_dropout: float = 0.1,
        diffusion_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        sampling_steps: int = 250,
        guidance: float = 2.0,
    ) -> None:
        self.num_classes = num_classes
        self.null_class = num_classes
        self.class_dropout = class_dropout
        self.num_timesteps = diffusion_steps
        self.sampling_steps = sampling_steps
        self.guidance = guidance
        self.betas = linear_betas(diffusion_steps, beta_start, beta_end)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) abar_t
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> GaussianDiffusion:
        return cls(
            num_classes=cfg.num_classes,
            class_dropout=cfg.class_dropout,
            diffusion_steps=cfg.diffusion_steps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            sampling_steps=cfg.sampling_steps,
            guidance=cfg.guidance,
        )

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. x0, noise: (B, ...), t: (B,) int."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample given the noise: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (x_t - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _gather(
            self.sqrt_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        model: Denoiser,
        x0: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """MSE between the true and predicted noise at uniformly drawn timesteps.

        x0: (B, ...) clean (normalised) latents, y: (B,) int labels in [0, num_classes).
        Labels are dropped to the null class with probability `class_dropout`.
        Returns (scalar loss with grad, {"loss": float}).
        """
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        y_in = drop_labels(y, self.null_class, self.class_dropout, generator)
        x_t = self.q_sample(x0, t, noise)  # (B, ...)
        eps_pred = model(x_t, t, y_in)  # (B, ...)
        loss = F.mse_loss(eps_pred.float(), noise.float())
        return loss, {"loss": loss.detach().item()}

    # ------------------------------------------------------------------ sampling
    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced timesteps from T - 1 down to 0 (all of them when steps = T)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps={steps} must lie in [1, {self.num_timesteps}]")
        if steps == 1:
            return [self.num_timesteps - 1]
        ts = torch.linspace(0, self.num_timesteps - 1, steps).round().long()
        return ts.flip(0).tolist()

    def ddim_step(self, x_t: Tensor, t: int, t_prev: int, eps: Tensor) -> Tensor:
        """One deterministic DDIM update (eta = 0) from timestep t to t_prev (-1 = clean).

        x_t, eps: (B, ...) -> x_{t_prev}: (B, ...).
        """
        abar_t = self.alphas_cumprod[t].item()
        abar_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        x0_pred = (x_t - (1.0 - abar_t) ** 0.5 * eps) / abar_t**0.5
        return abar_prev**0.5 * x0_pred + (1.0 - abar_prev) ** 0.5 * eps

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        y: Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """DDIM sampling with classifier-free guidance.

        shape: (B, t, h, w, c) latent shape; y: (B,) int labels on the target device.
        steps / guidance default to the configured `sampling_steps` / `guidance`; guidance 1
        runs the conditional model alone. `noise` (shape) replaces the initial x_T draw.
        Returns clean latents (B, t, h, w, c) float32, in the model's normalised space.
        """
        steps = self.sampling_steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        if noise is None:
            x = torch.randn(shape, generator=generator, device=y.device)
        else:
            x = noise.to(y.device, torch.float32)
        ts = self.ddim_timesteps(steps)
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            t_batch = torch.full((shape[0],), t, device=y.device, dtype=torch.long)  # (B,)
            if guidance == 1.0:
                eps = model(x, t_batch, y)
            else:
                eps = model.forward_with_cfg(x, t_batch, y, guidance)
            x = self.ddim_step(x, t, t_prev, eps.float())
        return x


def build_objective(cfg: GeneratorConfig) -> Objective:
    """The objective named by `cfg.objective`: "eps", GaussianDiffusion, the only one
    `GeneratorConfig` admits (`OBJECTIVES`); another would be chosen here."""
    return GaussianDiffusion.from_config(cfg)
