"""FVD's feature network: the StyleGAN-V I3D TorchScript (`i3d_torchscript.pt`).

StyleGAN-V (src/metrics/frechet_video_distance.py, metric_utils.py) loads the Kinetics-400
I3D (a TorchScript port of the tf.hub model used by the original FVD code) and calls it as

    features = detector(videos, rescale=True, resize=True, return_features=True)

on videos `(B, 3, T, H, W)` uint8 in [0, 255] (dataset clips as stored; generator output as
`(x * 127.5 + 128).clamp(0, 255).to(uint8)`), 16 consecutive frames per clip. `rescale=True`
maps [0, 255] to [-1, 1] inside the network, `resize=True` resizes every frame to 224x224
inside it, and `return_features=True` returns the 400-d pre-softmax logits that FVD
compares. We call it the same way, so features match StyleGAN-V's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

FVD_NUM_FRAMES = 16
FEATURE_DIM = 400
I3D_CALL_KWARGS = ("rescale", "resize", "return_features")


def load_i3d(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load `i3d_torchscript.pt` with `torch.jit.load(path, map_location=device)`.

    Raises ValueError naming the file if it is not TorchScript or if its `forward` lacks the
    keyword arguments StyleGAN-V passes (rescale, resize, return_features).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weight file not found: {path}")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as err:
        raise ValueError(
            f"{path} is not a TorchScript file (expected StyleGAN-V's i3d_torchscript.pt): {err}"
        ) from err
    names = [arg.name for arg in model.forward.schema.arguments]
    missing = [name for name in I3D_CALL_KWARGS if name not in names]
    if missing:
        raise ValueError(
            f"{path}: forward{tuple(names[1:])} lacks {missing}; expected StyleGAN-V's I3D "
            f"signature forward(x, rescale, resize, return_features)"
        )
    return model.eval()


def fvd_windows(clips: Tensor, num_frames: int = FVD_NUM_FRAMES) -> Tensor:
    """clips: (B, T, H, W, 3) -> (B * (T // num_frames), num_frames, H, W, 3).

    Each run of `num_frames` consecutive frames is one FVD sample; leftover frames are dropped.
    """
    b, t = clips.shape[:2]
    if t < num_frames:
        raise ValueError(f"FVD needs clips of at least {num_frames} frames, got T={t}")
    windows = t // num_frames
    clips = clips[:, : windows * num_frames]
    return rearrange(clips, "b (n t) h w c -> (b n) t h w c", n=windows)


@torch.no_grad()
def i3d_features(
    model: torch.jit.ScriptModule, clips: Tensor, device: torch.device | str = "cpu"
) -> Tensor:
    """clips: (B, T, H, W, 3) uint8 with T == 16 -> (B, 400) float32 I3D features.

    Layout and call as StyleGAN-V: (B, 3, T, H, W) uint8, rescale/resize inside the network.
    """
    if clips.dtype != torch.uint8:
        raise TypeError(f"clips must be uint8, got {clips.dtype}")
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be (B, T, H, W, 3), got {tuple(clips.shape)}")
    videos = rearrange(clips, "b t h w c -> b c t h w").contiguous().to(device)
    features = model(videos, rescale=True, resize=True, return_features=True)
    if features.ndim != 2 or features.shape[0] != clips.shape[0]:
        raise ValueError(
            f"I3D returned shape {tuple(features.shape)}; expected ({clips.shape[0]}, D)"
        )
    return features.float()
