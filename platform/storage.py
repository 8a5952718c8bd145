"""One storage root for everything that must outlive a process or be seen from another node.

``storage.root`` (or ``VITOK_STORAGE``) is a local folder by default (``./results``), an
object store (``s3://bucket/prefix``, ``gs://bucket/prefix``) or a shared mount
(``/mnt/efs/vitok``). Under it::

    data/<hash>/manifest.json          committed clip shards (+ attempts/<id>/ with the files)
    data/synthetic-<hash>/*.mp4        the rendered synthetic source
    latents/<key>/manifest.json        committed latents of one tokenizer
    studies/<name>/                    config, trials/<trial>/ (result, MLflow run id, Ray
                                       Train storage), tune/ (Tune state), report/

Every location is a string: an absolute local path or a URI. The filesystems are pyarrow's
(the ones Ray Train and Ray Data use themselves); S3 endpoints and credentials come from the
usual environment (``AWS_ENDPOINT_URL``, an instance role, ...) or, for the endpoint, from
the URI's query as Ray's docs show for MinIO and Ceph
(``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http``): ``join`` puts path parts
before the query, so every location under such a root carries it. Writes of one object are
atomic (local: write a temporary file then rename; object stores: one PUT), so a folder is
committed by writing its manifest last and readers trust only what a manifest lists.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_VAR = "VITOK_STORAGE"
DEFAULT_ROOT = "./results"
SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


@dataclass(frozen=True)
class StorageConfig:
    """Where state lives. ``root=""`` means ``$VITOK_STORAGE``, else ``./results``."""

    root: str = ""

    def __post_init__(self) -> None:
        scheme = urlsplit(self.root).scheme if "://" in self.root else ""
        if scheme and scheme not in SCHEMES:
            raise ValueError(
                f"storage.root={self.root!r}: scheme {scheme!r} is not one of {list(SCHEMES)} "
                "(or give a local folder / shared mount path)"
            )

    @property
    def uri(self) -> str:
        """The absolute root (a local path or a URI); resolve on the driver, ship the result."""
        return resolve_root(self.root)


def resolve_root(root: str | None = None) -> str:
    """``root``, else ``$VITOK_STORAGE``, else ``./results``; a local path made absolute."""
    root = root or os.environ.get(ENV_VAR) or DEFAULT_ROOT
    if root.startswith("file://"):
        root = root[len("file://") :]
    if is_local(root):
        return str(Path(root).expanduser().resolve())
    path, query = _split_query(root)
    return path.rstrip("/") + query


def is_local(uri: str) -> bool:
    return "://" not in uri


def _split_query(uri: str) -> tuple[str, str]:
    """``("s3://b/x", "?endpoint_override=...")`` from a URI; a local path has no query."""
    if is_local(uri):
        return uri, ""
    path, sep, query = uri.partition("?")
    return path, sep + query


def join(uri: str, *parts: str) -> str:
    """``uri``/``parts``; a URI's query (``?endpoint_override=...``) stays at the end."""
    out, query = _split_query(uri)
    out = out.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out + query


def name(uri: str) -> str:
    """The last path part (a URI's query is not part of it)."""
    return _split_query(uri)[0].rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=16)
def _remote_fs(scheme: str, netloc: str, query: str) -> Any:
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(f"{scheme}://{netloc}/{'?' + query if query else ''}")
    return fs


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a location."""
    import pyarrow.fs

    if is_local(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    fs = _remote_fs(parts.scheme, parts.netloc, parts.query)
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def is_file(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically: readers see the old content or the new, never a part."""
    if is_local(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as fh:  # one PUT: visible whole or not at all
        fh.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, data: Any) -> None:
    write_text(uri, json.dumps(data, indent=1, default=str))


def listdir(uri: str) -> list[str]:
    """Names directly under a folder (empty when it does not exist)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(info.base_name for info in fs.get_file_info(selector))


def list_files(uri: str, suffix: str = "") -> list[tuple[str, int]]:
    """Every file under a folder, recursively: (path relative to it, size in bytes)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type == pyarrow.fs.FileType.File and info.path.endswith(suffix):
            out.append((info.path[len(path) :].lstrip("/"), int(info.size)))
    return sorted(out)


def delete(uri: str) -> None:
    """Remove a file or a folder (missing is fine)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file or folder to ``uri`` (a folder's contents go under it)."""
    import pyarrow.fs

    local = Path(local)
    if is_local(uri):
        target = Path(uri)
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)
        return
    fs, path = filesystem(uri)
    if local.is_dir():
        pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
    else:
        write_bytes(uri, local.read_bytes())


def download(uri: str, local: str | Path) -> Path:
    """Copy a file or folder at ``uri`` to the local path ``local``."""
    import pyarrow.fs

    local = Path(local)
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(read_bytes(uri))
    else:
        local.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs)
    return local


def scratch_dir() -> Path:
    """This node's scratch folder for copies of remote files (never a place for results)."""
    base = os.environ.get("VITOK_SCRATCH") or os.path.join(tempfile.gettempdir(), "vitok-scratch")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_copy(uri: str) -> Path:
    """A local path holding what ``uri`` holds: itself when local, else a cached download.

    Remote objects are immutable here (checkpoints, committed shards, weight files), so a
    finished download is reused; an interrupted one is redone.
    """
    if is_local(uri):
        return Path(uri)
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = scratch_dir() / f"{key}-{name(uri)}"
    done = target.with_name(target.name + ".complete")
    if done.exists():
        return target
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    download(uri, tmp)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink()
    os.replace(tmp, target)
    done.write_text(uri)
    return target


@contextlib.contextmanager
def readable_file(uri: str) -> Iterator[Path]:
    """A local path to read ``uri`` from: itself when local, else a temporary download that is
    removed afterwards (for one-off reads of many files, such as decoding a dataset)."""
    if is_local(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        path = Path(tmp) / name(uri)
        path.write_bytes(read_bytes(uri))
        yield path


def attempt_id() -> str:
    """A unique name for one attempt at writing a committed folder, ordered by start time (to
    the nanosecond, so two attempts in the same second still sort by when they began)."""
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9))
    return f"{stamp}.{ns % 10**9:09d}-{uuid.uuid4().hex[:8]}"


__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "StorageConfig",
    "attempt_id",
    "delete",
    "download",
    "exists",
    "filesystem",
    "is_file",
    "is_local",
    "join",
    "list_files",
    "listdir",
    "local_copy",
    "read_bytes",
    "read_json",
    "read_text",
    "readable_file",
    "resolve_root",
    "upload",
    "write_bytes",
    "write_json",
    "write_text",
]
