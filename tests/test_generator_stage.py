"""The generator stage: latent statistics, the GeneratorTask step, the generation eval pieces,
and tokenizer -> latents -> a short generator run on a local Ray (slow)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vitok.generator import GeneratorConfig, build_objective
from vitok.generator.sampling import generate
from vitok.generator.task import DiffusionLoss, GeneratorTask, load_generator
from vitok.pipelines.generation_eval import latent_features
from vitok.platform.data.latents import ChannelMoments, LatentBatch, LatentEncoder, LatentStats
from vitok.platform.metrics.evaluate import FeatureMoments, MeanEvaluator
from vitok.platform.metrics.feature_pool import generation_metrics
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.model import ViTok

TINY_GEN = GeneratorConfig(size="N", num_classes=3, sampling_steps=5, diffusion_steps=100)


# ----------------------------------------------------------------------------- latent statistics
def test_channel_moments_match_numpy_over_batches():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 3.0, 0.5, 10.0])
    shift = np.array([0.0, -2.0, 5.0, 1.0])
    z = rng.normal(size=(10, 2, 3, 3, 4)) * scale + shift  # (N, t, h, w, c)
    moments = ChannelMoments()
    for part in np.array_split(z, 3):  # any batching gives the one-shot statistic
        moments.update(part)
    stats = moments.stats()
    flat = z.reshape(-1, 4)
    assert stats.count == flat.shape[0]
    np.testing.assert_allclose(stats.mean, flat.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, flat.std(axis=0), rtol=1e-10)


def test_latent_stats_normalise_round_trip_and_file(tmp_path):
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(size=(6, 1, 2, 2, 3)) * [2.0, 0.1, 7.0] + [1.0, -1.0, 3.0])
    moments = ChannelMoments()
    moments.update(z)
    stats = moments.stats()
    normed = stats.normalise(z)
    flat = normed.reshape(-1, 3)
    assert torch.allclose(flat.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(stats.denormalise(normed), z.float(), atol=1e-5)
    stats.save(tmp_path / "s.json")
    assert LatentStats.load(tmp_path / "s.json") == stats
    assert json.loads((tmp_path / "s.json").read_text())["count"] == 24
    with pytest.raises(ValueError, match="channels"):
        stats.normalise(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="std"):
        LatentStats((0.0,), (0.0,), 1)


def test_constant_channel_gets_a_floor_not_a_division_by_zero():
    moments = ChannelMoments()
    moments.update(np.stack([np.zeros(5), np.arange(5.0)], axis=-1))  # (5, 2)
    stats = moments.stats()
    assert stats.std[0] == pytest.approx(1e-6) and stats.std[1] == pytest.approx(np.sqrt(2.0))


class _FakeFactory:
    """encode(clips uint8 (B, T, H, W, 3)) -> per-frame channel means (B, T, 1, 1, 3)."""

    def __call__(self, device: str):
        return lambda clips: clips.float().mean(dim=(2, 3))[:, :, None, None, :]


def test_latent_encoder_maps_a_ray_style_batch():
    clips = np.random.default_rng(0).integers(0, 255, size=(2, 3, 4, 4, 3), dtype=np.uint8)
    clips.setflags(write=False)  # Ray hands read-only views
    out = LatentEncoder(_FakeFactory())({"clip": clips, "label": np.array([2, 0])})
    assert out["latent"].shape == (2, 3, 1, 1, 3) and out["latent"].dtype == np.float32
    np.testing.assert_allclose(out["latent"][:, :, 0, 0], clips.mean(axis=(2, 3)), rtol=1e-5)
    assert out["label"].tolist() == [2, 0]


# ----------------------------------------------------------------------------- the task
def _latent_batch(n: int = 6, shape=(2, 2, 2, 4), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"z": torch.randn(n, *shape, generator=g), "label": torch.arange(n) % 3}


def test_generator_task_steps_lower_the_loss_and_update_the_ema():
    torch.manual_seed(0)
    task = GeneratorTask(TINY_GEN, latent_channels=4, ema_decay=0.99)
    model = task.build_model()
    opt = torch.optim.AdamW(task.param_groups(model)[0]["params"], lr=3e-3)
    batch = _latent_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def mean_loss(module) -> float:  # fixed timesteps/noise: comparable across calls
        evaluator = MeanEvaluator(DiffusionLoss(TINY_GEN, repeats=8))
        evaluator.update(module, batch)
        return evaluator.compute()["diffusion_loss"]

    start = mean_loss(model)
    for step in range(60):
        torch.manual_seed(step)
        loss, logs = task.training_step(model, batch, step)
        assert loss.ndim == 0 and set(logs) == {"loss"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.on_optimizer_step(model, step + 1)
    assert mean_loss(model) < 0.8 * start
    # The EMA copy differs from the live weights and from the initial ones.
    averaged = task.eval_module(model)
    assert averaged is not model
    name = "blocks.0.adaLN_modulation.1.weight"
    live, ema, init = model.state_dict()[name], averaged.state_dict()[name], before[name]
    assert not torch.equal(ema, live) and not torch.equal(ema, init)
    # The EMA checkpoint round-trips into a fresh task and into load_generator.
    state = task.extra_state()
    other = GeneratorTask(TINY_GEN, latent_channels=4)
    other.build_model()
    other.load_extra_state(state)
    assert torch.equal(other.eval_module(model).state_dict()[name], ema)
    loaded = load_generator(model.state_dict(), TINY_GEN, 4, state)
    assert torch.equal(loaded.state_dict()[name], ema) and not loaded.training


def test_generator_task_validates():
    with pytest.raises(ValueError, match="ema_decay"):
        GeneratorTask(TINY_GEN, latent_channels=4, ema_decay=1.0)
    with pytest.raises(ValueError, match="latent_channels"):
        GeneratorTask(TINY_GEN, latent_channels=0)


def test_latent_batch_normalises_and_evaluator_is_deterministic():
    stats = LatentStats((1.0, 2.0, 3.0, 4.0), (2.0, 2.0, 2.0, 2.0), 10)
    raw = {"latent": torch.full((2, 1, 1, 1, 4), 3.0), "label": torch.tensor([0, 1])}
    batch = LatentBatch(stats)(raw, True, torch.Generator())
    assert batch["z"][0, 0, 0, 0].tolist() == [1.0, 0.5, 0.0, -0.5]
    task = GeneratorTask(TINY_GEN, latent_channels=4)
    model = task.build_model()
    with torch.no_grad():  # make the zero-initialised output layer non-trivial
        model.final_layer.linear.weight.normal_()
    values = []
    for _ in range(2):
        evaluator = MeanEvaluator(DiffusionLoss(TINY_GEN))
        evaluator.update(model, _latent_batch())
        values.append(evaluator.compute()["diffusion_loss"])
    assert values[0] == values[1] and values[0] > 0


# ----------------------------------------------------------------------------- generation pieces
def test_generate_decodes_clips_and_frechet_is_named_and_zero_for_identical_sets():
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.from_variant("N-N/2x8", channels=4, input_size=(4, 16, 16))
    tokenizer = ViTok(tok_cfg).eval()
    t, h, w = tok_cfg.grid
    dit = GeneratorTask(TINY_GEN, latent_channels=4).build_model().eval()
    stats = LatentStats((0.5,) * 4, (2.0,) * 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    z, clips = generate(
        dit, build_objective(TINY_GEN), stats, tokenizer, labels, (t, h, w, 4), seed=3
    )
    assert z.shape == (6, t, h, w, 4) and clips.shape == (6, 4, 16, 16, 3)
    assert clips.min() >= -1 and clips.max() <= 1
    _, again = generate(
        dit, build_objective(TINY_GEN), stats, tokenizer, labels, (t, h, w, 4), seed=3
    )
    assert torch.equal(clips, again)  # seeded sampling is reproducible
    with torch.no_grad():
        real = latent_features(tokenizer.encode(clips).mode())  # (6, 4)
    assert real.shape == (6, 4)
    moments = FeatureMoments()
    moments.update(real)
    same = generation_metrics({"latent": moments}, real, reference_latent=real)
    assert set(same) == {"samples", "frechet_tokenizer_latent", "frechet_tokenizer_latent_real_ref"}
    assert same["frechet_tokenizer_latent"] == pytest.approx(0.0, abs=1e-6)
    assert same["samples"] == 6


# ----------------------------------------------------------------------------- integration
@pytest.mark.slow
def test_tokenizer_latents_generator_end_to_end(ray_local, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.generator_stage import run_generator
    from vitok.pipelines.presets import preset
    from vitok.pipelines.tokenizer_stage import run_tokenizer
    from vitok.platform.data.prepare import prepare
    from vitok.platform.storage import StorageConfig
    from vitok.platform.tracking.runs import TrackingConfig
    from vitok.platform.training.train import TrainConfig

    base = preset("smoke")
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, steps=10, checkpoint_every=0, log_every=5),
        generator=dataclasses.replace(base.generator, sampling_steps=5),
        generator_train=TrainConfig(
            steps=40, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=0, log_every=10
        ),
        tracking=TrackingConfig(uri=mlflow_uri, experiment="gen-test", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
    )
    prepared = prepare(cfg.data, cfg.storage.uri, progress=False)
    tok = run_tokenizer(cfg, prepared, log_model=False)
    run = run_generator(cfg, prepared, tok.checkpoint_dir, tokenizer_run_id=tok.run_id)

    # Latents: every clip encoded, the tokenizer's latent grid, stats over the train split.
    t, h, w = cfg.tokenizer.grid
    assert run.latents.latent_shape == (t, h, w, cfg.tokenizer.channels)
    assert run.latents.counts == {"train": prepared.num_train, "val": prepared.num_val}
    assert run.latents.stats.count == prepared.num_train * t * h * w
    assert run.latents.pooled("val").shape == (prepared.num_val, cfg.tokenizer.channels)

    client = MlflowClient(mlflow_uri)
    losses = [m.value for m in client.get_metric_history(run.run_id, "train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert run.metrics["val/diffusion_loss"] < 1.0  # below the zero-prediction loss of 1
    assert run.metrics["gen/samples"] == cfg.metrics.gen_samples == 3 * 4

    mlrun = client.get_run(run.run_id)
    assert mlrun.data.params["gen_samples"] == "12"  # the count behind every generation metric

    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["vitok.tokenizer_run_id"] == tok.run_id
    assert mlrun.data.tags["vitok.kind"] == "generator"
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "samples")}
    assert {"samples/grid.png", "samples/samples.mp4"} <= artifacts
    assert {"final/frechet_tokenizer_latent", "final/diffusion_loss"} <= set(mlrun.data.metrics)

    # The reported distance is the one of samples 0 .. 11, recomputed here without Ray from
    # the checkpoints: the same per-sample noise and labels, re-encoded, against val latents.
    from vitok.generator.sampling import sample_noise
    from vitok.generator.task import load_generator
    from vitok.pipelines.checkpoint_models import tokenizer_from_checkpoint
    from vitok.platform.metrics.evaluate import frechet_from_moments
    from vitok.platform.training.train import load_model_state

    extra = torch.load(f"{run.checkpoint_dir}/task_state.pt", weights_only=True)
    dit = load_generator(load_model_state(run.checkpoint_dir), cfg.generator, 4, extra)
    tokenizer = tokenizer_from_checkpoint(tok.checkpoint_dir, cfg.tokenizer)
    ids = torch.arange(cfg.metrics.gen_samples)
    _, clips = generate(
        dit,
        build_objective(cfg.generator),
        run.latents.stats,
        tokenizer,
        ids % 3,
        run.latents.latent_shape,
        noise=sample_noise(ids, run.latents.latent_shape, seed=0),
    )
    assert clips.shape == (12, *cfg.tokenizer.input_size, 3)
    fake, real = FeatureMoments(), FeatureMoments()
    with torch.no_grad():
        fake.update(latent_features(tokenizer.encode(clips).mode()))
    real.update(torch.from_numpy(run.latents.pooled("val")))
    expected = frechet_from_moments(real, fake)
    assert run.metrics["gen/frechet_tokenizer_latent"] == pytest.approx(expected, rel=1e-4)

    # frechet_pixels: the same samples and the first val clips, frames pooled to 4x4 RGB.
    from vitok.platform.data.prepare import clip_dataset, to_model_input
    from vitok.platform.metrics.feature_pool import pixel_features

    val = clip_dataset(prepared, "val").limit(cfg.metrics.gen_samples).take_all()
    real_clips = to_model_input(np.stack([r["clip"] for r in val]), crop=None, flip=False)
    fake_px, real_px = FeatureMoments(), FeatureMoments()
    fake_px.update(torch.from_numpy(pixel_features(clips)).double().flatten(0, 1))
    real_px.update(torch.from_numpy(pixel_features(real_clips)).double().flatten(0, 1))
    expected = frechet_from_moments(real_px, fake_px)
    assert run.metrics["gen/frechet_pixels"] == pytest.approx(expected, rel=1e-3) and expected > 0
    assert run.metrics["gen/real_samples"] == len(val)
