"""Generation evaluation (a library the generator stage calls, not a stage):
``metrics.gen_samples`` clips from the EMA generator, sampled in batches across Ray workers,
against the real clips.

- Sample ``i`` has label ``i % classes`` and its own seeded starting noise
  (``vitok.generator.sampling``), so the sampled set is the same whatever the batch size or
  the number of workers.
- A Ray Data actor pool (``vitok.platform.metrics.feature_pool``; one GPU per actor when the
  generator trained on GPUs) loads the DiT (EMA weights), the tokenizer and the feature
  networks once per actor, samples a batch (DDIM + classifier-free guidance), decodes it and
  returns only per-sample features: the token-mean-pooled posterior mean of the re-encoded
  clip (c), pooled pixels (48 per frame), Inception pool features per frame (2048), I3D
  features per 16-frame window (400).
- The driver sums the features into exact moments and computes the Frechet distances
  (``generation_metrics``): ``frechet_pixels`` (always: one fixed space that every trial
  shares, so it compares across tokenizers), ``frechet_tokenizer_latent`` (always; in the
  tokenizer's own latent space, so only within its trial; *not* FID), ``gfid`` and ``gfvd``
  when the Inception / I3D weight files are configured. The real side's network features
  come from the same actors, over ``min(gen_samples, clips in the split)`` clips.
- ``samples`` (and ``real_samples``) are returned beside the distances: a Frechet distance
  depends on the sample count, so no number is compared with the paper's at another count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitok.generator.config import GeneratorConfig
from vitok.generator.diffusion import build_objective
from vitok.generator.sampling import generate, sample_labels, sample_noise
from vitok.pipelines.checkpoint_models import generator_from_checkpoint, tokenizer_from_checkpoint
from vitok.platform.data.latents import LatentSet, LatentStats, pool_tokens
from vitok.platform.data.prepare import DataConfig, PreparedData, clip_dataset, to_model_input
from vitok.platform.metrics.artifacts import log_samples
from vitok.platform.metrics.evaluate import FeatureMoments, MetricsConfig, to_uint8, to_unit_float
from vitok.platform.metrics.feature_pool import (
    FeatureNetworks,
    Workers,
    accumulate_moments,
    announce_missing_networks,
    generation_metrics,
    ids_dataset,
    map_actors,
    resolve_networks,
)
from vitok.platform.tracking.runs import RunLogger
from vitok.platform.training.train import TrainConfig
from vitok.tokenizer.config import TokenizerConfig

PREVIEW_PER_CLASS = 4  # generated samples per class in the logged grid / mp4


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """(N, t, h, w, c) -> (N, c): the mean over the latent tokens (the Frechet feature; the
    real side's is ``vitok.platform.data.latents.pool_tokens`` of the stored latents)."""
    return torch.from_numpy(pool_tokens(latents.detach().cpu().numpy()))


# ----------------------------------------------------------------------------- the actors
@dataclass(frozen=True)
class GenerationSpec:
    """Everything a sampling worker needs (picklable; checkpoints as folders or URIs that
    every node reaches)."""

    generator_checkpoint: str
    tokenizer_checkpoint: str
    generator: GeneratorConfig
    tokenizer: TokenizerConfig
    stats: LatentStats
    latent_shape: tuple[int, ...]  # (t, h, w, c)
    metrics: MetricsConfig  # weight files resolved on the driver (see ``resolve_networks``)
    num_labels: int
    seed: int = 0


class _Sampler:
    """The EMA generator and the tokenizer, loaded once; ``clips(ids)`` samples and decodes."""

    def __init__(self, spec: GenerationSpec, device: str) -> None:
        channels = spec.latent_shape[-1]
        self.dit = generator_from_checkpoint(spec.generator_checkpoint, spec.generator, channels)
        self.dit = self.dit.to(device)
        self.tokenizer = tokenizer_from_checkpoint(spec.tokenizer_checkpoint, spec.tokenizer)
        self.tokenizer = self.tokenizer.to(device)
        self.objective = build_objective(spec.generator)
        self.spec = spec

    def clips(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) -> decoded samples (N, T, H, W, 3) float in [-1, 1]."""
        spec = self.spec
        noise = sample_noise(ids, spec.latent_shape, spec.seed)
        labels = sample_labels(ids, spec.num_labels)
        tokenizer, shape = self.tokenizer, spec.latent_shape
        _, clips = generate(
            self.dit, self.objective, spec.stats, tokenizer, labels, shape, noise=noise
        )
        return clips


class GeneratedFeatures:
    """Ray Data actor: {"id": (N,)} -> per-sample features of those generated samples:
    "latent" (N, c), "pixels" and, with their networks, "inception" (N, T, 2048), "i3d"."""

    def __init__(self, spec: GenerationSpec, device: str = "cpu") -> None:
        self.sampler = _Sampler(spec, device)
        self.networks = FeatureNetworks(spec.metrics, device, spec.tokenizer.input_size[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(np.asarray(batch["id"], np.int64))
        clips = self.sampler.clips(ids)  # (N, T, H, W, 3)
        tokenizer = self.sampler.tokenizer
        with torch.no_grad():
            latent = latent_features(tokenizer.encode(clips).mode())  # re-encoded: (N, c)
        return {"latent": latent.cpu().numpy(), **self.networks.features(clips)}


class GeneratedClips:
    """Ray Data actor: {"id": (N,)} -> {"id", "clip": (N, T, H, W, 3) uint8} (the preview)."""

    def __init__(self, spec: GenerationSpec, device: str = "cpu") -> None:
        self.sampler = _Sampler(spec, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], np.int64)
        clips = self.sampler.clips(torch.from_numpy(ids))
        return {"id": ids, "clip": to_uint8(clips).cpu().numpy()}


class RealFeatures:
    """Ray Data actor: {"clip": (N, T, H, W, 3) uint8, stored size} -> network features of
    the centre crop (the evaluation view), as ``GeneratedFeatures`` returns them."""

    def __init__(
        self, spec: GenerationSpec, crop: tuple[int, int] | None, device: str = "cpu"
    ) -> None:
        self.networks = FeatureNetworks(spec.metrics, device, spec.tokenizer.input_size[0])
        self.crop = crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch["clip"]
        if column.dtype == object:  # ragged tensor column: one array per row
            column = np.stack(list(column))
        x = to_model_input(np.ascontiguousarray(column), crop=self.crop, flip=False)
        return self.networks.features(to_uint8(x))


# ----------------------------------------------------------------------------- the driver
def generated_moments(
    spec: GenerationSpec, count: int, workers: Workers
) -> dict[str, FeatureMoments]:
    """Feature moments of samples 0 .. count - 1, sampled by an actor pool (a feature
    network without a weight file is announced as skipped here, on the driver)."""
    spec = dataclasses.replace(spec, metrics=resolve_networks(spec.metrics))
    announce_missing_networks(spec.metrics)
    batches = map_actors(ids_dataset(count, workers), GeneratedFeatures, {"spec": spec}, workers)
    moments, _ = accumulate_moments(batches)
    return moments


def real_moments(
    spec: GenerationSpec,
    dataset: Any,
    count: int,
    crop: tuple[int, int] | None,
    workers: Workers,
) -> tuple[dict[str, FeatureMoments], int]:
    """Network feature moments of the first ``count`` clips of a Ray Dataset of uint8 clips,
    and how many clips that was."""
    spec = dataclasses.replace(spec, metrics=resolve_networks(spec.metrics))
    clips = dataset.select_columns(["clip"]).limit(count)
    kwargs = {"spec": spec, "crop": crop}
    return accumulate_moments(map_actors(clips, RealFeatures, kwargs, workers))


def preview_clips(spec: GenerationSpec, ids: list[int], workers: Workers) -> np.ndarray:
    """Samples ``ids`` (the same ones the metrics use), decoded: (len(ids), T, H, W, 3) uint8."""
    by_id: dict[int, np.ndarray] = {}
    dataset = ids_dataset(0, workers, ids)
    for batch in map_actors(dataset, GeneratedClips, {"spec": spec}, workers):
        by_id.update(zip(np.asarray(batch["id"]).tolist(), np.asarray(batch["clip"])))
    return np.stack([by_id[i] for i in ids])


def preview_ids(count: int, num_labels: int, per_class: int) -> list[int]:
    """Up to ``per_class`` sample ids of each class among 0 .. count - 1, grouped by class."""
    ids = [i for i in range(min(count, per_class * num_labels))]
    return sorted(ids, key=lambda i: (i % num_labels, i))


@dataclass(frozen=True)
class GenerationSections:
    """The config sections generation evaluation reads."""

    generator: GeneratorConfig
    tokenizer: TokenizerConfig
    metrics: MetricsConfig
    train: TrainConfig  # the generator's: one sampling actor per worker, with its resources
    data: DataConfig  # crop: the real clips' evaluation view; fps: the preview mp4's


def evaluate_generation(
    cfg: GenerationSections,
    prepared: PreparedData,
    generator_checkpoint: str,
    tokenizer_checkpoint: str,
    latent_set: LatentSet,
    *,
    logger: RunLogger | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Sample ``cfg.metrics.gen_samples`` clips from the EMA generator in batches across Ray
    workers (one per generator training worker, with its resources), log the first
    ``PREVIEW_PER_CLASS`` of each class, and return the generation metrics (see the module
    docstring) with ``gen/samples`` (and ``gen/real_samples``) beside them."""
    names = [n for n, _ in sorted(prepared.label_map.items(), key=lambda kv: kv[1])]
    metrics_cfg = resolve_networks(cfg.metrics)
    spec = GenerationSpec(
        generator_checkpoint=str(generator_checkpoint),
        tokenizer_checkpoint=str(tokenizer_checkpoint),
        generator=cfg.generator,
        tokenizer=cfg.tokenizer,
        stats=latent_set.stats,
        latent_shape=tuple(latent_set.latent_shape),
        metrics=metrics_cfg,
        num_labels=len(names),
        seed=seed,
    )
    workers = Workers(
        num_actors=cfg.train.num_workers,
        batch_size=metrics_cfg.gen_batch_size,
        num_cpus=cfg.train.cpus_per_worker,
        num_gpus=1.0 if cfg.train.use_gpu else 0.0,
    )
    count = metrics_cfg.gen_samples
    generated = generated_moments(spec, count, workers)
    real_split = "val" if "val" in latent_set.splits else "train"
    real = torch.from_numpy(latent_set.pooled(real_split))  # (N, c)
    reference = None
    if real_split == "val":  # a real set of the generated set's size: the attainable level
        reference = torch.from_numpy(latent_set.pooled("train")[:count])
    # The real side in the fixed spaces (pooled pixels; Inception / I3D with weight files).
    dataset = clip_dataset(prepared, real_split)
    real_networks, real_clips = real_moments(spec, dataset, count, cfg.data.crop, workers)
    metrics = generation_metrics(generated, real, reference, real_networks, real_clips)
    if logger:
        ids = preview_ids(count, len(names), PREVIEW_PER_CLASS)
        clips = to_unit_float(torch.from_numpy(preview_clips(spec, ids, workers)))
        log_samples(logger, clips, [i % len(names) for i in ids], names, cfg.data.fps)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"[vitok] generation eval: {shown}", flush=True)
    return {f"gen/{k}": v for k, v in metrics.items()}
