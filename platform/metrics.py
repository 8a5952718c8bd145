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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vitok.platform import fvd, inception
from vitok.platform.config import check_choice

log = logging.getLogger(__name__)

LpipsFn = Callable[[Tensor, Tensor], Tensor]
INCEPTION_ENV = "VITOK_INCEPTION_WEIGHTS"
I3D_ENV = "VITOK_I3D_WEIGHTS"
PSNR_MAX_DB = 10 * math.log10(255.0**2 / 1e-10)  # identical frames: a finite ceiling, not inf


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


# ----------------------------------------------------------------------------- conversion
def to_uint8(x: Tensor) -> Tensor:
    """uint8 passes through; float in [-1, 1] -> uint8 via round((x + 1) * 127.5), clamped."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float in [-1, 1], got {x.dtype}")
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 -> float in [-1, 1] (the model-boundary range); float passes through."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    return x


def as_clips(x: Tensor) -> Tensor:
    """(B, H, W, 3) images -> (B, 1, H, W, 3); (B, T, H, W, 3) passes through."""
    if x.ndim == 4:
        x = x.unsqueeze(1)
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected (B, T, H, W, 3) or (B, H, W, 3), got {tuple(x.shape)}")
    return x


def _pair(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    real, fake = as_clips(to_uint8(real)), as_clips(to_uint8(fake))
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    return real, fake


# ----------------------------------------------------------------------------- PSNR / SSIM
def psnr(real: Tensor, fake: Tensor) -> Tensor:
    """real, fake: (B, T, H, W, 3) uint8 or float in [-1, 1] -> (B,) PSNR in dB, per clip.

    Per frame 10 log10(255^2 / MSE) over (H, W, 3), then the mean over the T frames.
    """
    real, fake = _pair(real, fake)
    diff = real.double() - fake.double()
    mse = diff.square().mean(dim=(2, 3, 4))  # (B, T)
    frame_db = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))  # (B, T)
    return frame_db.mean(dim=1).float()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    # scipy.ndimage.gaussian_filter's kernel; radius 5 -> 11 taps for sigma 1.5.
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(real: Tensor, fake: Tensor) -> Tensor:
    """real, fake: (B, T, H, W, 3) uint8 or float in [-1, 1] -> (B,) SSIM, per clip.

    scikit-image's Gaussian SSIM (sigma 1.5, 11 taps, population covariance, data_range 255,
    K1 0.01, K2 0.03), averaged over channels and the valid area (5 pixels from each border are
    cropped, which is exactly the part where scikit-image's reflect padding would matter, so a
    'valid' convolution gives the same numbers). Computed on [0, 1]-scaled values in float32
    (SSIM is invariant to that scaling with constants scaled alike), batched on the device.
    """
    real, fake = _pair(real, fake)
    b, t, h, w, _ = real.shape
    window = _gaussian_window().to(device=real.device, dtype=torch.float32)
    k = window.numel()
    if min(h, w) < k:
        raise ValueError(f"SSIM needs frames of at least {k}x{k}, got {h}x{w}")
    x = rearrange(real, "b t h w c -> (b t) c h w").float() / 255.0
    y = rearrange(fake, "b t h w c -> (b t) c h w").float() / 255.0
    kernel_h = window.view(1, 1, k, 1).expand(3, 1, k, 1)
    kernel_w = window.view(1, 1, 1, k).expand(3, 1, 1, k)

    def blur(z: Tensor) -> Tensor:  # separable depthwise 'valid' Gaussian filter
        return F.conv2d(F.conv2d(z, kernel_h, groups=3), kernel_w, groups=3)

    # One pass over the five stacked moments: (5 * BT, 3, H - 10, W - 10).
    stats = blur(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    ux, uy, uxx, uyy, uxy = stats.chunk(5, dim=0)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_frame = s.double().mean(dim=(1, 2, 3)).view(b, t)  # (B, T)
    return per_frame.mean(dim=1).float()


def lpips_per_clip(lpips_fn: LpipsFn, real: Tensor, fake: Tensor) -> Tensor:
    """Mean of the injected LPIPS over each clip's frames: -> (B,).

    `lpips_fn(real, fake)` gets frames (B*T, H, W, 3) float in [-1, 1] and returns one
    distance per frame (any shape with B*T elements).
    """
    real, fake = _pair(real, fake)
    b, t = real.shape[:2]
    frames_real = to_unit_float(rearrange(real, "b t h w c -> (b t) h w c"))
    frames_fake = to_unit_float(rearrange(fake, "b t h w c -> (b t) h w c"))
    with torch.no_grad():
        per_frame = lpips_fn(frames_real, frames_fake).float().reshape(b, t)  # (B, T)
    return per_frame.mean(dim=1)


# ----------------------------------------------------------------------------- Frechet distance
def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), so no complex
    round-off or singular-matrix offset is needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    # The distance is >= 0; a tiny negative value is round-off from near-zero eigenvalues.
    return max(distance, 0.0)


# ----------------------------------------------------------------------------- accumulators
class FeatureMoments:
    """Exact sums of features for a mean and covariance: n, sum x (D,), sum x x^T (D, D).

    Sums are float64 on the device of the first update; `merge` and `all_reduce` add them,
    so any split of the data across batches and workers gives the one-shot statistic.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None  # (D,) float64
        self.outer: Tensor | None = None  # (D, D) float64

    def update(self, features: Tensor) -> None:
        """features: (N, D)."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
        x = features.detach().double()
        if self.total is None:
            self.total = x.new_zeros(x.shape[1])
            self.outer = x.new_zeros(x.shape[1], x.shape[1])
        if x.shape[1] != self.total.shape[0]:
            raise ValueError(f"feature dim {x.shape[1]} != {self.total.shape[0]} seen before")
        x = x.to(self.total.device)
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x  # (D, D)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        if other.total is None:
            return self
        if self.total is None:
            self.total, self.outer = other.total.clone(), other.outer.clone()
        else:
            self.total += other.total.to(self.total.device)
            self.outer += other.outer.to(self.outer.device)
        self.count += other.count
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(D,), (D, D) float64: the mean and the unbiased (n - 1) covariance, as np.cov."""
        if self.total is None or self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        n = self.count
        mean = self.total.cpu().numpy() / n
        cov = (self.outer.cpu().numpy() - n * np.outer(mean, mean)) / (n - 1)
        return mean, cov


def frechet_from_moments(a: FeatureMoments, b: FeatureMoments) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


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


def frame_features(model: inception.FIDInceptionV3, clips: Tensor, batch_size: int = 32) -> Tensor:
    """clips: (B, T, H, W, 3) uint8 or float in [-1, 1] -> (B*T, 2048): FID is per frame."""
    frames = rearrange(as_clips(to_uint8(clips)), "b t h w c -> (b t) h w c")
    return inception.inception_features(model, frames, batch_size)


def clip_features(
    model: torch.jit.ScriptModule,
    clips: Tensor,
    num_frames: int = fvd.FVD_NUM_FRAMES,
    batch_size: int = 32,
) -> Tensor:
    """clips: (B, T, H, W, 3), T >= num_frames -> (B * (T // num_frames), 400) I3D features."""
    windows = fvd.fvd_windows(as_clips(to_uint8(clips)), num_frames)  # (B', 16, H, W, 3)
    device = next(iter(model.parameters()), torch.empty(0)).device
    chunks = [fvd.i3d_features(model, chunk, device) for chunk in windows.split(batch_size)]
    return torch.cat(chunks, dim=0)


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
        real, fake = _pair(real, fake)
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


# ----------------------------------------------------------------------------- Ray Data path
class FeatureExtractor:
    """Ray Data batch-inference callable (one network per actor).

    A batch {column: (N, T, H, W, 3) uint8} -> {"features": (N*T, 2048)} for "inception"
    (per frame) or {"features": (N * (T // 16), 400)} for "i3d".
    """

    def __init__(
        self,
        network: str,
        weights: str,
        column: str = "clip",
        device: str = "cpu",
        num_frames: int = fvd.FVD_NUM_FRAMES,
        batch_size: int = 32,
    ):
        if network not in ("inception", "i3d"):
            raise ValueError(f"network={network!r} is not allowed; choose 'inception' or 'i3d'")
        self.network, self.column = network, column
        self.num_frames, self.batch_size = num_frames, batch_size
        if network == "inception":
            self.model = inception.load_fid_inception(weights, device)
        else:
            self.model = fvd.load_i3d(weights, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch[self.column]
        if column.dtype == object:  # ragged tensor column: one array per row
            column = np.stack(list(column))
        clips = torch.from_numpy(np.array(column))  # Ray hands read-only views; copy
        if self.network == "inception":
            features = frame_features(self.model, clips, self.batch_size)
        else:
            features = clip_features(self.model, clips, self.num_frames, self.batch_size)
        return {"features": features.cpu().float().numpy()}


def dataset_feature_moments(
    dataset,
    network: str,
    weights: str | Path,
    *,
    column: str = "clip",
    num_actors: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    num_frames: int = fvd.FVD_NUM_FRAMES,
) -> FeatureMoments:
    """Feature moments of a whole `ray.data.Dataset` of clips, inferred by an actor pool.

    Each actor loads the network once; the driver only sums the streamed (rows, D) features.
    """
    from ray.data import ActorPoolStrategy

    device = "cuda" if num_gpus > 0 else "cpu"
    features = dataset.select_columns([column]).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={
            "network": network,
            "weights": str(weights),
            "column": column,
            "device": device,
            "num_frames": num_frames,
            "batch_size": batch_size,
        },
        compute=ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    moments = FeatureMoments()
    for batch in features.iter_batches(batch_size=1024, batch_format="numpy"):
        moments.update(torch.from_numpy(batch["features"]))
    return moments
