"""Clips as MLflow artifacts: a grid PNG (frames across, one clip per row) and, for video, an
mp4 of the clips tiled, for reconstructions beside their originals and for generated samples.

The models stay outside: callers pass what to draw (uint8 frames) or a ``reconstruct``
callable, so nothing here imports a model package.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitok.platform.data.prepare import PreparedData, first_clips, to_model_input
from vitok.platform.metrics.pixel_metrics import to_uint8
from vitok.platform.tracking.run_logger import RunLogger

MAX_FRAMES = 8  # frames across a grid row


def frame_strip(clip: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """(T, H, W, 3) -> (H, F*W, 3): up to ``max_frames`` evenly strided frames side by side."""
    step = max(1, clip.shape[0] // max_frames)
    return np.concatenate(list(clip[::step][:max_frames]), axis=1)


def reconstruction_grid(clips: np.ndarray, recons: np.ndarray, max_frames: int = 8) -> np.ndarray:
    """Originals over reconstructions: (2*N*H, F*W, 3) uint8 from (N, T, H, W, 3) pairs."""
    rows = []
    for clip, recon in zip(clips, recons):
        rows += [frame_strip(clip, max_frames), frame_strip(recon, max_frames)]  # (H, F*W, 3)
    return np.concatenate(rows, axis=0)


def _log_grid(
    logger: RunLogger,
    grid: np.ndarray,
    path: str,
    title: str,
    figsize: tuple[float, float],
    **title_kw: Any,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title(title, **title_kw)
    logger.log_figure(fig, path)
    plt.close(fig)


def _log_video(logger: RunLogger, video: np.ndarray, folder: str, file: str, fps: float) -> None:
    """video (T, H, W, 3) uint8 -> ``folder/file`` (cropped to even H and W for the codec)."""
    from vitok.platform.data.media import encode_video

    h, w = video.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file
        encode_video(path, video[:, : h - h % 2, : w - w % 2], fps)
        logger.log_artifact(path, folder)


def log_reconstructions(
    logger: RunLogger,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    prepared: PreparedData,
    crop: tuple[int, int] | None,
    fps: float,
    count: int = 4,
) -> None:
    """``log_reconstruction_pairs`` of the first ``count`` clips of the val split (else of
    the train split). ``reconstruct``: model input (B, T, h, w, 3) in [-1, 1] ->
    reconstruction, same shape. (A training job's evaluator logs its own pairs from the
    clips it evaluates; this is for a model without one.)"""
    split = "val" if prepared.num_val else "train"
    clips = first_clips(prepared, split, count)
    x = to_model_input(torch.from_numpy(clips), crop=crop, flip=False)
    with torch.no_grad():
        recon = reconstruct(x)
    log_reconstruction_pairs(logger, x, recon, fps, split=split)


def log_reconstruction_pairs(
    logger: RunLogger,
    clips: torch.Tensor,
    recons: torch.Tensor,
    fps: float,
    folder: str = "reconstructions",
    split: str = "val",
) -> None:
    """``folder/grid.png``: clips (odd rows) over their reconstructions (even rows), and for
    video ``folder/side_by_side.mp4``. clips, recons: (N, T, H, W, 3) in [-1, 1], from the
    ``split`` split (named in the grid's title)."""
    clips, recons = to_uint8(clips).cpu().numpy(), to_uint8(recons).cpu().numpy()
    grid = reconstruction_grid(clips, recons)
    figsize = (min(16, grid.shape[1] / 40), min(16, grid.shape[0] / 40))
    source = {"val": "validation", "train": "training"}.get(split, split)
    title = f"{source} clips (odd rows) over reconstructions (even rows)"
    _log_grid(logger, grid, f"{folder}/grid.png", title, figsize)
    if clips.shape[1] > 1:
        side = np.concatenate([clips, recons], axis=3)  # (N, T, H, 2W, 3)
        frames = np.concatenate(list(side), axis=1)  # (T, N*H, 2W, 3)
        _log_video(logger, frames, folder, "side_by_side.mp4", fps)


def log_samples(
    logger: RunLogger, clips: torch.Tensor, labels: list[int], names: list[str], fps: float
) -> None:
    """A grid PNG (one row per sample, frames across, grouped by class) and, for video, an
    mp4 tiling the samples (classes down, samples across). clips: (N, T, H, W, 3)."""
    frames = to_uint8(clips).cpu().numpy()  # (N, T, H, W, 3)
    grid = np.concatenate([frame_strip(clip) for clip in frames], axis=0)  # (N*H, F*W, 3)
    figsize = (min(16, 2 + grid.shape[1] / 40), min(20, grid.shape[0] / 40))
    classes = ", ".join(f"{i}={names[i]}" for i in sorted(set(labels)))
    title = f"generated samples, rows by class ({classes})"
    _log_grid(logger, grid, "samples/grid.png", title, figsize, fontsize=8)
    if frames.shape[1] > 1:
        per_class = labels.count(labels[0])
        rows = [
            np.concatenate(list(frames[i : i + per_class]), axis=2)  # (T, H, k*W, 3)
            for i in range(0, len(frames), per_class)
        ]
        video = np.concatenate(rows, axis=1)  # (T, classes*H, k*W, 3)
        _log_video(logger, video, "samples", "samples.mp4", fps)
