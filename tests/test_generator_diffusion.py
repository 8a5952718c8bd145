"""The diffusion objective: schedule, DDIM recovering the forward process, class dropout, and a
tiny DiT whose diffusion loss drops on a small fixed latent set."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vitok.generator import (
    DiT,
    GaussianDiffusion,
    GeneratorConfig,
    build_objective,
    drop_labels,
    linear_betas,
)


class OracleDenoiser:
    """Predicts the true noise for a known clean latent: eps = (x_t - sqrt(abar_t) x0) /
    sqrt(1 - abar_t), with x0 = ``x0`` for a class label and ``x0_null`` for the null label.

    ``forward_with_cfg`` combines them as DiT does (uncond + w (cond - uncond)); since eps is
    affine in x0, that is the oracle for x0_null + w (x0 - x0_null), which DDIM then
    recovers exactly: the guidance ``sample()`` applies shows in what it returns.
    """

    def __init__(
        self, diffusion: GaussianDiffusion, x0: Tensor, x0_null: Tensor | None = None
    ) -> None:
        self.diffusion = diffusion
        self.x0 = x0
        self.x0_null = x0 if x0_null is None else x0_null
        self.calls: list[Tensor] = []
        self.guidances: list[float] = []

    def __call__(self, z_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append(t.clone())
        null = (y == self.diffusion.null_class).reshape(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        x0 = torch.where(null, self.x0_null, self.x0)
        abar = self.diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        return (z_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def forward_with_cfg(self, z_t: Tensor, t: Tensor, y: Tensor, guidance: float) -> Tensor:
        self.guidances.append(guidance)
        cond = self(z_t, t, y)
        self.calls.pop()  # one network evaluation per sampling step, as in DiT
        uncond = self(z_t, t, torch.full_like(y, self.diffusion.null_class))
        return uncond + guidance * (cond - uncond)


def _tiny_schedule(**kw) -> GaussianDiffusion:
    # 10 steps with large betas so x_T is mostly noise (abar_9 ~ 0.07).
    args = dict(num_classes=3, diffusion_steps=10, beta_start=0.05, beta_end=0.5)
    args.update({"sampling_steps": 10, "guidance": 1.0, **kw})
    return GaussianDiffusion(**args)


# ----------------------------------------------------------------------------- schedule
def test_linear_schedule_matches_ddpm():
    betas = linear_betas(1000)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    d = GaussianDiffusion.from_config(GeneratorConfig())
    abar = d.alphas_cumprod
    assert (abar[1:] < abar[:-1]).all()
    assert abar[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # the ADM linear schedule's end


def test_ddim_timesteps_are_evenly_spaced_and_descending():
    d = GaussianDiffusion(num_classes=2)
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    ts = d.ddim_timesteps(250)
    assert len(ts) == 250 == len(set(ts)) and ts[0] == 999 and ts[-1] == 0
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert min(gaps) >= 4 and max(gaps) <= 5
    assert d.ddim_timesteps(1) == [999]
    with pytest.raises(ValueError, match="steps"):
        d.ddim_timesteps(1001)


# ----------------------------------------------------------------------------- DDIM
def test_ddim_with_all_steps_walks_back_along_the_forward_process():
    torch.manual_seed(0)
    d = _tiny_schedule()
    x0 = torch.randn(2, 1, 3, 3, 4)
    eps = torch.randn_like(x0)
    oracle = OracleDenoiser(d, x0)
    ts = d.ddim_timesteps(10)
    x = d.q_sample(x0, torch.full((2,), ts[0]), eps)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        x = d.ddim_step(x, t, t_prev, oracle(x, torch.full((2,), t), torch.zeros(2)))
        expected = x0 if t_prev < 0 else d.q_sample(x0, torch.full((2,), t_prev), eps)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps,guidance", [(10, 1.0), (10, 2.5), (4, 1.0), (4, 4.0), (10, 0.0)])
def test_ddim_sampling_with_an_oracle_recovers_the_guided_x0(steps, guidance):
    torch.manual_seed(0)
    d = _tiny_schedule()
    x0 = torch.randn(3, 2, 2, 3, 4)  # what the labels ask for
    x0_null = torch.randn(3, 2, 2, 3, 4)  # what the unconditional model would give
    oracle = OracleDenoiser(d, x0, x0_null)
    g = torch.Generator().manual_seed(1)
    out = d.sample(oracle, x0.shape, torch.tensor([0, 1, 2]), steps, guidance, generator=g)
    # Guidance w extrapolates from the unconditional target through the conditional one.
    guided = x0_null + guidance * (x0 - x0_null)
    torch.testing.assert_close(out, guided, atol=1e-4, rtol=1e-4)
    assert [c[0].item() for c in oracle.calls] == d.ddim_timesteps(steps)
    # w = 1 is the conditional model alone (no unconditional pass); otherwise every step is
    # guided with the requested w.
    assert oracle.guidances == ([] if guidance == 1.0 else [guidance] * steps)


def test_sampling_uses_the_configured_guidance_by_default():
    d = _tiny_schedule(guidance=3.0)
    x0, x0_null = torch.randn(2, 1, 2, 2, 4), torch.randn(2, 1, 2, 2, 4)
    out = d.sample(OracleDenoiser(d, x0, x0_null), x0.shape, torch.tensor([0, 2]), steps=5)
    torch.testing.assert_close(out, x0_null + 3.0 * (x0 - x0_null), atol=1e-4, rtol=1e-4)


def test_q_sample_noise_level():
    d = GaussianDiffusion.from_config(GeneratorConfig())
    x0 = torch.zeros(4096, 1, 1, 1, 1)
    noise = torch.randn_like(x0)
    x_end = d.q_sample(x0 + 1.0, torch.full((4096,), 999), noise)
    x_start = d.q_sample(x0 + 1.0, torch.zeros(4096, dtype=torch.long), noise)
    assert abs(x_end.mean().item()) < 0.1 and x_end.std().item() == pytest.approx(1.0, abs=0.05)
    assert (x_start - 1.0).abs().max().item() < 0.05


# ----------------------------------------------------------------------------- class dropout
def test_drop_labels_replaces_about_p_of_the_labels_with_the_null_class():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (20000,), generator=g)
    dropped = drop_labels(y, null_class=7, p=0.1, generator=g)
    is_null = dropped == 7
    assert 0.09 < is_null.float().mean().item() < 0.11
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(drop_labels(y, 7, 0.0), y)


def test_training_loss_drops_labels_at_the_configured_rate():
    seen: list[Tensor] = []

    def spy(z_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        seen.append(y)
        return torch.zeros_like(z_t)

    cfg = GeneratorConfig(num_classes=4, class_dropout=0.25)
    d = GaussianDiffusion.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(4000, 1, 1, 1, 2)
    loss, logs = d.training_loss(spy, x0, torch.randint(0, 4, (4000,), generator=g), g)
    frac = (seen[0] == cfg.null_class).float().mean().item()
    assert 0.22 < frac < 0.28
    # A zero prediction scores the noise's second moment, about 1.
    assert loss.item() == pytest.approx(1.0, abs=0.05) and logs["loss"] == loss.item()


# ----------------------------------------------------------------------------- training
def _eval_loss(d: GaussianDiffusion, model: DiT, x0: Tensor, y: Tensor) -> float:
    """Diffusion loss on fixed timesteps and noise (seeded), with the true labels."""
    no_drop = GaussianDiffusion(
        num_classes=d.num_classes, class_dropout=0.0, diffusion_steps=d.num_timesteps
    )
    with torch.no_grad():
        losses = [
            no_drop.training_loss(model, x0, y, torch.Generator().manual_seed(s))[0].item()
            for s in range(8)
        ]
    return sum(losses) / len(losses)


def test_tiny_dit_diffusion_loss_drops_and_samples_have_the_latent_shape():
    torch.manual_seed(0)
    cfg = GeneratorConfig(size="N", num_classes=4, sampling_steps=10)
    d = build_objective(cfg)
    assert isinstance(d, GaussianDiffusion)
    model = DiT(cfg, latent_channels=4)
    # A small fixed set of structured latents: 8 clips of (t, h, w, c) = (2, 4, 4, 4).
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 4
    x0 = torch.randn(4, 2, 4, 4, 4, generator=g)[y] * 0.5 + 0.5 * torch.randn(
        8, 2, 4, 4, 4, generator=g
    )
    before = _eval_loss(d, model, x0, y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(150):
        loss, _ = d.training_loss(model, x0, y, torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(d, model, x0, y)
    print(f"tiny DiT diffusion loss: {before:.4f} -> {after:.4f} after 150 steps")
    assert before == pytest.approx(1.0, abs=0.1)  # a fresh model predicts 0
    assert after < 0.5 * before
    samples = d.sample(model.eval(), x0.shape, y, generator=torch.Generator().manual_seed(0))
    assert samples.shape == x0.shape and torch.isfinite(samples).all()
