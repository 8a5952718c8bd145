"""Units of work of ``prepare``: fixed groups of source files, each decoded and written as
one Parquet shard, then committed on its own by a small marker written last.

A unit is a function of the source listing and the config alone (never of the cluster's
size or of which task ran first), so the same command plans the same units again: a rerun
after a kill keeps every committed unit and decodes only the others, and the shards it ends
with are the ones an uninterrupted run writes, byte for byte. Under the data folder::

    shards/split=<split>/<unit>.parquet   a unit's clips, in file order then clip order
    units/<unit>.json                     its marker: files, shard entries, rejects, labels

A unit streams its clips into the shard a row group at a time, so a task holds one file's
clips and 16 MB of buffered clips, whatever the corpus size. ``shard_parquet_options`` is the one
place that decides the shards' Parquet layout.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import signal
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitok.platform import storage
from vitok.platform.data.media import Clip, ClipSpec, Rejected, decode_file, decode_file_isolated

SHARDS = "shards"
UNITS = "units"
SHARD_BYTES = 64 * 2**20  # a unit's clips, at most (as estimated before decoding)
UNITS_PER_SPLIT = 16  # small corpora: this many units per split, for parallelism
ROW_GROUP_BYTES = 16 * 2**20  # clips buffered before they are written
CLIPS_PER_FILE_GUESS = 4  # clips_per_video=0 ("all that fit"): a UCF-101 file gives 2-4
MARKER_READ_THREADS = 16
SLOW_FAULT_S = 1.0  # the "slow" injected fault (tests)


def shard_parquet_options(clip_bytes: int) -> dict[str, Any]:
    """How a unit writes its shard: ``buffer_clips`` clips decoded before they are written
    (a task's memory bound), and the options given to ``pyarrow.parquet.ParquetWriter``: the
    training read path's layout (``shard_layout``: one clip per row group, uncompressed)."""
    from vitok.platform.data.shard_layout import parquet_write_options

    options = parquet_write_options()
    options.pop("row_group_size")  # each clip is written as its own row group
    return {"buffer_clips": max(1, ROW_GROUP_BYTES // max(1, clip_bytes)), **options}


@dataclass(frozen=True)
class Unit:
    """A group of source files of one split: decoded together into one shard."""

    name: str  # "<split>-<index>", or "<split>-<index>.f<k>" for one file of a lost unit
    split: str
    files: tuple[tuple[str, int, int], ...]  # (path, label index, source index)

    def to_row(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "files": [list(f) for f in self.files]}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Unit:
        files = tuple((str(p), int(label), int(sid)) for p, label, sid in row["files"])
        return cls(str(row["name"]), str(row["split"]), files)

    def single_files(self) -> list[Unit]:
        """One unit per file (decoding again a unit whose task died, to find the culprit)."""
        return [Unit(f"{self.name}.f{k:03d}", self.split, (f,)) for k, f in enumerate(self.files)]


def plan_units(items: list[dict[str, Any]], clip_bytes: int, clips_per_file: int) -> list[Unit]:
    """``items`` (path, label, source_id, split), in listing order, cut into units: at most
    ``SHARD_BYTES`` of expected clips each, and up to ``UNITS_PER_SPLIT`` units per split
    for a small corpus (so every CPU gets work)."""
    per_file = clip_bytes * (clips_per_file or CLIPS_PER_FILE_GUESS)
    cap = max(1, SHARD_BYTES // per_file)
    units = []
    for split in ("train", "val"):
        mine = [
            (it["path"], int(it["label"]), int(it["source_id"]))
            for it in items
            if it["split"] == split
        ]
        size = max(1, min(cap, math.ceil(len(mine) / UNITS_PER_SPLIT)))
        for i in range(0, len(mine), size):
            units.append(Unit(f"{split}-{i // size:05d}", split, tuple(mine[i : i + size])))
    return units


def marker_uri(folder: str, name: str) -> str:
    return storage.join(folder, UNITS, f"{name}.json")


def shard_path(split: str, name: str) -> str:
    """A unit's shard, relative to the data folder."""
    return f"{SHARDS}/split={split}/{name}.parquet"


# ----------------------------------------------------------------------------- one unit


def _fault_for(path: str, faults: tuple[tuple[str, str], ...]) -> str | None:
    name = storage.name(path)
    return next((action for action, pattern in faults if fnmatch.fnmatch(name, pattern)), None)


def _decode_one(path: str, spec: ClipSpec, timeout_s: float, fault: str | None) -> list[Clip]:
    """A file's clips; raises ``Rejected`` with the reason (any error becomes one)."""
    try:
        with storage.readable_file(path) as local:
            if timeout_s > 0:
                return decode_file_isolated(str(local), spec, timeout_s, fault=fault)
            return decode_file(str(local), spec)
    except Rejected:
        raise
    except Exception as err:  # noqa: BLE001 - a bad file must never end the run
        raise Rejected(f"error: {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def _local_output(uri: str, tag: str) -> Iterator[Path]:
    """A local file to write ``uri``'s content into; published whole when the block exits
    having created it (local: a rename in the target folder; remote: one upload), dropped
    on an error. The temporary name carries ``tag`` (the attempt): leftovers are known."""
    if storage.is_local(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{tag}.{uuid.uuid4().hex[:6]}.tmp")
    else:
        tmp = storage.scratch_dir() / f"{uuid.uuid4().hex}-{storage.name(uri)}"
    try:
        yield tmp
        if not tmp.exists():
            return
        if storage.is_local(uri):
            os.replace(tmp, target)
        else:
            storage.upload(tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class _ShardWriter:
    """Rows appended file by file, written each ``buffer_clips`` clips, one clip per row
    group, the clip column encoded as ``encoding`` (``shard_layout.encode_clips``)."""

    COLUMNS = ("label", "path", "start_s", "fps", "clip_index", "source_id")

    def __init__(self, local: Path, clip_bytes: int, encoding: str, quality: int) -> None:
        self.local, self.options = local, shard_parquet_options(clip_bytes)
        self.encoding, self.quality = encoding, quality
        self.writer: Any = None
        self.rows = 0
        self._clips: list[np.ndarray] = []
        self._meta: dict[str, list[Any]] = {k: [] for k in self.COLUMNS}

    def add(self, clips: list[Clip], path: str, label: int, source_id: int) -> None:
        for c in clips:
            self._clips.append(c.clip)  # (T, H, W, 3) uint8
            for key, value in zip(
                self.COLUMNS, (label, path, c.start_s, c.fps, c.clip_index, source_id)
            ):
                self._meta[key].append(value)
            if len(self._clips) >= self.options["buffer_clips"]:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vitok.platform.data.shard_layout import encode_clips

        if not self._clips:
            return
        encoded = list(encode_clips(np.stack(self._clips), self.encoding, self.quality))
        kind = pa.binary() if self.encoding == "raw" else pa.list_(pa.binary())
        table = pa.table(
            {
                "clip": pa.array(encoded, kind),  # raw bytes, or one image per frame
                "label": pa.array(self._meta["label"], pa.int64()),
                "path": pa.array(self._meta["path"], pa.string()),
                "start_s": pa.array(self._meta["start_s"], pa.float32()),
                "fps": pa.array(self._meta["fps"], pa.float32()),
                "clip_index": pa.array(self._meta["clip_index"], pa.int32()),
                "source_id": pa.array(self._meta["source_id"], pa.int32()),
            }
        )
        if self.writer is None:
            options = {k: v for k, v in self.options.items() if k != "buffer_clips"}
            self.writer = pq.ParquetWriter(str(self.local), table.schema, **options)
        self.writer.write_table(table, row_group_size=1)
        self.rows += len(table)
        self._clips = []
        self._meta = {k: [] for k in self.COLUMNS}

    def close(self) -> bool:
        """Write what is buffered; True when the shard holds any clip."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
        return self.rows > 0


def decode_unit(
    unit: Unit,
    *,
    spec: ClipSpec,
    folder: str,
    attempt: str,
    timeout_s: float,
    faults: tuple[tuple[str, str], ...] = (),
    encoding: str = "raw",
    quality: int = 90,
) -> dict[str, Any]:
    """Decode a unit's files, write its shard (streamed, published whole) and then its
    marker. Returns the marker: files, shard entries, rejects, clips per label; ``error``
    holds why the shard or marker could not be written (the files decoded fine)."""
    rel = shard_path(unit.split, unit.name)
    marker: dict[str, Any] = {"unit": unit.name, "split": unit.split, "attempt": attempt}
    marker.update(files=[f[0] for f in unit.files], shards=[], rejects=[], labels={})
    labels: Counter[int] = Counter()
    try:
        with _local_output(storage.join(folder, rel), attempt) as local:
            writer = _ShardWriter(local, spec.clip_bytes, encoding, quality)
            for path, label, sid in unit.files:
                fault = _fault_for(path, faults) if faults else None
                if fault == "die":  # the task's worker killed, as by the OOM killer
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "slow":  # a long file (tests): the decode itself is unchanged
                    time.sleep(SLOW_FAULT_S)
                try:
                    clips = _decode_one(path, spec, timeout_s, fault)
                except Rejected as err:
                    marker["rejects"].append({"path": path, "reason": str(err)})
                    continue
                writer.add(clips, path, label, sid)
                labels[label] += len(clips)
            if writer.close():  # else no file was created: nothing is published
                entry = {"path": rel, "bytes": local.stat().st_size, "rows": writer.rows}
                marker["shards"].append({**entry, "crc32": _file_crc(local)})
        marker["labels"] = {str(k): v for k, v in sorted(labels.items())}
        storage.write_json(marker_uri(folder, unit.name), marker)
    except Exception as err:  # noqa: BLE001 - reported by the driver, which stops
        marker["error"] = f"{type(err).__name__}: {err}"
    finally:
        # Arrow's allocator keeps what a unit's row groups used (measured: ~200 MB more
        # per process at the UCF preset's 16x144x144); hand it back between units.
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    return marker


# ----------------------------------------------------------------------------- resuming


def read_markers(folder: str, units: list[Unit]) -> dict[str, dict[str, Any]]:
    """The committed markers of ``units`` under ``folder`` (one listing, then a read per
    marker), kept only when a marker names the unit's files and its shards are present at
    their size: a marker is written after its shard, so it never outlives a missing one."""
    present = set(storage.listdir(storage.join(folder, UNITS)))
    wanted = [u for u in units if f"{u.name}.json" in present]
    if not wanted:
        return {}
    sizes = dict(storage.list_files(storage.join(folder, SHARDS), suffix=".parquet"))

    def read(unit: Unit) -> dict[str, Any] | None:
        try:
            marker = storage.read_json(marker_uri(folder, unit.name))
        except (OSError, ValueError):
            return None
        if marker.get("files") != [f[0] for f in unit.files] or "error" in marker:
            return None
        for entry in marker["shards"]:
            if sizes.get(entry["path"][len(SHARDS) + 1 :]) != entry["bytes"]:
                return None
        return marker

    with ThreadPoolExecutor(min(MARKER_READ_THREADS, len(wanted))) as pool:
        found = dict(zip((u.name for u in wanted), pool.map(read, wanted)))
    return {name: m for name, m in found.items() if m is not None}


def merge_single_files(
    unit: Unit, parts: dict[str, dict[str, Any]], attempt: str
) -> dict[str, Any]:
    """The marker of a unit decoded again one file per task: its parts' shards, rejects and
    labels; a file whose part is missing (its task died, alone too) is rejected."""
    marker: dict[str, Any] = {"unit": unit.name, "split": unit.split, "attempt": attempt}
    marker.update(files=[f[0] for f in unit.files], shards=[], rejects=[], labels={})
    labels: Counter[str] = Counter()
    for part in unit.single_files():
        got = parts.get(part.name)
        if got is None:
            marker["rejects"].append(
                {
                    "path": part.files[0][0],
                    "reason": "crashed: the decode task died on this file, alone and with "
                    "others (its worker was killed: out of memory, or a native crash)",
                }
            )
            continue
        marker["shards"] += got["shards"]
        marker["rejects"] += got["rejects"]
        labels.update({k: int(v) for k, v in got["labels"].items()})
    marker["labels"] = dict(sorted(labels.items()))
    return marker


def remove_leftovers(
    folder: str, manifest: dict[str, Any], units: list[Unit], attempt: str, started_ns: int
) -> None:
    """After a commit: delete what neither the manifest nor a unit's marker lists (a write
    cut short by a kill, the markers of a lost unit's single files) and older attempts'
    folders. A file is deleted only when it is older than this attempt or carries its name:
    a concurrent writer's file still being written is left alone."""
    from vitok.platform.data.shard_checks import ATTEMPTS, file_stats

    listed = {e["path"] for split in manifest["files"].values() for e in split}
    listed |= {f"{UNITS}/{u.name}.json" for u in units}
    for top in (SHARDS, UNITS):
        for rel, (_, mtime) in file_stats(storage.join(folder, top)).items():
            path = f"{top}/{rel}"
            if path not in listed and ((mtime or 0) < started_ns or attempt in rel):
                storage.delete(storage.join(folder, path))
    for name in storage.listdir(storage.join(folder, ATTEMPTS)):
        if name != manifest["attempt"] and name <= attempt:
            storage.delete(storage.join(folder, ATTEMPTS, name))
