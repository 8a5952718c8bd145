"""Tokenizer losses, LPIPS weight loading, discriminator and EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vitok.layers import EMA, load_average
from vitok.tokenizer import (
    LPIPS,
    LossConfig,
    TokenizerConfig,
    ViTok,
    build_discriminator,
    build_lpips,
    disc_lr_scale,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from vitok.tokenizer.lpips import TAP_CHANNELS, vgg16_features


def _fake_torchvision_vgg16(path: Path) -> None:
    """A full-model vgg16 state dict as torchvision saves it: features.* plus classifier.*."""
    torch.manual_seed(0)
    features = vgg16_features()
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            nn.init.normal_(m.bias, std=0.01)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 8)  # the file's other keys are ignored
    state["classifier.0.bias"] = torch.randn(8)
    torch.save(state, path)


def _fake_lpips_heads(path: Path) -> None:
    """The lpips package's vgg.pth layout: lin{i}.model.1.weight of shape (1, C, 1, 1)."""
    state = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(state, path)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lpips")
    vgg, heads = folder / "vgg16.pth", folder / "vgg.pth"
    _fake_torchvision_vgg16(vgg)
    _fake_lpips_heads(heads)
    return vgg, heads


def test_lpips_loads_files_and_measures_distance(weight_files):
    vgg, heads = weight_files
    lpips = LPIPS.from_files(vgg, heads)
    saved = torch.load(vgg, weights_only=True)
    assert torch.equal(lpips.features[28].weight, saved["features.28.weight"])
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32, 3) * 2 - 1  # video: per-frame LPIPS
    assert lpips(x, x).shape == (2,)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    small = lpips(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    large = lpips(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))
    assert (small > 0).all() and (large > small).all()
    assert lpips(x[:, 0], x[:, 0]).shape == (2,)  # images (B, H, W, 3)
    lpips.train()
    assert not lpips.training  # stays a fixed network


def test_lpips_rejects_wrong_files(weight_files, tmp_path):
    vgg, heads = weight_files
    with pytest.raises(FileNotFoundError, match="no such file"):
        LPIPS.from_files(tmp_path / "missing.pth", heads)
    with pytest.raises(ValueError, match="lacks"):
        LPIPS.from_files(heads, heads)  # heads file given as the VGG file
    bad = tmp_path / "bad_heads.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, 3, 1, 1) for i in range(5)}, bad)
    with pytest.raises(ValueError, match=r"lin0.*shape \(1, 3, 1, 1\), expected \(1, 64, 1, 1\)"):
        LPIPS.from_files(vgg, bad)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a tensor state dict"):
        LPIPS.from_files(garbage, heads)
    pickled = tmp_path / "object.pth"
    torch.save({"features.0.weight": torch.zeros(1), "meta": object()}, pickled)
    with pytest.raises(ValueError, match="not a tensor state dict"):
        LPIPS.from_files(pickled, heads)


def _batch(seed: int = 0) -> tuple[ViTok, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        encoder_size="N", decoder_size="N", patch=4, tubelet=2, channels=4, input_size=(2, 16, 16)
    )
    return ViTok(cfg), torch.rand(2, 2, 16, 16, 3) * 2 - 1


def test_reconstruction_loss_terms(weight_files):
    model, x = _batch()
    recon, posterior = model(x)
    cfg = LossConfig(recon="l1", lpips_weight=0.0)
    total, logs = reconstruction_loss(recon, x, posterior, cfg)
    expected = (recon - x).abs().mean() + 1e-3 * posterior.kl().mean()
    torch.testing.assert_close(total, expected)
    assert set(logs) == {"recon", "kl", "loss"} and all(isinstance(v, float) for v in logs.values())
    total.backward()
    with pytest.raises(ValueError, match="lpips_weight"):
        reconstruction_loss(recon, x, posterior, LossConfig())
    vgg, heads = weight_files
    cfg = LossConfig(vgg_weights=str(vgg), lpips_weights=str(heads))
    lpips = build_lpips(cfg)
    assert lpips is not None and build_lpips(LossConfig()) is None
    recon, posterior = model(x)
    total, logs = reconstruction_loss(recon, x, posterior, cfg, lpips)
    assert logs["lpips"] > 0
    assert total.item() == pytest.approx(
        logs["recon"] + 1e-3 * logs["kl"] + logs["lpips"], rel=1e-5
    )


def test_gan_losses_and_discriminator_step():
    model, x = _batch()
    cfg = LossConfig(lpips_weight=0.0)
    disc = build_discriminator(cfg, min_side=16)
    recon, posterior = model(x)
    assert disc(x).shape == (4,)  # per frame: B * T
    d_loss, d_logs = discriminator_loss(disc, x, recon)
    assert d_loss.item() == pytest.approx(2.0, abs=0.5)  # hinge at logits ~ 0
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert model.tubelet_unembed.weight.grad is None  # fake was detached
    g_total, g_logs = generator_loss(recon, x, posterior, cfg, disc)
    assert g_logs["loss"] == pytest.approx(
        g_logs["recon"] + 1e-3 * g_logs["kl"] + 0.05 * g_logs["gan_g"], rel=1e-5
    )
    assert disc_lr_scale(cfg, 0) == pytest.approx(1e-3) and disc_lr_scale(cfg, 5000) == 1.0


def test_discriminator_learns_real_from_fake():
    torch.manual_seed(0)
    disc = build_discriminator(LossConfig(disc_channels=8, disc_max_channels=16), min_side=16)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    real = torch.rand(4, 1, 16, 16, 3) * 0.2 + 0.5
    fake = torch.rand(4, 1, 16, 16, 3) * 2 - 1
    for _ in range(30):
        loss, logs = discriminator_loss(disc, real, fake)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["logits_real"] > logs["logits_fake"]
    assert loss.item() < 1.0


def test_ema_warms_up_tracks_and_round_trips():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    assert ema.current_decay() == pytest.approx(0.1)  # warm-up: (1 + 0) / (10 + 0)
    ema.update(model)  # shadow = 0.1 * before + 0.9 * (before + 2)
    torch.testing.assert_close(ema.shadow["weight"], before + 1.8)
    # From n = 8 updates on, (1 + n) / (10 + n) >= 0.5: the configured decay takes over.
    ema.num_updates = 8
    assert ema.current_decay() == 0.5
    ema.update(model)  # shadow = 0.5 * (before + 1.8) + 0.5 * (before + 2)
    torch.testing.assert_close(ema.shadow["weight"], before + 1.9)
    other = nn.Linear(3, 2)
    restored = EMA(other)
    restored.load_state_dict(ema.state_dict())
    restored.copy_to(other)
    torch.testing.assert_close(other.weight, before + 1.9)
    assert restored.decay == 0.5 and restored.num_updates == 9
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, decay=1.0)


def test_load_average_copies_an_updated_average_only():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    fresh = nn.Linear(3, 2)
    assert load_average(fresh, ema.state_dict()) is False  # never updated: weights untouched
    assert load_average(fresh, None) is False
    assert not torch.equal(fresh.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert load_average(fresh, ema.state_dict()) is True
    torch.testing.assert_close(fresh.weight, ema.shadow["weight"])
    torch.testing.assert_close(fresh.bias, ema.shadow["bias"])


def test_stage2_evaluation_sees_a_short_fine_tune_through_the_ema():
    """With the paper's 0.9999 and no warm-up, 30 updates would leave the evaluated decoder
    at 0.3% of the fine-tune; with the warm-up it holds most of it."""
    decoder = nn.Linear(4, 4)
    start = decoder.weight.detach().clone()
    ema = EMA(decoder, decay=0.9999)
    with torch.no_grad():
        decoder.weight.add_(1.0)  # the fine-tuned weights, from the first update on
    for _ in range(30):
        ema.update(decoder)
    share = float((ema.shadow["weight"] - start).mean())  # fraction of the move, in [0, 1]
    expected = 1.0
    for n in range(30):
        expected *= (1 + n) / (10 + n)  # what is left of the start after each update
    assert share == pytest.approx(1 - expected, rel=1e-5) and share > 0.9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"recon": "huber"}, "recon='huber'"),
        ({"kl_weight": -1.0}, "kl_weight=-1.0"),
        ({"vgg_weights": "a.pth"}, "lpips_weights=None"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"disc_lr": 0.0}, "disc_lr=0.0"),
    ],
)
def test_loss_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)
