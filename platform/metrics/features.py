"""Features of clips from the FID Inception (per frame) and the FVD I3D (per 16-frame window),
in batches on one worker or over a whole Ray dataset by an actor pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from vitok.platform.metrics import fvd, inception
from vitok.platform.metrics.frechet import FeatureMoments
from vitok.platform.metrics.pixel_metrics import as_clips, to_uint8


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
