"""Data pipeline without Ray: config, sampling, decoding real and broken files, augmentation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers_data import make_broken_folder, read_indices, write_index_video, write_png

from vitok.platform.config import apply_overrides
from vitok.platform.data.clips import ClipBatch
from vitok.platform.data.media import ClipSpec, Rejected, clip_frame_indices, decode_file
from vitok.platform.data.prepare import DataConfig, to_model_input
from vitok.platform.data.sources import assign_splits, list_sources
from vitok.platform.data.synthetic import CLASSES, render_clip

SPEC = ClipSpec(
    frames=8, fps=8.0, size=(32, 32), clips_per_video=4, clip_stride_s=None, max_upscale=2.0
)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"frames": 0}, "frames"),
        ({"fps": -1.0}, "fps"),
        ({"size": (64, 64), "crop": (72, 64)}, "crop"),
        ({"sources": ("images:/x",)}, "frames"),
        ({"sources": ("samples", "synthetic"), "weights": (1.0,)}, "weights"),
        ({"sources": ("videos:",)}, "videos:"),
        ({"val_fraction": 0.95}, "val_fraction"),
        ({"synthetic_classes": 99}, "synthetic_classes"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


def test_config_overrides_round_trip() -> None:
    cfg = apply_overrides(DataConfig(), ["frames=1", "sources=[images:/data/in1k]", "crop=[48,48]"])
    assert cfg.frames == 1 and cfg.sources == ("images:/data/in1k",) and cfg.crop == (48, 48)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(("src_fps", "stride_s"), [(24.0, None), (30000 / 1001, None), (25.0, 0.5)])
def test_fps_resampling_picks_the_right_frames(
    tmp_path: Path, src_fps: float, stride_s: float | None
) -> None:
    video = write_index_video(tmp_path / "idx.mp4", 60, fps=src_fps)
    spec = ClipSpec(8, 8.0, (32, 32), clips_per_video=3, clip_stride_s=stride_s, max_upscale=2)
    clips = decode_file(video, spec)
    assert len(clips) >= 2
    for c in clips:
        want = clip_frame_indices(
            c.clip_index, frames=8, fps=8.0, src_fps=src_fps, stride_s=stride_s
        )
        assert read_indices(c.clip) == want
        assert c.fps == pytest.approx(src_fps, rel=1e-3)
        assert c.start_s == pytest.approx(want[0] / src_fps)
    # 24 fps -> 8 fps is exactly every third frame; clips follow back to back.
    assert clip_frame_indices(1, frames=8, fps=8.0, src_fps=24.0, stride_s=None) == list(
        range(24, 48, 3)
    )


def test_upsampling_repeats_frames(tmp_path: Path) -> None:
    video = write_index_video(tmp_path / "slow.mp4", 10, fps=4.0)
    (clip,) = decode_file(video, ClipSpec(8, 8.0, (32, 32), 1, None, 2.0))
    assert read_indices(clip.clip) == [0, 1, 1, 2, 2, 3, 3, 4]  # round half up


def test_sample_videos_decode(sample_videos: list[Path]) -> None:
    assert len(sample_videos) == 4
    spec = ClipSpec(8, 8.0, (48, 64), clips_per_video=2, clip_stride_s=None, max_upscale=2)
    for path in sample_videos:
        clips = decode_file(path, spec)
        assert len(clips) == 2, path
        for c in clips:
            assert c.clip.shape == (8, 48, 64, 3) and c.clip.dtype == np.uint8
            assert c.clip.std() > 5  # real content, not a blank frame
            assert 20 <= c.fps <= 31
        assert clips[1].start_s == pytest.approx(1.0, abs=0.05)


def test_decode_only_what_is_needed(sample_videos: list[Path]) -> None:
    bikes = next(p for p in sample_videos if p.stem == "bikes")  # 250 frames at 25 fps
    spec = ClipSpec(8, 8.0, (32, 32), clips_per_video=2, clip_stride_s=4.0, max_upscale=2)
    clips = decode_file(bikes, spec)
    assert [c.start_s for c in clips] == [0.0, 4.0]  # second clip reached by a seek


# ----------------------------------------------------------------------------- bad input
def test_every_broken_file_is_rejected_with_a_reason(tmp_path: Path) -> None:
    good, broken = make_broken_folder(tmp_path / "videos")
    for path in good:
        clips = decode_file(path, SPEC)
        assert clips and clips[0].clip.shape == (8, 32, 32, 3)
    for path, reason in broken.items():
        with pytest.raises(Rejected) as err:
            decode_file(path, SPEC)
        assert str(err.value).startswith(reason), (path.name, str(err.value))
        assert str(err.value)  # never an empty reason


def test_listing_ignores_non_media(tmp_path: Path) -> None:
    good, broken = make_broken_folder(tmp_path / "videos")
    cfg = DataConfig(
        sources=(f"videos:{tmp_path / 'videos'}",),
        frames=8,
        size=(32, 32),
    )
    files, prints = list_sources(cfg, str(tmp_path / "out"))
    assert sorted(Path(f.path) for f in files) == sorted(good + list(broken))
    assert {f.label for f in files} == {"alpha", "beta"}
    assert prints[0]["kind"] == "videos"


def test_images_decode_as_single_frames(tmp_path: Path) -> None:
    png = write_png(tmp_path / "cat" / "a.png", (40, 60))
    (clip,) = decode_file(png, ClipSpec(1, 8.0, (32, 32), 1, None, 2.0))
    assert clip.clip.shape == (1, 32, 32, 3) and clip.clip.dtype == np.uint8
    with pytest.raises(Rejected, match="too small"):
        decode_file(png, ClipSpec(1, 8.0, (128, 128), 1, None, 2.0))


# ----------------------------------------------------------------------------- split
def test_split_is_deterministic_by_file_and_groups_ucf_clips() -> None:
    from vitok.platform.data.sources import SourceFile, _split_key

    names = [f"v_Run_g{g:02d}_c{c:02d}.avi" for g in range(1, 11) for c in range(1, 4)]
    files = [SourceFile(f"/d/Run/{n}", "Run", 0, _split_key(f"Run/{n}")) for n in names]
    assert len({f.split_key for f in files}) == 10  # one key per group
    assert _split_key("Run/v_Run_g07_c03.avi") == "Run/v_Run_g07"
    assert _split_key("top.mp4") == "top" and _split_key("a/b.c.mp4") == "a/b.c"
    a = assign_splits(files, 0.3, seed=1)
    assert a == assign_splits(files, 0.3, seed=1)
    assert set(a.values()) == {"train", "val"}
    two = assign_splits(files[:6], 0.01, seed=0)  # tiny fraction still gives a val file
    assert sorted(two.values()) == ["train", "val"]


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_classes_are_distinct_and_textured() -> None:
    clips = [render_clip(c, 12, 40, 48, seed=3) for c in range(6)]
    for clip in clips:
        assert clip.shape == (12, 40, 48, 3) and clip.dtype == np.uint8
        assert clip.std() > 20  # textured, not flat
        assert np.abs(clip[-1].astype(int) - clip[0]).mean() > 2  # it moves
    assert len(set(CLASSES)) == len(CLASSES)
    np.testing.assert_array_equal(render_clip(2, 4, 16, 16, 7), render_clip(2, 4, 16, 16, 7))


# ----------------------------------------------------------------------------- model input
def test_to_model_input_range_crop_and_flip() -> None:
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (4, 2, 12, 10, 3), dtype=torch.uint8, generator=g)
    clips[0, 0, 0, 0, 0], clips[0, 0, 0, 1, 0] = 0, 255
    x = to_model_input(clips, crop=None, flip=False)
    assert x.dtype == torch.float32 and x.shape == (4, 2, 12, 10, 3)
    assert x.min() == -1.0 and x.max() == 1.0
    centre = to_model_input(clips, crop=(8, 6), flip=False)
    torch.testing.assert_close(centre, x[:, :, 2:10, 2:8])
    train = to_model_input(
        clips, crop=(8, 6), flip=True, generator=torch.Generator().manual_seed(1)
    )
    again = to_model_input(
        clips, crop=(8, 6), flip=True, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(train, again)
    assert train.shape == (4, 2, 8, 6, 3)
    # every training crop is a (possibly mirrored) window of its own clip
    for i in range(4):
        windows = [x[i, :, t : t + 8, s : s + 6] for t in range(5) for s in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(train[i], w) for w in windows)
    # Each clip is either mirrored (along W, every frame alike) or kept, about half of each.
    many = torch.randint(0, 256, (400, 2, 3, 5, 3), dtype=torch.uint8, generator=g)
    plain = to_model_input(many, crop=None, flip=False)
    flipped = to_model_input(many, crop=None, flip=True, generator=torch.Generator().manual_seed(5))
    mirrored = torch.tensor([torch.equal(f, p.flip(2)) for f, p in zip(flipped, plain)])
    kept = torch.tensor([torch.equal(f, p) for f, p in zip(flipped, plain)])
    assert not (mirrored & kept).any()  # random clips are not symmetric: the two differ
    assert (mirrored | kept).all()
    assert 160 < int(mirrored.sum()) < 240  # Binomial(400, 1/2): mean 200, sd 10
    bf16 = to_model_input(clips.numpy(), crop=None, flip=False, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(clips.float(), crop=None, flip=False)
    with pytest.raises(ValueError, match="crop"):
        to_model_input(clips, crop=(16, 16), flip=False)


def test_the_reader_hands_over_uint8_crops_scaled_on_the_device_to_the_same_bits() -> None:
    """ClipBatch crops and flips in uint8 in the reader thread (a quarter of the float
    batch's bytes); the loop's on_device scales them to exactly the values the float path
    gives, in fp32 and in bf16 (computed in fp32, then cast, as before)."""
    from vitok.platform.training.train_loop import _on_device

    clips = torch.randint(0, 256, (6, 2, 12, 10, 3), dtype=torch.uint8)
    batch_fn = ClipBatch((8, 6))
    for training in (True, False):
        reader = batch_fn({"clip": clips, "label": torch.arange(6)}, training, _gen(3))
        assert reader["x"].dtype == torch.uint8 and reader["x"].shape == (6, 2, 8, 6, 3)
        job = SimpleNamespace(batch_fn=batch_fn)
        for dtype in (torch.float32, torch.bfloat16):
            model_batch = _on_device(job, reader, "cpu", dtype)
            expected = to_model_input(clips, crop=(8, 6), flip=training, generator=_gen(3))
            assert model_batch["x"].dtype == dtype
            assert torch.equal(model_batch["x"], expected.to(dtype))
            assert torch.equal(model_batch["label"], torch.arange(6))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
