"""Test media for the data pipeline: index-coded clips and a folder of broken files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

GRAY_BASE, GRAY_STEP = 8, 4  # frame i is painted gray level 8 + 4 i: robust to compression


def write_index_video(
    path: Path,
    n_frames: int,
    *,
    fps: float = 24.0,
    size: tuple[int, int] = (32, 32),
    options: dict[str, str] | None = None,
) -> Path:
    """An h264 file whose frame ``i`` is flat gray ``8 + 4 i`` (so ``i`` reads back from pixels)."""
    from fractions import Fraction

    if GRAY_BASE + GRAY_STEP * (n_frames - 1) > 250:
        raise ValueError(f"n_frames={n_frames} does not fit in the gray code")
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    with av.open(str(path), mode="w", options=options or {}) as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(n_frames):
            rgb = np.full((h, w, 3), GRAY_BASE + GRAY_STEP * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def read_indices(clip: np.ndarray) -> list[int]:
    """Frame indices painted by ``write_index_video``, from a clip ``(T, H, W, 3)`` uint8."""
    gray = clip.reshape(clip.shape[0], -1).astype(np.float64).mean(axis=1)  # (T,)
    return [int(round((g - GRAY_BASE) / GRAY_STEP)) for g in gray]


def write_audio_only(path: Path) -> Path:
    """An mp4 holding one AAC audio stream and no video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(16):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_png(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB png of ``size`` (H, W), written with PyAV's png encoder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    with av.open(str(path), mode="w", format="image2") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def make_broken_folder(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """A UCF-style folder: good videos plus one broken file of each kind and non-media files.

    Returns ``(good files, {broken file: expected reason prefix})`` for clips of 8 frames at
    8 fps stored at 32x32 with ``max_upscale=2``. Non-media files (txt, json) are also written
    and must be ignored.
    """
    good = [
        write_index_video(root / "alpha" / "good_a.mp4", 30),
        write_index_video(root / "beta" / "good_b.MKV", 30, size=(48, 64)),
        write_index_video(root / "beta" / "good_c.mov", 30),
    ]
    broken: dict[Path, str] = {}
    empty = root / "alpha" / "empty.mp4"
    empty.write_bytes(b"")
    broken[empty] = "empty file"

    junk = root / "alpha" / "not_a_video.mp4"
    junk.write_bytes(b"this is plain text, not a video\n" * 64)
    broken[junk] = "cannot open"

    # moov atom at the end (PyAV's default): cut in half, the index is gone.
    whole = write_index_video(root / "beta" / "truncated_tail.mp4", 40).read_bytes()
    (root / "beta" / "truncated_tail.mp4").write_bytes(whole[: len(whole) // 2])
    broken[root / "beta" / "truncated_tail.mp4"] = "cannot open"

    # moov atom first: the header promises frames that the data no longer holds.
    opts = {"movflags": "faststart"}
    whole = write_index_video(root / "beta" / "truncated_data.mp4", 40, options=opts).read_bytes()
    (root / "beta" / "truncated_data.mp4").write_bytes(whole[: len(whole) // 2])
    broken[root / "beta" / "truncated_data.mp4"] = ""  # decode error or truncated

    broken[write_audio_only(root / "alpha" / "audio_only.mp4")] = "no video stream (audio-only)"
    broken[write_index_video(root / "alpha" / "too_short.mp4", 6)] = "too short"
    broken[write_index_video(root / "beta" / "too_small.AVI", 30, size=(8, 8))] = "too small"

    (root / "alpha" / "notes.txt").write_text("not media\n")
    (root / "beta" / "meta.json").write_text("{}\n")
    (root / "README").write_text("a folder of videos\n")
    return good, broken
