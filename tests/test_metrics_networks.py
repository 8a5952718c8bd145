"""FID Inception and FVD I3D: random weights saved in the real formats, loaded, run.

The real weight files cannot be downloaded here. The Inception test writes a state dict in
the `pt_inception-2015-12-05-6726825d.pth` layout with random weights; the FVD tests use an
honest stand-in (`I3DStandIn`, not the real I3D) scripted and saved like `i3d_torchscript.pt`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_metrics import NoKwargsNet, randomize_inception_, save_i3d_standin

from vitok.platform.metrics import evaluate as metrics
from vitok.platform.metrics import fvd, inception
from vitok.platform.metrics.evaluate import FeatureMoments, MetricsConfig, ReconstructionMetrics


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(randomize_inception_(inception.FIDInceptionV3()).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> Path:
    return save_i3d_standin(tmp_path_factory.mktemp("weights") / "i3d_standin_torchscript.pt")


def test_inception_state_dict_layout():
    state = inception.FIDInceptionV3().state_dict()
    # Names and shapes of the torchvision Inception3 layout the .pth file uses.
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert not any(key.startswith("AuxLogits") for key in state)


@pytest.mark.slow  # 2 images at 299x299: seconds alone, ~30 s on 2 busy cores
def test_inception_loads_runs_and_is_deterministic(inception_file):
    model = inception.load_fid_inception(inception_file)
    saved = torch.load(inception_file, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    clips = torch.randint(0, 256, (2, 1, 40, 48, 3), dtype=torch.uint8)
    first = metrics.frame_features(model, clips)
    second = metrics.frame_features(model, clips)
    assert first.shape == (2, inception.FEATURE_DIM)
    assert torch.equal(first, second)
    assert first.std() > 1e-3 and torch.isfinite(first).all()  # the weights do something


def test_inception_file_without_batchnorm_counters_loads(inception_file, tmp_path):
    # Files saved by older torch lack `num_batches_tracked`; strict loading must still work.
    state = torch.load(inception_file, weights_only=True)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(old_style) < len(state)
    path = tmp_path / "old_style.pth"
    torch.save(old_style, path)
    model = inception.load_fid_inception(path)
    assert torch.equal(
        model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"]
    )


@pytest.mark.slow  # 2048-d eigendecompositions: tens of seconds on 2 busy cores
def test_reconstruction_metrics_compute_fid(inception_file, monkeypatch):
    monkeypatch.setattr(metrics, "_ANNOUNCED", {"fvd", "lpips"})
    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=gen)  # images
    evaluator = ReconstructionMetrics(MetricsConfig(inception_weights=str(inception_file)))
    evaluator.update(real, real)
    result = evaluator.compute()
    assert set(result) == {"psnr", "ssim", "fid"}
    assert result["fid"] == pytest.approx(0.0, abs=1e-6)


def test_inception_rejects_wrong_files(inception_file, tmp_path):
    garbage = tmp_path / "not_torch.pth"
    garbage.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="not a PyTorch state-dict"):
        inception.load_fid_inception(garbage)
    state = torch.load(inception_file, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, say
    state["fc.bias"] = torch.zeros(1000)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match="does not match the FID Inception"):
        inception.load_fid_inception(wrong_shape)
    with pytest.raises(FileNotFoundError):
        inception.load_fid_inception(tmp_path / "missing.pth")


def test_i3d_standin_loads_through_real_path(i3d_file):
    model = fvd.load_i3d(i3d_file)
    assert isinstance(model, torch.jit.ScriptModule)
    clips = torch.randint(0, 256, (2, 32, 24, 24, 3), dtype=torch.uint8)
    first = metrics.clip_features(model, clips)  # two 16-frame windows per clip
    assert first.shape == (4, fvd.FEATURE_DIM)
    assert torch.equal(first, metrics.clip_features(model, clips))
    assert first.std() > 0
    # Float input in [-1, 1] is quantised to the same uint8 frames.
    torch.testing.assert_close(metrics.clip_features(model, metrics.to_unit_float(clips)), first)
    with pytest.raises(ValueError, match="at least 16 frames"):
        metrics.clip_features(model, clips[:, :8])


def test_i3d_rejects_wrong_files(inception_file, tmp_path):
    with pytest.raises(ValueError, match="not a TorchScript file"):
        fvd.load_i3d(inception_file)  # a state dict, not TorchScript
    no_kwargs = tmp_path / "no_kwargs.pt"
    torch.jit.save(torch.jit.script(NoKwargsNet()), str(no_kwargs))
    with pytest.raises(ValueError, match="lacks"):
        fvd.load_i3d(no_kwargs)


def test_reconstruction_metrics_compute_fvd(i3d_file, monkeypatch):
    monkeypatch.setattr(metrics, "_ANNOUNCED", {"fid", "lpips"})
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (3, 16, 16, 16, 3), dtype=torch.uint8, generator=gen)
    evaluator = ReconstructionMetrics(MetricsConfig(i3d_weights=str(i3d_file)))
    evaluator.update(real, real)
    same = evaluator.compute()
    assert same["fvd"] == pytest.approx(0.0, abs=1e-6)
    evaluator.update(real, (real // 4))  # darker reconstructions move the fake features
    assert evaluator.compute()["fvd"] > 1e-3


@pytest.mark.slow
def test_ray_data_feature_moments_equal_one_shot(ray_local, i3d_file):
    import ray

    gen = torch.Generator().manual_seed(3)
    clips = torch.randint(0, 256, (6, 16, 16, 16, 3), dtype=torch.uint8, generator=gen)
    ds = ray.data.from_items([{"clip": clip.numpy(), "label": i} for i, clip in enumerate(clips)])
    moments = metrics.dataset_feature_moments(
        ds, "i3d", i3d_file, num_actors=2, batch_size=2, num_cpus=0.5
    )
    one_shot = FeatureMoments()
    one_shot.update(metrics.clip_features(fvd.load_i3d(i3d_file), clips))
    assert moments.count == 6
    for ours, ref in zip(moments.mean_cov(), one_shot.mean_cov()):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
