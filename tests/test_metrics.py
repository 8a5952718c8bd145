"""PSNR/SSIM against scikit-image on real frames, Frechet distance, accumulators, skip notices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers_metrics import add_noise, decode_frames, reduce_worker
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vitok.platform.metrics import evaluate as metrics
from vitok.platform.metrics.evaluate import (
    FeatureMoments,
    MetricsConfig,
    MetricState,
    ReconstructionMetrics,
    frechet_distance,
    frechet_from_moments,
    psnr,
    ssim,
    to_uint8,
    to_unit_float,
)


@pytest.fixture(scope="module")
def real_pair(sample_videos) -> tuple[np.ndarray, np.ndarray]:
    """Two real clips (2, 3, 96, 128, 3) uint8 and noisy reconstructions of them."""
    clips = np.stack([decode_frames(path, count=3) for path in sample_videos[:2]])
    noisy = np.stack([add_noise(clip, std=10.0 + 8 * i, seed=i) for i, clip in enumerate(clips)])
    return clips, noisy


def _skimage_per_clip(fn, real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    return np.array([np.mean([fn(r, f) for r, f in zip(rc, fc)]) for rc, fc in zip(real, fake)])


def test_psnr_and_ssim_match_scikit_image_on_real_frames(real_pair):
    real, fake = real_pair
    ref_psnr = _skimage_per_clip(
        lambda r, f: peak_signal_noise_ratio(r, f, data_range=255), real, fake
    )
    ref_ssim = _skimage_per_clip(
        lambda r, f: structural_similarity(
            r,
            f,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        ),
        real,
        fake,
    )
    ours_psnr = psnr(torch.from_numpy(real), torch.from_numpy(fake)).numpy()
    ours_ssim = ssim(torch.from_numpy(real), torch.from_numpy(fake)).numpy()
    np.testing.assert_allclose(ours_psnr, ref_psnr, atol=1e-3)
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=1e-3)
    # The noisier second clip must score worse on both.
    assert ours_psnr[1] < ours_psnr[0] and ours_ssim[1] < ours_ssim[0]


def test_float_input_is_quantised_to_the_same_frames(real_pair):
    real, fake = (torch.from_numpy(a) for a in real_pair)
    assert torch.equal(to_uint8(to_unit_float(real)), real)
    torch.testing.assert_close(psnr(to_unit_float(real), to_unit_float(fake)), psnr(real, fake))
    torch.testing.assert_close(ssim(to_unit_float(real), fake), ssim(real, fake))


def test_identical_frames_and_bad_shapes():
    x = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert torch.allclose(psnr(x, x), torch.full((2,), metrics.PSNR_MAX_DB))
    images = x[:, 0]  # (B, H, W, 3) is read as T = 1
    assert psnr(images, images).shape == (2,)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8])
    with pytest.raises(ValueError, match="differ"):
        psnr(x, x[:1])


def test_frechet_distance_identical_sets_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    moments = FeatureMoments()
    moments.update(feats)
    assert abs(frechet_from_moments(moments, moments)) < 1e-8


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Equal covariances: only the mean shift is left.
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(
        float(np.sum((mu1 - mu2) ** 2)), rel=1e-9, abs=1e-9
    )
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    va, vb = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(expected)
    # General case against scipy's sqrtm, and a singular covariance does not break it.
    b = rng.normal(size=(8, 3))
    sigma2 = b @ b.T  # rank 3
    covmean = scipy.linalg.sqrtm(sigma @ sigma2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(sigma + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma, mu2, sigma2) == pytest.approx(ref, rel=1e-6)


def test_moments_merged_over_batches_equal_one_shot():
    feats = torch.randn(301, 12, generator=torch.Generator().manual_seed(1)) * 2 + 5
    merged = FeatureMoments()
    for chunk in feats.split(37):
        part = FeatureMoments()
        part.update(chunk)
        merged.merge(part)
    mean, cov = merged.mean_cov()
    ref = feats.double().numpy()
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="feature dim"):
        merged.update(torch.zeros(2, 5))


def test_metric_state_merge_equals_one_shot():
    values = torch.arange(10.0)
    whole, left, right = MetricState(), MetricState(), MetricState()
    whole.add_values("psnr", values)
    left.add_values("psnr", values[:3])
    right.add_values("psnr", values[3:])
    assert left.merge(right).means() == whole.means() == {"psnr": 4.5}


def test_all_reduce_across_two_processes_equals_one_shot(tmp_path):
    feats = torch.randn(40, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.multiprocessing.start_processes(
        reduce_worker,
        args=(2, str(tmp_path / "init"), feats, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    ref = feats.numpy()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        np.testing.assert_allclose(out["mean"].numpy(), ref.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out["cov"].numpy(), np.cov(ref, rowvar=False), atol=1e-12)
        assert out["psnr"]["psnr"] == pytest.approx(float(ref[:, 0].mean()))
        # The mean of per-clip values: rank 1 saw no batch and still takes part.
        assert out["first"] == {"first": pytest.approx(float(ref[:, 0].mean()), rel=1e-12)}


def test_skip_is_announced_once_by_name(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_ANNOUNCED", set())
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    x = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
    for _ in range(2):
        evaluator = ReconstructionMetrics(MetricsConfig())
        evaluator.update(x, x)
        assert set(evaluator.compute()) == {"psnr", "ssim"}
    out = capsys.readouterr().out
    for metric, hint in [("fid", "VITOK_INCEPTION_WEIGHTS"), ("fvd", "VITOK_I3D_WEIGHTS")]:
        assert out.count(f"{metric} skipped") == 1
        assert hint in out
    assert out.count("lpips skipped") == 1


def test_configured_weights_must_exist_and_config_is_validated(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_ANNOUNCED", set())
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        ReconstructionMetrics(MetricsConfig(inception_weights=str(tmp_path / "nope.pth")))
    monkeypatch.setenv(metrics.I3D_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="VITOK_I3D_WEIGHTS"):
        metrics.load_i3d(MetricsConfig())
    with pytest.raises(ValueError, match="fvd_num_frames"):
        MetricsConfig(fvd_num_frames=0)
    with pytest.raises(ValueError, match="inception_weights"):
        MetricsConfig(inception_weights=" ")


def test_injected_lpips_is_averaged_per_clip(monkeypatch):
    monkeypatch.setattr(metrics, "_ANNOUNCED", {"fid", "fvd"})
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    seen = []

    def fake_lpips(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        seen.append((real.shape, real.dtype, float(real.min()), float(real.max())))
        return (real - fake).abs().mean(dim=(1, 2, 3))  # (N,)

    real = torch.zeros(2, 3, 16, 16, 3, dtype=torch.uint8)
    fake = real.clone()
    fake[1] = 255  # clip 1 differs by the full range: 2.0 in [-1, 1] units
    evaluator = ReconstructionMetrics(MetricsConfig(), lpips_fn=fake_lpips)
    evaluator.update(real, fake)
    assert seen == [((6, 16, 16, 3), torch.float32, -1.0, -1.0)]
    assert evaluator.compute()["lpips"] == pytest.approx(1.0)
