"""Evaluation metrics: PSNR, SSIM, LPIPS (injected), FID and FVD, per batch and over a split.

Conventions
- Clips are channels-last `(B, T, H, W, 3)`; images are T = 1 (a `(B, H, W, 3)` batch is read
  as T = 1). Every metric accepts uint8, or float in [-1, 1] (the model boundary), which is
  first quantised to uint8 by `to_uint8`, so a metric measures what a saved frame would hold.
- PSNR / SSIM: per frame on uint8-range values (data_range 255), then the mean over a clip's
  frames, then the mean over clips. They match scikit-image's `peak_signal_noise_ratio` and
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255, channel_axis=-1)`.
- FID / FVD: Frechet distance (float64) between Gaussians fitted to network features. The
  moments are accumulated as exact sums (n, sum x, sum x x^T), so per-worker partial sums
  reduce (all_reduce, or a merge across Ray Data batches) to the one-shot statistic.
- LPIPS: the network lives in `vitok.tokenizer.lpips`, which the platform may not import;
  callers inject it as `lpips_fn(real, fake)`: frames (N, H, W, 3) float in [-1, 1] -> (N,).
- Weight files come from `MetricsConfig` or the environment (VITOK_INCEPTION_WEIGHTS,
  VITOK_I3D_WEIGHTS). Without one the metric is skipped and a message names it, once per
  process. Nothing downloads.

Where things are: ``pixel_metrics`` (conversions, PSNR, SSIM, LPIPS), ``frechet`` (the
distance and ``FeatureMoments``), ``features`` (network features, batched and over a Ray
dataset). This module holds the config, the skip rule, the per-worker ``MetricState``, the
weight loaders and ``ReconstructionMetrics``, and re-exports the rest: import from here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from vitok.platform.config import check_choice
from vitok.platform.metrics import fvd, inception
from vitok.platform.metrics.features import (
    FeatureExtractor,
    clip_features,
    dataset_feature_moments,
    frame_features,
)
from vitok.platform.metrics.frechet import FeatureMoments, frechet_distance, frechet_from_moments
from vitok.platform.metrics.pixel_metrics import (
    PSNR_MAX_DB,
    LpipsFn,
    as_clips,
    lpips_per_clip,
    pair_clips,
    psnr,
    ssim,
    to_uint8,
    to_unit_float,
)

__all__ = [
    "I3D_ENV",
    "INCEPTION_ENV",
    "PSNR_MAX_DB",
    "FeatureExtractor",
    "FeatureMoments",
    "LpipsFn",
    "MakeMeanEvaluator",
    "MakeReconstructionEvaluator",
    "MeanEvaluator",
    "MetricState",
    "MetricsConfig",
    "PerClipValues",
    "ReconstructionEvaluator",
    "ReconstructionMetrics",
    "announce_skip",
    "as_clips",
    "clip_features",
    "dataset_feature_moments",
    "frame_features",
    "frechet_distance",
    "frechet_from_moments",
    "load_i3d",
    "load_inception",
    "lpips_per_clip",
    "psnr",
    "resolve_weights",
    "ssim",
    "to_uint8",
    "to_unit_float",
]

log = logging.getLogger(__name__)

INCEPTION_ENV = "VITOK_INCEPTION_WEIGHTS"
I3D_ENV = "VITOK_I3D_WEIGHTS"


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where the feature networks' weight files are (None falls back to the environment), and
    how many samples the generation metrics draw.

    ``gen_samples``: generated clips behind gFID / gFVD / frechet_tokenizer_latent (the
    paper: 50,000); a Frechet distance depends on it, so reports show it beside them.
    ``gen_batch_size``: samples per batch on one sampling worker.
    """

    inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth
    i3d_weights: str | None = None  # StyleGAN-V's i3d_torchscript.pt
    fvd_num_frames: int = fvd.FVD_NUM_FRAMES
    feature_batch_size: int = 32
    gen_samples: int = 50_000
    gen_batch_size: int = 64
    # Metrics a study must produce ("fid", "fvd"): their weight files are checked before any
    # compute, instead of the metric being skipped at evaluation.
    require: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for metric in self.require:
            check_choice("metrics.require", metric, ("fid", "fvd"))
        for name in ("inception_weights", "i3d_weights"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name}={value!r} must be a file path or None")
        if self.fvd_num_frames < 1:
            raise ValueError(f"fvd_num_frames={self.fvd_num_frames!r} must be >= 1")
        if self.feature_batch_size < 1:
            raise ValueError(f"feature_batch_size={self.feature_batch_size!r} must be >= 1")
        for name, least in (("gen_samples", 2), ("gen_batch_size", 1)):  # 2: a covariance
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"metrics.{name}={value!r} must be an int >= {least}")


_ANNOUNCED: set[str] = set()  # metrics already reported as skipped in this process


def announce_skip(metric: str, reason: str) -> bool:
    """Log and print '<metric> skipped: <reason>' the first time only; True if it was shown."""
    if metric in _ANNOUNCED:
        return False
    _ANNOUNCED.add(metric)
    message = f"[vitok.metrics] {metric} skipped: {reason}"
    log.warning(message)
    print(message, flush=True)
    return True


def resolve_weights(
    metric: str, configured: str | None, field: str, env_var: str, file_name: str
) -> Path | None:
    """The weight file for `metric` from the config, else `env_var`; None (skip, said once).

    A path that is given but missing is an error, not a skip: the user asked for the metric.
    """
    value = configured or os.environ.get(env_var) or None
    if value is None:
        announce_skip(
            metric,
            f"no weight file; set MetricsConfig.{field} or the environment variable {env_var} "
            f"to the path of {file_name} (nothing is downloaded)",
        )
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{metric}: weight file {path} ({field} or {env_var}) is missing")
    return path


# ----------------------------------------------------------------------------- accumulators
def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclasses.dataclass
class MetricState:
    """Per-worker sums: scalar metrics (sum, count) and feature moments, by name."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    moments: dict[str, FeatureMoments] = dataclasses.field(default_factory=dict)

    def add_values(self, name: str, values: Tensor) -> None:
        """values: (N,) one value per clip."""
        values = values.detach().double().reshape(-1)
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def add_features(self, name: str, features: Tensor) -> None:
        """features: (N, D)."""
        self.moments.setdefault(name, FeatureMoments()).update(features)

    def merge(self, other: MetricState) -> MetricState:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]
        for name, moments in other.moments.items():
            self.moments.setdefault(name, FeatureMoments()).merge(moments)
        return self

    def all_reduce(self) -> None:
        """Sum every accumulator across the process group (no-op without one).

        Every rank must have added the same metric names (checked) and feature dims.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        names = (sorted(self.sums), sorted(self.moments))
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        if any(other != names for other in gathered):
            raise RuntimeError(f"ranks accumulated different metrics: {gathered}")
        device = _reduce_device()
        scalars = sorted(self.sums)
        packed = torch.tensor(
            [self.sums[n] for n in scalars] + [float(self.counts[n]) for n in scalars],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(packed)
        for i, name in enumerate(scalars):
            self.sums[name] = float(packed[i])
            self.counts[name] = round(float(packed[len(scalars) + i]))
        for name in sorted(self.moments):
            m = self.moments[name]
            count = torch.tensor([float(m.count)], dtype=torch.float64, device=device)
            dist.all_reduce(count)
            total, outer = m.total.to(device), m.outer.to(device)
            dist.all_reduce(total)
            dist.all_reduce(outer)
            m.count, m.total, m.outer = round(float(count)), total, outer

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / max(self.counts[name], 1) for name in sorted(self.sums)}


# ----------------------------------------------------------------------------- feature networks
def load_inception(config: MetricsConfig, device: torch.device | str = "cpu"):
    """The FID Inception from the configured file, or None (FID skipped, said once)."""
    path = resolve_weights(
        "fid",
        config.inception_weights,
        "inception_weights",
        INCEPTION_ENV,
        "pt_inception-2015-12-05-6726825d.pth",
    )
    return None if path is None else inception.load_fid_inception(path, device)


def load_i3d(config: MetricsConfig, device: torch.device | str = "cpu"):
    """StyleGAN-V's I3D TorchScript from the configured file, or None (FVD skipped, said once)."""
    path = resolve_weights("fvd", config.i3d_weights, "i3d_weights", I3D_ENV, "i3d_torchscript.pt")
    return None if path is None else fvd.load_i3d(path, device)


# ----------------------------------------------------------------------------- evaluators
class ReconstructionMetrics:
    """Accumulates PSNR, SSIM, LPIPS, FID (per frame) and FVD over (real, reconstruction) batches.

    Use one per worker: `update` each batch, then `compute` (which all_reduces a copy of the
    sums when a process group is initialised) on every rank. Metrics without their network
    are skipped, and the skip is reported once by name.
    """

    def __init__(
        self,
        config: MetricsConfig,
        device: torch.device | str = "cpu",
        lpips_fn: LpipsFn | None = None,
    ):
        self.config = config
        self.lpips_fn = lpips_fn
        if lpips_fn is None:
            announce_skip(
                "lpips",
                "no LPIPS network was given (lpips_fn=None); pass the one from "
                "vitok.tokenizer.lpips built with its VGG16 weight file",
            )
        self.inception = load_inception(config, device)
        self.i3d = load_i3d(config, device)
        self.state = MetricState()

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor) -> None:
        """real, fake: (B, T, H, W, 3) uint8 or float in [-1, 1]."""
        real, fake = pair_clips(real, fake)
        self.state.add_values("psnr", psnr(real, fake))
        self.state.add_values("ssim", ssim(real, fake))
        if self.lpips_fn is not None:
            self.state.add_values("lpips", lpips_per_clip(self.lpips_fn, real, fake))
        batch = self.config.feature_batch_size
        if self.inception is not None:
            self.state.add_features("fid/real", frame_features(self.inception, real, batch))
            self.state.add_features("fid/fake", frame_features(self.inception, fake, batch))
        if self.i3d is not None:
            n = self.config.fvd_num_frames
            if real.shape[1] < n:
                announce_skip("fvd", f"clips have T={real.shape[1]} frames; FVD needs {n}")
            else:
                self.state.add_features("fvd/real", clip_features(self.i3d, real, n, batch))
                self.state.add_features("fvd/fake", clip_features(self.i3d, fake, n, batch))

    def compute(self) -> dict[str, float]:
        """{'psnr', 'ssim'[, 'lpips'][, 'fid'][, 'fvd']} over everything seen by all ranks."""
        state = MetricState().merge(self.state)  # a copy: compute may be called again
        state.all_reduce()
        results = state.means()
        for metric in ("fid", "fvd"):
            real, fake = state.moments.get(f"{metric}/real"), state.moments.get(f"{metric}/fake")
            if real is not None and fake is not None:
                if real.count < 2:
                    announce_skip(metric, f"only {real.count} feature vector(s); need >= 2")
                    continue
                results[metric] = frechet_from_moments(real, fake)
        return results


class ReconstructionEvaluator:
    """A training job's evaluator: ``ReconstructionMetrics`` over a whole split of
    ``{"x": clips}`` batches. ``reconstruct(model, x) -> recon`` is the model's evaluation
    pass and ``make_lpips() -> network | None`` builds LPIPS (both from the model package).
    It keeps the first ``examples`` clips it sees and their reconstructions, which
    ``log_artifacts`` draws (a grid and, for video, an mp4 at ``fps``): the figure comes
    from the evaluation pass itself, with no second load of the model."""

    def __init__(
        self,
        metrics: MetricsConfig,
        reconstruct: Callable[[torch.nn.Module, Tensor], Tensor],
        make_lpips: Callable[[], torch.nn.Module | None] | None = None,
        examples: int = 0,
        fps: float = 8.0,
    ) -> None:
        lpips = make_lpips() if make_lpips is not None else None
        if lpips is not None:
            lpips.requires_grad_(False).eval()
        self.reconstruct = reconstruct
        self.metrics = ReconstructionMetrics(metrics, lpips_fn=lpips)
        self.examples, self.fps = examples, fps
        self.kept: list[tuple[Tensor, Tensor]] = []  # (clips, reconstructions), on the CPU

    def update(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> None:
        x = batch["x"]  # (B, T, H, W, 3) in [-1, 1]
        recon = self.reconstruct(model, x).float().clamp(-1, 1)
        self.metrics.update(x.float(), recon)
        need = self.examples - sum(len(clips) for clips, _ in self.kept)
        if need > 0:
            self.kept.append((x[:need].float().cpu(), recon[:need].cpu()))

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()

    def log_artifacts(self, logger: Any, prefix: str = "") -> None:
        """The kept clips over their reconstructions, as ``<prefix>reconstructions/``."""
        if not self.kept:
            return
        from vitok.platform.metrics.artifacts import log_reconstruction_pairs

        clips = torch.cat([c for c, _ in self.kept])
        recons = torch.cat([r for _, r in self.kept])
        log_reconstruction_pairs(logger, clips, recons, self.fps, f"{prefix}reconstructions")


@dataclasses.dataclass(frozen=True)
class MakeReconstructionEvaluator:
    """Picklable ``() -> ReconstructionEvaluator`` for ``TrainJob.make_evaluator``."""

    metrics: MetricsConfig
    reconstruct: Callable[[torch.nn.Module, Tensor], Tensor]
    make_lpips: Callable[[], torch.nn.Module | None] | None = None
    examples: int = 0
    fps: float = 8.0

    def __call__(self) -> ReconstructionEvaluator:
        return ReconstructionEvaluator(
            self.metrics, self.reconstruct, self.make_lpips, self.examples, self.fps
        )


class PerClipValues(Protocol):
    """A model's values on one batch, for ``MeanEvaluator``: ``{name: (N,) tensor}`` for the
    ``index``-th batch a worker evaluates, under the fixed ``names``."""

    names: tuple[str, ...]

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, Tensor], index: int
    ) -> dict[str, Tensor]: ...


class MeanEvaluator:
    """A training job's evaluator of per-clip values (a model package's loss, say): each
    name's mean over every value all workers saw (0 where none were). The reduce across
    workers is ``MetricState``'s, as for the reconstruction metrics."""

    def __init__(self, values: PerClipValues) -> None:
        self.values = values
        self.state = MetricState(sums=dict.fromkeys(values.names, 0.0))
        self.state.counts = dict.fromkeys(values.names, 0)
        self.batches = 0

    def update(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> None:
        for name, value in self.values(model, batch, self.batches).items():
            self.state.add_values(name, value)
        self.batches += 1

    def compute(self) -> dict[str, float]:
        state = MetricState().merge(self.state)  # a copy: compute may be called again
        state.all_reduce()
        return state.means()


@dataclasses.dataclass(frozen=True)
class MakeMeanEvaluator:
    """Picklable ``() -> MeanEvaluator`` for ``TrainJob.make_evaluator``."""

    values: PerClipValues

    def __call__(self) -> MeanEvaluator:
        return MeanEvaluator(self.values)
