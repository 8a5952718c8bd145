"""Generation evaluation: ``metrics.gen_samples`` clips from the EMA generator, sampled in
batches across Ray workers, against the real clips.

- Sample ``i`` has label ``i % classes`` and its own seeded starting noise, so the sampled set
  is the same whatever the batch size or the number of workers.
- A Ray Data actor pool (``ActorPoolStrategy``, one GPU per actor when the generator trained
  on GPUs) loads the DiT (EMA weights), the tokenizer and the feature networks once per actor,
  samples a batch (DDIM + classifier-free guidance), decodes it and returns only per-sample
  features: the token-mean-pooled posterior mean of the re-encoded clip (c), Inception pool
  features per frame (2048), I3D features per 16-frame window (400).
- The driver sums the features into exact moments (``FeatureMoments``), so any split over
  batches and workers gives the one-shot statistic, and computes the Frechet distances:
  ``frechet_pixels`` (always: frames pooled to 4x4 RGB, one fixed space that every trial
  shares, so it compares across tokenizers), ``frechet_tokenizer_latent`` (always; in the
  tokenizer's own latent space, so only within its trial; *not* FID, see
  ``generation_metrics``), ``gfid`` and ``gfvd`` when the Inception / I3D weight files are
  configured. The real side's network
  features come from the same actors, over ``min(gen_samples, clips in the split)`` clips.
- ``samples`` (and ``real_samples``) are returned beside the distances: a Frechet distance
  depends on the sample count, so no number is compared with the paper's at another count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitok.generator.config import GeneratorConfig
from vitok.generator.diffusion import Objective, build_objective
from vitok.generator.dit import DiT
from vitok.generator.task import load_generator
from vitok.pipelines.tokenizer_stage import load_tokenizer
from vitok.platform.data import to_model_input
from vitok.platform.latents import LatentStats
from vitok.platform.metrics import (
    I3D_ENV,
    INCEPTION_ENV,
    FeatureMoments,
    MetricsConfig,
    announce_skip,
    clip_features,
    frame_features,
    frechet_from_moments,
    load_i3d,
    load_inception,
    to_uint8,
)
from vitok.platform.train import load_model_state, load_task_state
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.model import ViTok

NETWORKS = ("inception", "i3d", "pixels")  # feature columns -> the metrics below
METRIC_OF = {"inception": "gfid", "i3d": "gfvd", "pixels": "frechet_pixels"}
PIXEL_POOL = 4  # frames average-pooled to 4x4 RGB: the fixed space of frechet_pixels


def pixel_features(clips: torch.Tensor) -> np.ndarray:
    """clips (N, T, H, W, 3) uint8 or float in [-1, 1] -> (N, T, 48): each frame average-
    pooled to 4x4 RGB in [-1, 1]. A fixed feature space that needs no weight file and is the
    same for every tokenizer, so ``frechet_pixels`` compares across trials (it sees colour
    layout, not texture: a coarse check, not FID)."""
    x = clips.float() / 127.5 - 1.0 if clips.dtype == torch.uint8 else clips.float()
    n, t = x.shape[:2]
    frames = x.flatten(0, 1).permute(0, 3, 1, 2)  # (N*T, 3, H, W)
    pooled = torch.nn.functional.adaptive_avg_pool2d(frames, PIXEL_POOL)
    return pooled.permute(0, 2, 3, 1).reshape(n, t, -1).cpu().numpy()  # (4, 4, RGB) rows


# ----------------------------------------------------------------------------- the samples
def sample_labels(indices: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Sample i's class: i % num_labels (classes balanced to within one sample)."""
    return indices.long() % num_labels


def sample_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise (N, *shape): sample i's from its own generator seeded by (seed, i)."""
    draws = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
        for i in indices
    ]
    return torch.stack(draws)


@torch.no_grad()
def generate(
    dit: DiT,
    objective: Objective,
    stats: LatentStats,
    tokenizer: ViTok,
    labels: torch.Tensor,
    latent_shape: tuple[int, ...],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample latents for ``labels`` (B,) with DDIM + CFG, then decode them.

    ``noise`` (B, *latent_shape) is the starting point (else drawn from ``seed``). Returns
    (latents (B, t, h, w, c) in the tokenizer's space, clips (B, T, H, W, 3) float in
    [-1, 1]). Everything runs on ``dit``'s device.
    """
    device = next(dit.parameters()).device
    labels = labels.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (labels.shape[0], *latent_shape)
    z = objective.sample(
        dit, shape, labels, steps=steps, guidance=guidance, generator=gen, noise=noise
    )
    z = stats.denormalise(z)  # (B, t, h, w, c)
    clips = tokenizer.to(device).decode(z).float().clamp(-1, 1)  # (B, T, H, W, 3)
    return z, clips


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """(N, t, h, w, c) -> (N, c): the mean over the latent tokens (the Frechet feature, as
    ``vitok.platform.latents.pool_tokens``)."""
    return latents.float().flatten(1, -2).mean(dim=1)  # (N, c)


# ----------------------------------------------------------------------------- the workers
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


def resolve_networks(metrics: MetricsConfig) -> MetricsConfig:
    """The weight files from the config or the driver's environment, written into the config
    (workers on other nodes do not see the driver's environment variables)."""
    return dataclasses.replace(
        metrics,
        inception_weights=metrics.inception_weights or os.environ.get(INCEPTION_ENV) or None,
        i3d_weights=metrics.i3d_weights or os.environ.get(I3D_ENV) or None,
    )


class _Networks:
    """The feature networks a spec configures, loaded once (a skipped one says so once)."""

    def __init__(self, metrics: MetricsConfig, device: str, frames: int) -> None:
        self.metrics = metrics
        self.inception = load_inception(metrics, device)
        self.i3d = load_i3d(metrics, device)
        if self.i3d is not None and frames < metrics.fvd_num_frames:
            announce_skip("gfvd", f"clips have T={frames}; FVD needs {metrics.fvd_num_frames}")
            self.i3d = None

    def features(self, clips: torch.Tensor) -> dict[str, np.ndarray]:
        """clips (N, T, H, W, 3) uint8 or float in [-1, 1] -> per-sample feature rows (the
        pooled pixels always; Inception and I3D with their weight files)."""
        n, batch = clips.shape[0], self.metrics.feature_batch_size
        out = {"pixels": pixel_features(clips)}
        if self.inception is not None:
            frames = frame_features(self.inception, clips, batch)  # (N*T, 2048)
            out["inception"] = frames.reshape(n, -1, frames.shape[-1]).float().cpu().numpy()
        if self.i3d is not None:
            windows = clip_features(self.i3d, clips, self.metrics.fvd_num_frames, batch)
            out["i3d"] = windows.reshape(n, -1, windows.shape[-1]).float().cpu().numpy()
        return out


class _Sampler:
    """The EMA generator and the tokenizer, loaded once; ``clips(ids)`` samples and decodes."""

    def __init__(self, spec: GenerationSpec, device: str) -> None:
        ckpt = spec.generator_checkpoint  # a folder or a URI under the storage root
        extra = load_task_state(ckpt) or None
        channels = spec.latent_shape[-1]
        state = load_model_state(ckpt)
        self.dit = load_generator(state, spec.generator, channels, extra).to(device)
        self.tokenizer = load_tokenizer(spec.tokenizer_checkpoint, spec.tokenizer).to(device)
        self.objective = build_objective(spec.generator)
        self.spec = spec

    def clips(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) -> decoded samples (N, T, H, W, 3) float in [-1, 1]."""
        spec = self.spec
        noise = sample_noise(ids, spec.latent_shape, spec.seed)
        _, clips = generate(
            self.dit,
            self.objective,
            spec.stats,
            self.tokenizer,
            sample_labels(ids, spec.num_labels),
            spec.latent_shape,
            noise=noise,
        )
        return clips


class GeneratedFeatures:
    """Ray Data actor: {"id": (N,)} -> per-sample features of those generated samples:
    "latent" (N, c) and, with their networks, "inception" (N, T, 2048), "i3d" (N, W, 400)."""

    def __init__(self, spec: GenerationSpec, device: str = "cpu") -> None:
        self.sampler = _Sampler(spec, device)
        self.networks = _Networks(spec.metrics, device, spec.tokenizer.input_size[0])

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
        self.networks = _Networks(spec.metrics, device, spec.tokenizer.input_size[0])
        self.crop = crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch["clip"]
        if column.dtype == object:  # ragged tensor column: one array per row
            column = np.stack(list(column))
        x = to_model_input(np.ascontiguousarray(column), crop=self.crop, flip=False)
        return self.networks.features(to_uint8(x))


# ----------------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class Workers:
    """How the sampling runs: actors, samples per batch, resources per actor."""

    num_actors: int = 1
    batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def _ids(count: int, workers: Workers, ids: list[int] | None = None) -> Any:
    import ray.data

    ids = list(range(count)) if ids is None else ids
    blocks = max(1, min(1000, math.ceil(len(ids) / workers.batch_size)))
    return ray.data.from_items([{"id": i} for i in ids], override_num_blocks=blocks)


def _map(dataset: Any, actor: type, kwargs: dict[str, Any], workers: Workers) -> Iterator[dict]:
    from ray.data import ActorPoolStrategy

    out = dataset.map_batches(
        actor,
        fn_constructor_kwargs={**kwargs, "device": workers.device},
        compute=ActorPoolStrategy(size=workers.num_actors),
        batch_size=workers.batch_size,
        batch_format="numpy",
        num_cpus=workers.num_cpus,
        num_gpus=workers.num_gpus,
    )
    return out.iter_batches(batch_size=256, batch_format="numpy")


def _accumulate(batches: Iterator[dict]) -> tuple[dict[str, FeatureMoments], int]:
    """Sum streamed feature batches into moments per feature; also the number of samples."""
    moments: dict[str, FeatureMoments] = {}
    samples = 0
    for batch in batches:
        for name, rows in batch.items():
            rows = np.asarray(rows, np.float64)  # (N, D) or (N, frames or windows, D)
            flat = torch.from_numpy(rows.reshape(-1, rows.shape[-1]))
            moments.setdefault(name, FeatureMoments()).update(flat)
        samples += len(next(iter(batch.values()))) if batch else 0
    return moments, samples


def generated_moments(
    spec: GenerationSpec, count: int, workers: Workers
) -> dict[str, FeatureMoments]:
    """Feature moments of samples 0 .. count - 1, sampled by an actor pool (a feature
    network without a weight file is announced as skipped here, on the driver)."""
    spec = dataclasses.replace(spec, metrics=resolve_networks(spec.metrics))
    for metric, weights, env in (
        ("gfid", spec.metrics.inception_weights, INCEPTION_ENV),
        ("gfvd", spec.metrics.i3d_weights, I3D_ENV),
    ):
        if weights is None:
            announce_skip(metric, f"no weight file (metrics config or {env}); nothing downloads")
    moments, _ = _accumulate(_map(_ids(count, workers), GeneratedFeatures, {"spec": spec}, workers))
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
    return _accumulate(_map(clips, RealFeatures, {"spec": spec, "crop": crop}, workers))


def preview_clips(spec: GenerationSpec, ids: list[int], workers: Workers) -> np.ndarray:
    """Samples ``ids`` (the same ones the metrics use), decoded: (len(ids), T, H, W, 3) uint8."""
    by_id: dict[int, np.ndarray] = {}
    for batch in _map(_ids(0, workers, ids), GeneratedClips, {"spec": spec}, workers):
        by_id.update(zip(np.asarray(batch["id"]).tolist(), np.asarray(batch["clip"])))
    return np.stack([by_id[i] for i in ids])


def preview_ids(count: int, num_labels: int, per_class: int) -> list[int]:
    """Up to ``per_class`` sample ids of each class among 0 .. count - 1, grouped by class."""
    ids = [i for i in range(min(count, per_class * num_labels))]
    return sorted(ids, key=lambda i: (i % num_labels, i))


def networks_configured(metrics: MetricsConfig) -> bool:
    """Whether an Inception or I3D weight file is set (after ``resolve_networks``)."""
    return metrics.inception_weights is not None or metrics.i3d_weights is not None


def generation_metrics(
    generated: dict[str, FeatureMoments],
    real_latent: torch.Tensor,
    reference_latent: torch.Tensor | None = None,
    real_networks: dict[str, FeatureMoments] | None = None,
    real_clips: int = 0,
) -> dict[str, float]:
    """Frechet distances of the generated samples' features against the real ones.

    ``frechet_tokenizer_latent``: between Gaussians fitted to the token-mean-pooled posterior
    means (c dims) of the generated clips (re-encoded by the tokenizer) and of the real clips
    (``real_latent`` (N, c)). It measures how well the generator matches the tokenizer's
    latent statistics; it is *not* FID. With ``reference_latent`` (another real split of the
    generated set's size), ``frechet_tokenizer_latent_real_ref`` is the same distance between
    two real splits: the level a perfect generator would reach at these sample sizes.
    ``frechet_pixels`` / ``gfid`` / ``gfvd`` when both sides have pooled-pixel / Inception /
    I3D features. ``samples``: the
    number of generated samples (and ``real_samples``: ``real_clips``, the real clips the
    networks saw, when gFID or gFVD was computed).
    """
    fake = generated.get("latent")
    out: dict[str, float] = {"samples": float(fake.count if fake is not None else 0)}
    real = FeatureMoments()
    real.update(real_latent)
    if fake is not None and fake.count >= 2 and real.count >= 2:
        out["frechet_tokenizer_latent"] = frechet_from_moments(real, fake)
        if reference_latent is not None and reference_latent.shape[0] >= 2:
            reference = FeatureMoments()
            reference.update(reference_latent)
            out["frechet_tokenizer_latent_real_ref"] = frechet_from_moments(real, reference)
    for network, metric in METRIC_OF.items():
        ours, theirs = generated.get(network), (real_networks or {}).get(network)
        if ours is None or theirs is None:
            continue
        if min(ours.count, theirs.count) < 2:
            announce_skip(metric, f"only {min(ours.count, theirs.count)} feature vector(s)")
            continue
        out[metric] = frechet_from_moments(theirs, ours)
        out["real_samples"] = float(real_clips)
    return out
