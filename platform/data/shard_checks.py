"""Checksums of committed clip shards: each shard's crc32 is in the manifest; a cached
shard that no longer matches (corrupted, truncated) is reported so prepare rebuilds it.
A verified shard is remembered on the node that checked it, so a reuse reads each file once."""

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
ATTEMPTS = "attempts"  # <data folder>/attempts/<id>/: one prepare attempt's rejects table
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


def file_stats(uri: str) -> dict[str, tuple[int, int | None]]:
    """Every file under a folder: path relative to it -> (bytes, modification time in ns)."""
    import pyarrow.fs

    fs, path = storage.filesystem(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True)
    return {
        info.path[len(path) :].lstrip("/"): (int(info.size), info.mtime_ns)
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.File
    }


def _memo_file(folder: str) -> Path:
    name = hashlib.sha256(folder.encode()).hexdigest()[:24]
    return storage.scratch_dir() / VERIFIED / f"{name}.json"


def _read_memo(path: Path) -> dict[str, list[Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def remember_verified(
    folder: str, checked: dict[str, str], stats: dict[str, tuple[int, int | None]] | None = None
) -> None:
    """Record ``{entry path: crc}`` (paths relative to ``folder``) as verified at the files'
    current size and time (``stats``: a listing of ``folder`` made after they were written)."""
    stats = file_stats(folder) if stats is None else stats
    memo_path = _memo_file(folder)
    memo = _read_memo(memo_path)
    for entry_path, crc in checked.items():
        size, mtime = stats.get(entry_path, (None, None))
        if size is not None and mtime is not None:
            memo[entry_path] = [size, mtime, crc]
    with contextlib.suppress(OSError):  # a read-only scratch dir only costs a re-check
        storage.write_json(str(memo_path), memo)


def check_entries(folder: str, entries: list[dict[str, Any]]) -> dict[str, str]:
    """What is wrong with each shard entry (path relative to ``folder``, bytes, crc32) that
    is missing, resized or fails its checksum: ``{entry path: problem}``. A file this node
    verified before at its current size and time is not read again."""
    stats = file_stats(folder)
    memo = _read_memo(_memo_file(folder))
    problems, unchecked = {}, []
    for entry in entries:
        size, mtime = stats.get(entry["path"], (None, None))
        if size is None:
            problems[entry["path"]] = f"{entry['path']} is missing"
        elif size != entry["bytes"]:
            problems[entry["path"]] = (
                f"{entry['path']} has {size} bytes, the manifest {entry['bytes']}"
            )
        elif CHECKSUM in entry and memo.get(entry["path"]) != [size, mtime, entry[CHECKSUM]]:
            unchecked.append(entry)  # (a manifest from before checksums: sizes only)
    if unchecked:
        with ThreadPoolExecutor(min(CHECK_THREADS, len(unchecked))) as pool:
            crcs = list(pool.map(lambda e: _crc32(storage.join(folder, e["path"])), unchecked))
        good = {}
        for entry, crc in zip(unchecked, crcs):
            if crc != entry[CHECKSUM]:
                problems[entry["path"]] = (
                    f"{entry['path']} fails its checksum ({CHECKSUM} {crc}, the manifest "
                    f"{entry[CHECKSUM]})"
                )
            else:
                good[entry["path"]] = crc
        remember_verified(folder, good, stats)
    return problems


def verify_shards(folder: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the shards a manifest lists (empty when nothing)."""
    entries = [e for split in ("train", "val") for e in manifest["files"][split]]
    return list(check_entries(folder, entries).values())


def read_parquet_columns(uri: str, columns: list[str]) -> Any:
    """Some columns of one Parquet file (a pyarrow Table), on any storage."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)
