"""Test helpers for the metrics: real frames, weight files with random weights, an I3D stand-in.

The real FID Inception and StyleGAN-V I3D weights cannot be downloaded here, so tests write
files in the same formats with random weights and load them through the real code paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def decode_frames(path: Path, count: int, crop: tuple[int, int] = (96, 128)) -> np.ndarray:
    """The first `count` frames of a real video, centre-cropped: (count, h, w, 3) uint8."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    clip = np.stack(frames)  # (T, H, W, 3)
    h, w = crop
    top, left = (clip.shape[1] - h) // 2, (clip.shape[2] - w) // 2
    return np.ascontiguousarray(clip[:, top : top + h, left : left + w])


def add_noise(clip: np.ndarray, std: float, seed: int) -> np.ndarray:
    """A 'reconstruction': the clip plus rounded Gaussian noise, clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0, std, clip.shape).round()
    return np.clip(clip.astype(np.int16) + noise.astype(np.int16), 0, 255).astype(np.uint8)


def randomize_inception_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1) through the 40-odd layers (He init + BN stats).

    Default init makes the 2048-d features vanish (~1e-8), which would make determinism and
    'loaded the right weights' checks trivially true.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_((2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(
                    0.05 * torch.randn(module.running_mean.shape, generator=gen)
                )
                module.running_var.fill_(1.0)
    return model


class I3DStandIn(nn.Module):
    """NOT the real I3D. A tiny 3D-conv net with StyleGAN-V's I3D TorchScript call signature.

    `forward(x: (B, 3, T, H, W), rescale, resize, return_features) -> (B, 400)`, scripted and
    saved like `i3d_torchscript.pt`, so the real loading and feature code paths are tested
    without the real Kinetics-400 weights (which cannot be downloaded here).
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(
        self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1  # [0, 255] -> [-1, 1]
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        pooled = F.relu(self.conv(x)).mean(dim=(2, 3, 4))  # (B, 8)
        logits = self.head(pooled)  # (B, 400)
        if return_features:
            return logits
        return logits.softmax(dim=1)


class NoKwargsNet(nn.Module):
    """A TorchScript net without the I3D keyword arguments (a wrong file for FVD)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.float().mean(dim=(2, 3, 4))


def save_i3d_standin(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(I3DStandIn().eval()), str(path))
    return path


class FirstColumn:
    """Per-clip values for ``MeanEvaluator``: a batch's first feature column."""

    names = ("first",)

    def __call__(self, model: object, batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        return {"first": batch["x"][:, 0]}


def reduce_worker(rank: int, world: int, init_file: str, features: Tensor, out_dir: str) -> None:
    """One gloo rank: accumulate its half of the features and scalars, all_reduce, save; and
    a ``MeanEvaluator`` that only rank 0 feeds (every feature, in batches of 7)."""
    import torch.distributed as dist

    from vitok.platform.metrics.evaluate import MeanEvaluator, MetricState

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = MetricState()
        part = features[rank::world]
        state.add_features("fid/real", part)
        state.add_values("psnr", part[:, 0])
        state.all_reduce()
        mean, cov = state.moments["fid/real"].mean_cov()
        evaluator = MeanEvaluator(FirstColumn())
        for batch in features.split(7) if rank == 0 else ():
            evaluator.update(None, {"x": batch})
        out = {"mean": torch.from_numpy(mean), "cov": torch.from_numpy(cov), "psnr": state.means()}
        out["first"] = evaluator.compute()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
