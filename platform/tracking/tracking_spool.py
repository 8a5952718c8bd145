"""The on-disk side of ``RunLogger``: what has not reached MLflow yet survives the process.

Every record a logger could not send yet (metrics, params, tags, an artifact, the run's end)
is one JSON line in ``<scratch>/mlflow-spool/<host>-<pid>-<id>/records.jsonl``; artifact
files are copied under ``files/`` beside it; ``acked`` holds how many leading lines reached
the server. A line is appended and flushed before the call returns, so a killed process
loses nothing it was handed (only a machine crash can drop the page cache).

A spool whose process is gone (same host, pid dead or reused) is an orphan. The next
``RunLogger`` for the same tracking URI on the node claims it (an atomic rename into its
own folder), sends its records first, in their original order, and removes it. Others are
reported, and ``python -m vitok.platform.tracking replay`` sends every orphan now.

MLflow's HTTP client retries a failed request for minutes (urllib3, exponential backoff);
``fail_fast()`` turns that off for the calling thread only, so the logger's sender notices
an outage in a request timeout and does its own retrying, without changing MLflow's
behaviour for any other code in the process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitok.platform import storage

SPOOL_FOLDER = "mlflow-spool"
RECORDS = "records.jsonl"
ACKED = "acked"
FAILED = "failed.jsonl"
META = "meta.json"
CLAIMED = "claimed"  # orphans this spool took over, while their records are moved in
FILES = "files"

# What a report counts, per record kind (singular, plural), in report order.
KIND_NAMES = {
    "metrics": ("metric value", "metric values"),
    "params": ("param", "params"),
    "tags": ("tag", "tags"),
    "artifact": ("artifact", "artifacts"),
    "terminate": ("run status update", "run status updates"),
}


def spool_root() -> Path:
    return storage.scratch_dir() / SPOOL_FOLDER


def count_items(records: list[dict[str, Any]]) -> Counter:
    """Items by kind: metric values, params and tags one each, one per artifact or status."""
    counts: Counter = Counter()
    for r in records:
        counts[r["kind"]] += len(r["items"]) if "items" in r else 1
    return counts


def describe(counts: Counter) -> str:
    """``Counter({"metrics": 12, "artifact": 1})`` -> "12 metric values, 1 artifact"."""
    order = [*KIND_NAMES, *sorted(set(counts) - set(KIND_NAMES))]
    parts = []
    for kind in order:
        n = counts.get(kind, 0)
        if n:
            one, many = KIND_NAMES.get(kind, (kind, kind))
            parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts) or "nothing"


# ----------------------------------------------------------------------------- fail fast
_FAST = threading.local()
_HOOK_LOCK = threading.Lock()
_HOOKED = False


def _hook_mlflow_http_settings() -> bool:
    """Let ``fail_fast`` override MLflow's HTTP retry count and timeout for one thread.

    MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``
    through these objects on every request; wrapping their ``get`` keeps the environment,
    and every other thread, untouched. If MLflow ever changes this, requests just keep
    MLflow's own retries: slower to notice an outage, never blocking training (the sender
    is a background thread).
    """
    global _HOOKED
    with _HOOK_LOCK:
        if _HOOKED:
            return True
        try:
            from mlflow import environment_variables as ev

            variables = {
                "max_retries": ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                "timeout": ev.MLFLOW_HTTP_REQUEST_TIMEOUT,
            }
        except (ImportError, AttributeError):
            return False
        for name, var in variables.items():
            original = var.get

            def get(original=original, name=name):
                value = getattr(_FAST, name, None)
                return original() if value is None else value

            var.get = get
        _HOOKED = True
        return True


@contextlib.contextmanager
def fail_fast(timeout_s: float) -> Iterator[None]:
    """MLflow HTTP calls from this thread: no retries, ``timeout_s`` per connect/read."""
    _hook_mlflow_http_settings()
    before = (getattr(_FAST, "max_retries", None), getattr(_FAST, "timeout", None))
    _FAST.max_retries, _FAST.timeout = 0, max(1, math.ceil(timeout_s))
    try:
        yield
    finally:
        _FAST.max_retries, _FAST.timeout = before


# ----------------------------------------------------------------------------- liveness
def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or no psutil
        return None


def _alive(meta: dict[str, Any]) -> bool:
    """True when the spool's owner still runs (on another host: assume it does)."""
    if meta.get("host") != socket.gethostname():
        return True
    pid = int(meta.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    if started is None or meta.get("started") is None:
        return True
    return abs(started - float(meta["started"])) < 2.0  # else the pid was reused


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- one spool
class Spool:
    """One logger's folder of not-yet-sent records (created on first use)."""

    def __init__(self, root: Path, uri: str, run_id: str) -> None:
        self.root = Path(root)
        self.uri, self.run_id = uri, run_id
        self.path = self.root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._fh: Any = None
        self._acked = 0  # leading lines of records.jsonl the server has
        self._next_file = 0

    @property
    def created(self) -> bool:
        return self._fh is not None

    def _ensure(self) -> None:
        if self._fh is not None:
            return
        (self.path / FILES).mkdir(parents=True, exist_ok=True)
        meta = {
            "uri": self.uri,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "created": time.time(),
        }
        storage.write_json(str(self.path / META), meta)
        self._fh = open(self.path / RECORDS, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, record: dict[str, Any]) -> None:
        """One record, on disk (flushed to the OS) before this returns."""
        line = json.dumps(record, default=str)
        with self._lock:
            self._ensure()
            self._fh.write(line + "\n")
            self._fh.flush()

    def stash(self, src: Path | None = None, *, data: bytes | None = None, name: str = "") -> dict:
        """Copy a file or a folder's contents (or write ``data`` as file ``name``) under
        files/<n>/; returns the record fields that locate it (``unit``, ``name``: the file,
        or None for a folder whose contents go to MLflow)."""
        unit = self._new_unit()
        target = self.path / unit
        if data is not None:
            target.mkdir(parents=True)
            (target / name).write_bytes(data)
            return {"unit": unit, "name": name}
        assert src is not None
        if src.is_dir():
            shutil.copytree(src, target)  # log_artifacts sends the folder's contents
            return {"unit": unit, "name": None}
        target.mkdir(parents=True)
        shutil.copy2(src, target / src.name)
        return {"unit": unit, "name": src.name}

    def _new_unit(self) -> str:
        with self._lock:
            self._ensure()
            self._next_file += 1
            return f"{FILES}/{self._next_file:06d}"

    def local_path(self, record: dict[str, Any]) -> Path:
        """The file or folder an artifact record hands to MLflow."""
        unit = self.path / record["unit"]
        return unit / record["name"] if record.get("name") else unit

    def ack(self, count: int) -> None:
        """``count`` more leading records reached the server."""
        with self._lock:
            self._acked += count
            if self._fh is not None:
                storage.write_text(str(self.path / ACKED), str(self._acked))

    def fail(self, record: dict[str, Any], error: str) -> None:
        """A record the server refused for good (kept for the report, never retried)."""
        with self._lock:
            self._ensure()
            with open(self.path / FAILED, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"record": record, "error": error}, default=str) + "\n")

    def close(self, *, remove: bool) -> None:
        """Close the file; ``remove`` (only when nothing is pending) deletes the folder, and a
        later record starts a fresh one."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if remove:
                shutil.rmtree(self.path, ignore_errors=True)
                self._acked = 0

    # ------------------------------------------------------------------------- adoption
    def adopt(self, orphan: Path) -> list[dict[str, Any]]:
        """Take over an orphan spool: claim it (atomic rename), move its pending records and
        files into this spool, remove it. Returns the records, in order (a folder it had
        claimed itself comes first). Raises FileNotFoundError when another logger won."""
        self._ensure()
        claimed = self.path / CLAIMED / orphan.name
        claimed.parent.mkdir(exist_ok=True)
        os.rename(orphan, claimed)
        out = []
        for record in pending_records(claimed):
            if record["kind"] == "artifact":
                unit = self._new_unit()
                with contextlib.suppress(FileNotFoundError):  # then it fails, reported
                    os.rename(claimed / record["unit"], self.path / unit)
                record = {**record, "unit": unit}
            self.append(record)
            out.append(record)
        for failed in _failed_lines(claimed):
            with open(self.path / FAILED, "a", encoding="utf-8") as fh:
                fh.write(failed + "\n")
        shutil.rmtree(claimed, ignore_errors=True)
        return out


def _read_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill: never handed over complete
            continue
    return out


def _failed_lines(folder: Path) -> list[str]:
    try:
        return [ln for ln in (folder / FAILED).read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def pending_records(folder: Path) -> list[dict[str, Any]]:
    """Records of a spool folder not yet acknowledged, in order (nested claims first)."""
    out: list[dict[str, Any]] = []
    claimed = folder / CLAIMED
    if claimed.is_dir():
        for sub in sorted(claimed.iterdir()):
            for record in pending_records(sub):
                if record["kind"] == "artifact":
                    record = {**record, "unit": f"{CLAIMED}/{sub.name}/{record['unit']}"}
                out.append(record)
    try:
        acked = int((folder / ACKED).read_text().strip() or 0)
    except (OSError, ValueError):
        acked = 0
    out += _read_lines(folder / RECORDS)[acked:]
    return out


def orphans(root: Path | None = None, *, exclude: Path | None = None) -> list[Path]:
    """Spool folders on this host whose process is gone and that still hold records."""
    root = Path(root) if root is not None else spool_root()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder == exclude:
            continue
        meta = read_meta(folder)
        if meta is None:
            # a spool killed before its meta was written holds no records; clear it once old
            if time.time() - folder.stat().st_mtime > 3600:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        if _alive(meta):
            continue
        if not pending_records(folder):
            if not _failed_lines(folder):  # everything was sent: a leftover folder
                shutil.rmtree(folder, ignore_errors=True)
            continue
        found.append(folder)
    return found


_REPORTED_ORPHANS: set[str] = set()  # other servers' orphans this process warned about


def adopt_orphans(spool: Spool, uri: str) -> list[dict[str, Any]]:
    """The records dead processes left on this node for the tracking server ``uri``: moved
    into ``spool`` and returned, to go out first. Orphans for other servers stay where
    they are, with one warning each per process."""
    try:
        found = orphans(spool.root, exclude=spool.path)
    except OSError:
        return []
    adopted: list[dict[str, Any]] = []
    for folder in found:
        meta = read_meta(folder) or {}
        if meta.get("uri") != uri:
            if str(folder) not in _REPORTED_ORPHANS:
                _REPORTED_ORPHANS.add(str(folder))
                print(
                    f"[vitok.tracking] WARNING: {describe(count_items(pending_records(folder)))} "
                    f"for run {meta.get('run_id')} at {meta.get('uri')} were never sent "
                    f"(process {meta.get('pid')} ended); kept at {folder}. A logger for that "
                    "server on this node sends them, or now: python -m "
                    f"vitok.platform.tracking replay {folder}",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        try:
            records = spool.adopt(folder)
        except OSError:  # another logger claimed it first
            continue
        runs = ", ".join(sorted({r["run"] for r in records}))
        print(
            f"[vitok.tracking] {describe(count_items(records))} for run {runs} were left "
            f"unsent by process {meta.get('pid')} ({folder}): sending them first",
            file=sys.stderr,
            flush=True,
        )
        adopted += records
    return adopted
