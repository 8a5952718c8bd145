"""The generation eval's pieces without Ray: per-sample seeding, the sampling actors (called
directly), the metrics with their sample counts, and the report's count beside gFID / gFVD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers_metrics import randomize_inception_

from vitok.generator import GeneratorConfig, build_objective
from vitok.generator.sampling import generate, sample_labels, sample_noise
from vitok.generator.task import GeneratorTask
from vitok.pipelines.checkpoint_models import tokenizer_from_checkpoint
from vitok.pipelines.generation_eval import (
    GeneratedClips,
    GeneratedFeatures,
    GenerationSpec,
    RealFeatures,
    latent_features,
    preview_ids,
)
from vitok.pipelines.study_report import generation_beside_paper
from vitok.platform.data.latents import LatentStats
from vitok.platform.metrics import inception
from vitok.platform.metrics.evaluate import FeatureMoments, MetricsConfig, frechet_from_moments
from vitok.platform.metrics.feature_pool import (
    generation_metrics,
    networks_configured,
    resolve_networks,
)
from vitok.tokenizer import TokenizerConfig, ViTok

GEN = GeneratorConfig(size="N", num_classes=3, sampling_steps=4, diffusion_steps=50)
TOK = TokenizerConfig.from_variant("N-N/2x8", channels=4, input_size=(2, 16, 16))
LATENT_SHAPE = (*TOK.grid, 4)  # (t, h, w, c)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> GenerationSpec:
    """A tiny DiT (with an updated EMA) and tokenizer saved as training checkpoints."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tokenizer_dir, generator_dir = root / "tokenizer", root / "generator"
    tokenizer_dir.mkdir()
    generator_dir.mkdir()
    torch.save(ViTok(TOK).state_dict(), tokenizer_dir / "model.pt")
    task = GeneratorTask(GEN, latent_channels=4, ema_decay=0.9)
    dit = task.build_model()
    with torch.no_grad():  # a non-trivial output layer, and an EMA that differs from it
        dit.final_layer.linear.weight.normal_(std=0.2)
        task.on_optimizer_step(dit, 1)
        dit.final_layer.linear.weight.normal_(std=0.2)
    torch.save(dit.state_dict(), generator_dir / "model.pt")
    torch.save(task.extra_state(), generator_dir / "task_state.pt")
    return GenerationSpec(
        generator_checkpoint=str(generator_dir),
        tokenizer_checkpoint=str(tokenizer_dir),
        generator=GEN,
        tokenizer=TOK,
        stats=LatentStats((0.5,) * 4, (2.0,) * 4, 1),
        latent_shape=LATENT_SHAPE,
        metrics=MetricsConfig(gen_samples=6),
        num_labels=3,
        seed=7,
    )


def test_metrics_config_sample_count_is_validated():
    assert MetricsConfig().gen_samples == 50_000  # the paper's count
    with pytest.raises(ValueError, match="metrics.gen_samples=1"):
        MetricsConfig(gen_samples=1)
    with pytest.raises(ValueError, match="metrics.gen_batch_size=0"):
        MetricsConfig(gen_batch_size=0)


def test_each_sample_has_its_own_noise_and_a_balanced_label():
    ids = torch.arange(7)
    noise = sample_noise(ids, (2, 3), seed=5)
    halves = torch.cat([sample_noise(ids[:3], (2, 3), 5), sample_noise(ids[3:], (2, 3), 5)])
    assert torch.equal(noise, halves)  # the same set whatever the batching
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise, sample_noise(ids, (2, 3), seed=6))
    assert sample_labels(ids, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert preview_ids(7, 3, per_class=2) == [0, 3, 1, 4, 2, 5]  # grouped by class
    assert preview_ids(4, 3, per_class=2) == [0, 3, 1, 2]


def test_sampling_actor_features_match_a_direct_computation_in_any_batching(spec):
    actor = GeneratedFeatures(spec)
    whole = actor({"id": np.arange(6)})
    parts = [actor({"id": np.arange(0, 4)}), actor({"id": np.arange(4, 6)})]
    assert set(whole) == {"latent", "pixels"}  # no feature network configured
    joined = np.concatenate([p["latent"] for p in parts])
    np.testing.assert_allclose(whole["latent"], joined, rtol=1e-5, atol=1e-6)
    # Independently: the EMA generator and the tokenizer from the files, the same noise.
    task = GeneratorTask(GEN, latent_channels=4)
    dit = task.build_model()
    dit.load_state_dict(torch.load(f"{spec.generator_checkpoint}/model.pt", weights_only=True))
    extra = torch.load(f"{spec.generator_checkpoint}/task_state.pt", weights_only=True)
    task.load_extra_state(extra)
    ema = task.eval_module(dit).eval()
    assert not torch.equal(ema.final_layer.linear.weight, dit.final_layer.linear.weight)
    tokenizer = tokenizer_from_checkpoint(spec.tokenizer_checkpoint, TOK)
    ids = torch.arange(6)
    _, clips = generate(
        ema,
        build_objective(GEN),
        spec.stats,
        tokenizer,
        ids % 3,
        LATENT_SHAPE,
        noise=sample_noise(ids, LATENT_SHAPE, spec.seed),
    )
    with torch.no_grad():
        expected = latent_features(tokenizer.encode(clips).mode()).numpy()
    np.testing.assert_allclose(whole["latent"], expected, rtol=1e-5, atol=1e-6)
    preview = GeneratedClips(spec)({"id": np.array([4, 1])})
    assert preview["id"].tolist() == [4, 1] and preview["clip"].dtype == np.uint8
    assert preview["clip"].shape == (2, *TOK.input_size, 3)
    expected_clips = ((clips[[4, 1]] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(preview["clip"], expected_clips)


def test_network_features_per_sample_for_generated_and_real_clips(spec, tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save(randomize_inception_(inception.FIDInceptionV3()).state_dict(), weights)
    with_net = dataclasses.replace(spec, metrics=MetricsConfig(inception_weights=str(weights)))
    assert networks_configured(with_net.metrics) and not networks_configured(spec.metrics)
    generated = GeneratedFeatures(with_net)({"id": np.arange(2)})
    assert generated["inception"].shape == (2, TOK.input_size[0], 2048)
    real = np.random.default_rng(0).integers(0, 256, (2, 2, 20, 20, 3), dtype=np.uint8)
    features = RealFeatures(with_net, crop=(16, 16))({"clip": real})
    assert set(features) == {"inception", "pixels"} and features["inception"].shape == (2, 2, 2048)
    assert features["pixels"].shape == (2, 2, 48)
    # The real side sees the centre crop: the same features as the cropped clips'.
    cropped = RealFeatures(with_net, crop=None)(
        {"clip": np.ascontiguousarray(real[:, :, 2:18, 2:18])}
    )
    np.testing.assert_allclose(features["inception"], cropped["inception"], rtol=1e-5)


def test_resolve_networks_reads_the_drivers_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITOK_INCEPTION_WEIGHTS", str(tmp_path / "x.pth"))
    monkeypatch.delenv("VITOK_I3D_WEIGHTS", raising=False)
    resolved = resolve_networks(MetricsConfig())
    assert resolved.inception_weights == str(tmp_path / "x.pth") and resolved.i3d_weights is None


def _moments(x: torch.Tensor) -> FeatureMoments:
    m = FeatureMoments()
    m.update(x)
    return m


def test_generation_metrics_with_their_sample_counts():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 4, generator=g)
    fake = torch.randn(10, 4, generator=g)
    out = generation_metrics({"latent": _moments(fake)}, real, reference_latent=real[:10])
    assert out["samples"] == 10 and "gfid" not in out and "real_samples" not in out
    expected = frechet_from_moments(_moments(real), _moments(fake))
    assert out["frechet_tokenizer_latent"] == pytest.approx(expected, rel=1e-12) and expected > 0
    shifted = generation_metrics({"latent": _moments(real + 1.0)}, real)
    assert shifted["frechet_tokenizer_latent"] == pytest.approx(4.0, rel=1e-6)  # ||1||^2, c=4
    features = torch.randn(30, 8, generator=g)
    out = generation_metrics(
        {"latent": _moments(fake), "inception": _moments(features + 0.5)},
        real,
        real_networks={"inception": _moments(features)},
        real_clips=15,
    )
    assert out["gfid"] == pytest.approx(8 * 0.25, rel=1e-6) and out["real_samples"] == 15


def test_pixel_features_pool_each_frame_to_4x4_and_compare_across_trials():
    from vitok.platform.metrics.feature_pool import pixel_features

    clips = torch.zeros(2, 3, 16, 16, 3, dtype=torch.uint8)
    clips[0, :, :8, :8] = 255  # the top-left quarter white in every frame of clip 0
    feats = pixel_features(clips)
    assert feats.shape == (2, 3, 48)
    grid = feats[0, 0].reshape(4, 4, 3)
    assert np.allclose(grid[:2, :2], 1.0) and np.allclose(grid[2:, :], -1.0)
    assert np.allclose(pixel_features(clips.float() / 127.5 - 1), feats)  # uint8 == float
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 4, generator=g)
    px = torch.randn(60, 48, generator=g)
    out = generation_metrics(
        {"latent": _moments(real), "pixels": _moments(px + 0.5)},
        real,
        real_networks={"pixels": _moments(px)},
        real_clips=20,
    )
    assert out["frechet_pixels"] == pytest.approx(48 * 0.25, rel=1e-6) and "gfid" not in out


def test_report_shows_the_sample_count_beside_gfid_and_gfvd():
    row = {"gen/gfvd": 61.234, "gen/samples": 2048.0}
    paper = {"gfvd": 27.44, "psnr": 30.11}
    assert generation_beside_paper(row, paper) == {
        "ours gfvd (samples)": "61.23 (2048)",
        "paper gfvd (samples)": "27.44",  # the paper's count for gFVD is not in our notes
    }
    image = {"gfid": 2.45, "gen_samples": 50_000}
    assert generation_beside_paper({"gen/samples": 32.0}, image) == {
        "ours gfid (samples)": "-",
        "paper gfid (samples)": "2.45 (50000)",
    }
