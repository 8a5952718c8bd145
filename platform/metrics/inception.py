"""The TF-Inception v3 feature network used by FID, written out so its weight file loads as is.

FID is defined on the 2048-d pool features of the TensorFlow Inception graph of 2015-12-05.
pytorch-fid ported those weights to PyTorch (`pt_inception-2015-12-05-6726825d.pth`, a plain
state dict in torchvision's `Inception3` naming, 1008 classes, no aux head) and patched four
block types where TF differs from torchvision. We cannot use torchvision with our torch, so
the network is written here with the same module names and parameter shapes; that file loads
unchanged with `torch.load(path, weights_only=True)` and `load_state_dict(strict=True)`.

The TF differences (as in pytorch-fid's FIDInceptionA/C/E_1/E_2):
- the 3x3 average pools in the A, C and first E blocks ignore padded zeros
  (`count_include_pad=False`);
- the last E block (Mixed_7c) max-pools its pool branch instead of average pooling.

Input handling follows pytorch-fid: values in [0, 1] are resized to 299x299 (bilinear,
align_corners=False), then scaled to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's 1008-way softmax; fc is kept so the file loads strictly


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU, torchvision's naming (`conv`, `bn`)."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs: int | tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TF's average pool does not count the padded zeros.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): out channels 224 + pool_features."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): out channels 384 + 96 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e): out channels 768."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7d = conv(b7d)
        b7d = self.branch7x7dbl_5(b7d)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): out channels 320 + 192 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c): out channels 2048.

    `max_pool_branch=True` is the TF graph's Mixed_7c, which max-pools its pool branch.
    """

    def __init__(self, in_channels: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """TF-Inception v3 up to the 2048-d average pool (the FID feature), torchvision names."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        # Unused by FID, present so the weight file loads with strict=True.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) float in [0, 1] -> (N, 2048) pool features."""
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299) in [-1, 1], as the TF graph expects
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """Build the network and load `pt_inception-2015-12-05-6726825d.pth` (or a file like it).

    Raises ValueError naming the file when it is not a tensor state dict or when its keys or
    shapes do not match this network (for example torchvision's ImageNet Inception weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a non-torch file, or a pickle holding more than tensors
        raise ValueError(
            f"{path} is not a PyTorch state-dict file of tensors (expected the FID Inception "
            f"weights pt_inception-2015-12-05-6726825d.pth): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} must hold a dict of tensors (a state dict); got {type(state)}")
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not match the FID Inception network "
            f"(pt_inception-2015-12-05-6726825d.pth layout): {err}"
        ) from err
    return model.to(device).eval().requires_grad_(False)


def frames_to_unit(frames: Tensor) -> Tensor:
    """frames: (N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] (pytorch-fid's ToTensor)."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    return rearrange(frames, "n h w c -> n c h w").float() / 255.0


@torch.no_grad()
def inception_features(model: FIDInceptionV3, frames: Tensor, batch_size: int = 64) -> Tensor:
    """frames: (N, H, W, 3) uint8 -> (N, 2048) float32 features on the model's device."""
    device = next(model.parameters()).device
    chunks = [model(frames_to_unit(chunk.to(device))) for chunk in frames.split(batch_size, dim=0)]
    return torch.cat(chunks, dim=0) if chunks else torch.empty(0, FEATURE_DIM, device=device)
