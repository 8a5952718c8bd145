"""LPIPS (Zhang et al. 2018), VGG16 variant, with weights from files the user supplies.

Two files, in their original formats, loaded with `torch.load(..., weights_only=True)`:
- `vgg_weights`: a torchvision `vgg16` state dict (`features.0.weight`, ...; the full model's
  file is fine, only its `features.*` entries are used);
- `lpips_weights`: the `lpips` package's linear heads (`weights/v0.1/vgg.pth`):
  `lin{0..4}.model.1.weight` of shape (1, C, 1, 1), C = 64, 128, 256, 512, 512.
Nothing downloads. For video, the distance is taken per frame and averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

# torchvision's VGG16 ("D") layer plan: conv widths and "M" max-pools.
_VGG16_PLAN: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
_VGG16_PLAN += [512, 512, 512, "M", 512, 512, 512, "M"]
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: `features[start:end]` slices.
_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3 (indices and names identical)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(item)
    return nn.Sequential(*layers[:30])  # drop the last pool, unused by LPIPS


class _LinearHead(nn.Module):
    """The lpips package's `NetLinLayer`: `model = Sequential(Dropout, Conv2d(C, 1, 1))`.

    Identity replaces the dropout (eval only), keeping the key `model.1.weight`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _load_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with objects, a zip of the wrong kind, garbage
        raise ValueError(f"{what}: {path} is not a tensor state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} is not a state dict of tensors")
    return state


def _check_and_load(
    module: nn.Module, state: dict[str, Tensor], what: str, path: str, prefix: str
) -> None:
    """Load `state` (keys without `prefix`) into module, naming full keys in errors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        found = sorted(state)[:4]
        raise ValueError(
            f"{what}: {path} lacks {[prefix + k for k in missing[:4]]} (found {found})"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{what}: {path} has {prefix}{key} of shape {tuple(state[key].shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    module.load_state_dict({k: state[k].float() for k in expected})


class LPIPS(nn.Module):
    """Learned perceptual distance. Frozen; always in eval mode.

    forward(x, y): (B, T, H, W, 3) or (B, H, W, 3) float in [-1, 1] -> (B,) distance,
    averaged over frames. Inputs of at least 16 x 16 pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        # The lpips package's ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = vgg16_features()
        for i, ch in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(ch))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_weights: str | Path, lpips_weights: str | Path) -> LPIPS:
        """Load torchvision VGG16 weights and the lpips package's linear heads."""
        model = cls()
        vgg = _load_tensors(vgg_weights, "vgg_weights")
        feats = {
            k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")
        }
        _check_and_load(
            model.features, feats, "vgg_weights (torchvision vgg16)", str(vgg_weights), "features."
        )
        heads = _load_tensors(lpips_weights, "lpips_weights")
        for i in range(len(TAP_CHANNELS)):
            head = getattr(model, f"lin{i}")
            sub = {
                k.removeprefix(f"lin{i}."): v for k, v in heads.items() if k.startswith(f"lin{i}.")
            }
            _check_and_load(
                head, sub, "lpips_weights (lpips lin heads)", str(lpips_weights), f"lin{i}."
            )
        return model

    def train(self, mode: bool = True) -> LPIPS:
        """LPIPS stays in eval mode (it is a fixed metric / loss network)."""
        return super().train(False)

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (N, 3, H, W) in [-1, 1] -> (N,)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # one VGG pass for both
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for i, (start, end) in enumerate(_SLICES):
            for layer in self.features[start:end]:
                h = layer(h)
            fx, fy = h.float().chunk(2)
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit channel norm
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            head = getattr(self, f"lin{i}")
            diff = (fx - fy).pow(2).to(head.model[1].weight.dtype)
            total = total + head(diff).float().mean(dim=(1, 2, 3))  # spatial average
        return total

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.ndim == 4:
            x, y = x[:, None], y[:, None]  # (B, 1, H, W, 3)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected (B, T, H, W, 3) or (B, H, W, 3), got {tuple(x.shape)}")
        b, t = x.shape[:2]
        frames = lambda v: rearrange(v, "b t h w c -> (b t) c h w")  # per-frame LPIPS
        dist = self._distance(frames(x), frames(y))  # (B*T,)
        return rearrange(dist, "(b t) -> b t", b=b, t=t).mean(dim=1)  # (B,)
