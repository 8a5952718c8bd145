"""Per-sample features from a Ray Data actor pool, summed into exact moments, and the
generation metrics (Frechet distances) computed from them.

- ``Workers`` says how a pool runs (actors, batch size, resources); ``ids_dataset`` and
  ``map_actors`` stream batches of sample ids (or clips) through actors that load their
  networks once; ``accumulate_moments`` sums the streamed rows into ``FeatureMoments`` per
  feature, so any split over batches and workers gives the one-shot statistic.
- ``FeatureNetworks``: the fixed feature spaces of a clip: frames pooled to 4x4 RGB
  (``pixel_features``, always), Inception per frame and I3D per 16-frame window when their
  weight files are configured (``resolve_networks`` writes the driver's environment into
  the config, since workers on other nodes do not see it).
- ``generation_metrics``: the distances of generated features against real ones, with the
  sample counts beside them (a Frechet distance depends on the count).

What the actors sample (a generator and a tokenizer) is the caller's: this module imports
no model package.
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

from vitok.platform.metrics.evaluate import (
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
    to_unit_float,
)

METRIC_OF = {"inception": "gfid", "i3d": "gfvd", "pixels": "frechet_pixels"}  # feature -> metric
PIXEL_POOL = 4  # frames average-pooled to 4x4 RGB: the fixed space of frechet_pixels


def pixel_features(clips: torch.Tensor) -> np.ndarray:
    """clips (N, T, H, W, 3) uint8 or float in [-1, 1] -> (N, T, 48): each frame average-
    pooled to 4x4 RGB in [-1, 1]. A fixed feature space that needs no weight file and is the
    same for every tokenizer, so ``frechet_pixels`` compares across trials (it sees colour
    layout, not texture: a coarse check, not FID)."""
    x = to_unit_float(clips).float()
    n, t = x.shape[:2]
    frames = x.flatten(0, 1).permute(0, 3, 1, 2)  # (N*T, 3, H, W)
    pooled = torch.nn.functional.adaptive_avg_pool2d(frames, PIXEL_POOL)
    return pooled.permute(0, 2, 3, 1).reshape(n, t, -1).cpu().numpy()  # (4, 4, RGB) rows


# ----------------------------------------------------------------------------- networks
def resolve_networks(metrics: MetricsConfig) -> MetricsConfig:
    """The weight files from the config or the driver's environment, written into the config
    (workers on other nodes do not see the driver's environment variables)."""
    return dataclasses.replace(
        metrics,
        inception_weights=metrics.inception_weights or os.environ.get(INCEPTION_ENV) or None,
        i3d_weights=metrics.i3d_weights or os.environ.get(I3D_ENV) or None,
    )


def networks_configured(metrics: MetricsConfig) -> bool:
    """Whether an Inception or I3D weight file is set (after ``resolve_networks``)."""
    return metrics.inception_weights is not None or metrics.i3d_weights is not None


def announce_missing_networks(metrics: MetricsConfig) -> None:
    """Say once, on the driver, which network metric is skipped for want of a weight file."""
    for metric, weights, env in (
        ("gfid", metrics.inception_weights, INCEPTION_ENV),
        ("gfvd", metrics.i3d_weights, I3D_ENV),
    ):
        if weights is None:
            announce_skip(metric, f"no weight file (metrics config or {env}); nothing downloads")


class FeatureNetworks:
    """The feature networks a config names, loaded once (a skipped one says so once)."""

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


# ----------------------------------------------------------------------------- the pool
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


def ids_dataset(count: int, workers: Workers, ids: list[int] | None = None) -> Any:
    """A Ray Dataset of {"id": i} rows (0 .. count - 1, or ``ids``), a block per batch."""
    import ray.data

    ids = list(range(count)) if ids is None else ids
    blocks = max(1, min(1000, math.ceil(len(ids) / workers.batch_size)))
    return ray.data.from_items([{"id": i} for i in ids], override_num_blocks=blocks)


def map_actors(
    dataset: Any, actor: type, kwargs: dict[str, Any], workers: Workers
) -> Iterator[dict]:
    """Stream ``dataset`` through a pool of ``actor(**kwargs, device=...)``: numpy batches."""
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


def accumulate_moments(batches: Iterator[dict]) -> tuple[dict[str, FeatureMoments], int]:
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


# ----------------------------------------------------------------------------- the metrics
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
