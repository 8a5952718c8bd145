"""Checksums of committed clip shards: each shard's crc32 is in the manifest; a cached
shard that no longer matches (corrupted, truncated) is reported so prepare rebuilds it.
A verified shard is remembered per attempt, so a reuse reads each file once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vitok.platform import storage

# Each manifest entry carries the shard's zlib crc32, computed when the shard is written and
# checked whenever the shards are reused: a flipped byte or a cut is found and the shards
# rebuilt. Reading every shard on every reuse would cost a study's trials a full pass over
# the data each, so a node remembers (in its scratch dir) the files it checked, by size and
# modification time: a file written since is checked again.
ATTEMPTS = "attempts"  # <data folder>/attempts/<id>/: one prepare attempt's files
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


def remember_verified(folder: str, attempt: str, checked: dict[str, str]) -> None:
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


def verify_shards(folder: str, manifest: dict[str, Any]) -> list[str]:
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
        remember_verified(folder, attempt, {e["path"]: e[CHECKSUM] for e in unchecked})
    return problems


def scan_shards(folder: str, prefix: str) -> tuple[list[dict[str, Any]], list[int], set[str]]:
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


def scan_all(folder: str, prefix: str) -> tuple[dict[str, list], list[int], set[str]]:
    shards, labels, paths = {}, [], set()
    for split in ("train", "val"):
        shards[split], split_labels, split_paths = scan_shards(
            folder, f"{prefix}/shards/split={split}"
        )
        labels += split_labels
        paths |= split_paths
    return shards, labels, paths


def read_parquet_columns(uri: str, columns: list[str]) -> Any:
    """Some columns of one Parquet file (a pyarrow Table), on any storage."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)
