"""The Frechet distance between Gaussians fitted to network features (FID, FVD).

``FeatureMoments`` keeps exact sums (n, sum x, sum x x^T) in float64, so partial sums from
batches and workers add up (``merge``, or ``MetricState.all_reduce``) to the one-shot
statistic; ``frechet_from_moments`` is the distance between two of them.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


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
    """The Frechet distance between the Gaussians of two feature sets."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())
