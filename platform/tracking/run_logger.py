"""``RunLogger``: logs to one MLflow run and keeps training going when the server is away.

What it is given is queued in memory and spooled to the node's scratch disk
(``tracking_spool``), sent in order by a background thread once the server answers again
(``tracking_client.send_records``), and whatever is still unsent at the end is reported by
kind and kept. Import it from ``vitok.platform.tracking.runs``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitok.platform.config import flatten_dict
from vitok.platform.tracking import tracking_spool
from vitok.platform.tracking.system_metrics import SystemSampler, start_system_sampler
from vitok.platform.tracking.tracking_client import (
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    is_permanent,
    mlflow_client,
    resolve_uri,
    send_records,
    short_error,
)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
FLUSH_TIMEOUT_ENV = "VITOK_MLFLOW_FLUSH_TIMEOUT_S"
DEFAULT_FLUSH_TIMEOUT_S = 60.0  # finish()/close() wait at most this long for the server
REQUEST_TIMEOUT_S = 10.0  # one MLflow HTTP request (connect or read), no MLflow retries
MAX_BACKOFF_S = 30.0  # between retries while the server is away

_DOWN: dict[str, float] = {}  # tracking URI -> when this process saw it fail
_DOWN_LOCK = threading.Lock()
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _say(message: str) -> None:
    """One line to stderr at once (a warning is read while training goes on)."""
    print(message, file=sys.stderr, flush=True)


class RunLogger:
    """Logs to one existing run through the client API, and survives the server going away.

    Every call returns at once with an HTTP tracking server: records are queued in memory
    and appended to a spool on the node's scratch disk (``tracking_spool``), and a
    background thread sends them in order, retrying with backoff while the server is
    unreachable. Metrics keep the step and timestamp of the call, and MLflow drops exact
    duplicates, so a resend never logs a point twice. One warning is printed when the
    server first fails and one when it is back. ``finish()`` (or ``close()``) waits at most
    ``flush_timeout_s`` (default ``$VITOK_MLFLOW_FLUSH_TIMEOUT_S`` or 60 s) and then says
    what could not be logged, by kind, and where it is kept; the next logger for that
    server on the node sends it (or ``python -m vitok.platform.tracking replay``).

    With a SQLite (file) store, calls are sent at once in the caller's thread as before, and
    fall back to the queue only when one fails. ``background`` forces either mode.
    """

    def __init__(
        self,
        uri: str | None,
        run_id: str,
        *,
        background: bool | None = None,
        spool_dir: str | Path | None = None,
        flush_timeout_s: float | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.uri = resolve_uri(uri)
        self.run_id = run_id
        self.client = mlflow_client(self.uri)
        remote = self.uri.startswith(("http://", "https://"))
        self.background = remote if background is None else background
        if flush_timeout_s is None:
            flush_timeout_s = float(os.environ.get(FLUSH_TIMEOUT_ENV, DEFAULT_FLUSH_TIMEOUT_S))
        self.flush_timeout_s = flush_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_backoff_s = max_backoff_s
        root = Path(spool_dir) if spool_dir is not None else tracking_spool.spool_root()
        self.spool = tracking_spool.Spool(root, self.uri, run_id)
        self._queue: deque[dict[str, Any]] = deque()  # == the spool's unacked records
        self._spool_ok = True
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._flushing = 0
        self._stop = False
        self._closed = False
        self._failed: list[dict[str, Any]] = []
        self._params_seen: dict[str, set[str]] = {}
        self._adopt_orphans()
        _OPEN.add(self)

    # ------------------------------------------------------------------------- public API
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = []
        for key, value in flatten_dict(params).items():
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            items.append([key, text[:MAX_PARAM_CHARS]])
        if items:
            self._submit({"kind": "params", "run": self.run_id, "items": items})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)  # the call's time, kept through any resend
        items = [
            [k, float(v), now, int(step or 0)]
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        if items:
            self._submit({"kind": "metrics", "run": self.run_id, "items": items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [[k, str(v)] for k, v in tags.items()]
        if items:
            self._submit({"kind": "tags", "run": self.run_id, "items": items})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under ``artifact_path``; the file is copied to
        the spool before this returns, so the caller may delete it at once."""
        path = Path(path)
        record = {
            "kind": "artifact",
            "run": self.run_id,
            "artifact_path": artifact_path,
            "local": str(path),
        }
        self._submit(record, stash=lambda: self.spool.stash(path))

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.log_bytes(text.encode("utf-8"), artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """JSON, or YAML for a ``.yaml``/``.yml`` name (as ``MlflowClient.log_dict``)."""
        text = json.dumps(dict(data), indent=2, default=str)
        if Path(artifact_file).suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(json.loads(text), indent=2, default_flow_style=False)
        self.log_text(text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        buffer = io.BytesIO()
        fmt = Path(artifact_file).suffix.lstrip(".") or "png"
        figure.savefig(buffer, format=fmt)
        self.log_bytes(buffer.getvalue(), artifact_file)

    def finish(self, status: str = "FINISHED") -> dict[str, Any]:
        """Mark the run ended (queued like the rest), then ``close()``."""
        end = int(time.time() * 1000)
        self._submit({"kind": "terminate", "run": self.run_id, "status": status, "end_time": end})
        return self.close()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued reached the server (True) or ``timeout_s`` passed."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cv:
            if self._queue:
                self._start_sender()
            self._flushing += 1
            self._cv.notify_all()
            try:
                while self._queue and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(timeout=min(0.5, left))
            finally:
                self._flushing -= 1
            return not self._queue

    def close(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Flush (bounded), stop the sender, and report what could not be logged.

        Returns ``{"pending": Counter, "failed": Counter, "spool": path or None}``: items
        by kind still unsent (kept in the spool) and refused by the server for good.
        """
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        self.flush(timeout_s)
        with self._cv:
            self._stop = True
            self._closed = True
            self._cv.notify_all()
            pending = tracking_spool.count_items(list(self._queue))
            failed = tracking_spool.count_items(self._failed)
        keep = bool(pending or failed)
        self.spool.close(remove=not keep)
        spool = str(self.spool.path) if keep else None
        if pending:
            _say(
                f"[vitok.tracking] WARNING: run {self.run_id}: could not log "
                f"{tracking_spool.describe(pending)} to {self.uri} within {timeout_s:.0f} s. "
                f"They are kept at {spool} and are sent by the next vitok logger for this "
                "tracking server on this node, or now with: python -m "
                f"vitok.platform.tracking replay {spool}",
            )
        if failed:
            _say(
                f"[vitok.tracking] WARNING: run {self.run_id}: MLflow refused "
                f"{tracking_spool.describe(failed)} (errors in {spool}/failed.jsonl)",
            )
        return {"pending": pending, "failed": failed, "spool": spool}

    def pending(self) -> Counter:
        """Items by kind queued and not yet acknowledged by the server."""
        with self._cv:
            return tracking_spool.count_items(list(self._queue))

    def start_system_metrics(self, interval_s: float = 5.0) -> SystemSampler | None:
        """Sample CPU/memory/disk/network (and GPU) every ``interval_s`` into ``system/``
        metrics through this logger, so an outage queues them too. Returns the sampler
        (call ``.finish()``) or None when MLflow's collectors are unavailable."""
        return start_system_sampler(self, interval_s)

    # ------------------------------------------------------------------------- queueing
    def _submit(self, record: dict[str, Any], stash: Any = None) -> None:
        if self._closed:  # logged after close: a later close() flushes it
            with self._cv:
                self._closed = self._stop = False
        if not self.background:
            with self._cv:
                idle = not self._queue
            if idle:  # nothing waiting: send now, in order, as a plain client call would
                try:
                    with tracking_spool.fail_fast(self.request_timeout_s):
                        self._deliver([record])
                    self._came_back()
                    return
                except Exception as err:  # noqa: BLE001 - never let logging stop training
                    if is_permanent(err):
                        self._refused(record, err)
                        return
                    self._went_down(err)
        if stash is not None:
            try:
                located = stash()
                record = {k: v for k, v in record.items() if k != "local"} | located
            except OSError as err:  # no room to copy it: send it from where it is
                self._spool_failed(err)
        try:
            self.spool.append(record)
        except OSError as err:  # a full or read-only scratch disk: keep it in memory
            self._spool_failed(err)
        with self._cv:
            self._queue.append(record)
            self._start_sender()
            self._cv.notify_all()

    def _start_sender(self) -> None:  # with self._cv held
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(
                target=self._send_loop, name=f"vitok-mlflow-{self.run_id[:8]}", daemon=True
            )
            self._thread.start()

    def _send_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = self._next_batch()
            try:
                with tracking_spool.fail_fast(self.request_timeout_s):
                    done = self._deliver_batch(batch)
            except Exception as err:  # noqa: BLE001 - an outage: wait, then try again
                self._went_down(err)
                if not self._backoff(backoff):
                    return
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            backoff = 0.5
            self._came_back()
            self._ack(done)

    def _backoff(self, seconds: float) -> bool:
        """Sleep ``seconds`` (at most 1 s while someone waits in flush); False when stopped."""
        start = time.monotonic()
        with self._cv:
            while not self._stop:
                limit = min(seconds, 1.0) if self._flushing else seconds
                left = start + limit - time.monotonic()
                if left <= 0:
                    return True
                self._cv.wait(timeout=min(left, 0.5))
            return False

    def _next_batch(self) -> list[dict[str, Any]]:  # with self._cv held
        """Leading records that go in one request: same kind and run, within MLflow limits."""
        first = self._queue[0]
        if first["kind"] not in ("metrics", "params", "tags"):
            return [first]
        limit = METRICS_PER_BATCH if first["kind"] == "metrics" else PARAMS_PER_BATCH
        batch, size = [], 0
        for record in self._queue:
            if record["kind"] != first["kind"] or record["run"] != first["run"]:
                break
            n = len(record["items"])
            if batch and size + n > limit:
                break
            batch.append(record)
            size += n
        return batch

    def _deliver_batch(self, batch: list[dict[str, Any]]) -> int:
        """Send ``batch``; returns how many records were consumed. A record the server
        refuses for good is set aside; an outage raises."""
        try:
            self._deliver(batch)
            return len(batch)
        except Exception as err:
            if not is_permanent(err):
                raise
            if len(batch) == 1:
                self._refused(batch[0], err)
                return 1
        for i, record in enumerate(batch):  # find the refused ones; stop at an outage
            try:
                self._deliver([record])
            except Exception as err:
                if not is_permanent(err):
                    if i:
                        return i
                    raise
                self._refused(record, err)
        return len(batch)

    def _ack(self, n: int) -> None:
        with self._cv:
            for _ in range(n):
                self._queue.popleft()
            with contextlib.suppress(OSError):
                self.spool.ack(n)
            self._cv.notify_all()

    def _refused(self, record: dict[str, Any], err: BaseException) -> None:
        self._failed.append(record)
        self.spool.fail(record, short_error(err))
        what = tracking_spool.describe(tracking_spool.count_items([record]))
        _say(
            f"[vitok.tracking] WARNING: MLflow refused {what} for run {record['run']}: "
            f"{short_error(err)}",
        )

    def _spool_failed(self, err: BaseException) -> None:
        if self._spool_ok:
            self._spool_ok = False
            _say(
                f"[vitok.tracking] WARNING: cannot write the spool {self.spool.path} "
                f"({short_error(err)}); queued records are kept in memory only",
            )

    def _went_down(self, err: BaseException) -> None:
        with _DOWN_LOCK:
            if self.uri in _DOWN:
                return
            _DOWN[self.uri] = time.monotonic()
        _say(
            f"[vitok.tracking] WARNING: MLflow at {self.uri} is unreachable ({short_error(err)}). "
            "Training goes on: metrics, params, tags and artifacts are queued in memory and "
            f"under {self.spool.root}, retried in the background and sent in order when it "
            "is back.",
        )

    def _came_back(self) -> None:
        with _DOWN_LOCK:
            since = _DOWN.pop(self.uri, None)
        if since is not None:
            _say(
                f"[vitok.tracking] MLflow at {self.uri} is back after "
                f"{time.monotonic() - since:.0f} s; sending what was queued "
                f"({tracking_spool.describe(self.pending())})",
            )

    def _adopt_orphans(self) -> None:
        """Records a dead process left for this server on this node go out first."""
        records = tracking_spool.adopt_orphans(self.spool, self.uri)
        if records:
            with self._cv:
                self._queue.extend(records)
                self._start_sender()

    def _deliver(self, records: list[dict[str, Any]]) -> None:
        """Send consecutive records of one kind and run (raises on any failure)."""
        send_records(self.client, records, self._params_seen, self.spool.local_path)


@atexit.register
def _close_open_loggers() -> None:
    """A logger its owner never closed still gets a short chance to send what is queued."""
    for logger in list(_OPEN):
        if not logger._closed:
            with contextlib.suppress(Exception):
                logger.close(timeout_s=min(10.0, logger.flush_timeout_s))
