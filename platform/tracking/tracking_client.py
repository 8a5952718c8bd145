"""Talking to MLflow: the tracking URI, the client, which errors are final, and sending.

``send_records`` is the one place records (as ``RunLogger`` queues and spools them) become
MLflow client calls; ``is_permanent`` tells a refusal that retrying cannot fix from an
outage.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
PARAMS_PER_BATCH = 100

# MLflow error codes that retrying cannot fix: the record is reported and dropped from the
# queue (kept in the spool's failed.jsonl). Anything else (no connection, a timeout, 5xx,
# a locked SQLite file) is an outage: retried until the server takes it.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
    }
)


def resolve_uri(uri: str | None = None) -> str:
    """An absolute tracking URI (a relative sqlite path is anchored at the cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            uri = f"sqlite:///{(Path.cwd() / path).resolve()}"
    elif "://" not in uri:
        # A bare folder or file path: treat as a sqlite file inside/at it.
        path = Path(uri).resolve()
        uri = f"sqlite:///{path / 'mlflow.db' if path.is_dir() else path}"
    return uri


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (imported here: mlflow is slow to import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def is_permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in _PERMANENT_CODES
    if isinstance(err, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return True  # a spooled file that is gone: retrying cannot bring it back
    status = getattr(getattr(err, "response", None), "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def short_error(err: BaseException) -> str:
    """The gist of an error: MLflow wraps a refused connection in a paragraph."""
    text = " ".join(str(err).split())
    cause = re.search(r"\[Errno -?\d+\][^)'\"]*|Read timed out|timeout exception", text)
    if cause:
        return cause.group(0).strip().rstrip(".")
    return f"{type(err).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def send_records(
    mlflow: Any,
    records: list[dict[str, Any]],
    params_seen: dict[str, set[str]],
    local_path: Callable[[dict[str, Any]], Path],
) -> None:
    """Send consecutive records of one kind and run through the client ``mlflow`` (raises
    on any failure). ``params_seen`` holds, per run, the params it already has (params are
    immutable; a resumed run logs them again); ``local_path`` finds a spooled artifact."""
    from mlflow.entities import Metric, Param, RunTag

    kind, run = records[0]["kind"], records[0]["run"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for r in records for k, v, ts, step in r["items"]]
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            mlflow.log_batch(run, metrics=metrics[i : i + METRICS_PER_BATCH])
    elif kind == "params":
        seen = params_seen.get(run)
        if seen is None:
            seen = params_seen[run] = set(mlflow.get_run(run).data.params)
        items: dict[str, str] = {}
        for r in records:
            for k, v in r["items"]:
                if k not in seen and k not in items:
                    items[k] = v
        params = [Param(k, v) for k, v in items.items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            mlflow.log_batch(run, params=params[i : i + PARAMS_PER_BATCH])
        seen.update(items)
    elif kind == "tags":
        tags = [RunTag(k, v) for r in records for k, v in r["items"]]
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            mlflow.log_batch(run, tags=tags[i : i + PARAMS_PER_BATCH])
    elif kind == "artifact":
        (record,) = records
        path = Path(record["local"]) if "local" in record else local_path(record)
        if not path.exists():
            raise FileNotFoundError(f"artifact file gone: {path}")
        if path.is_dir():
            mlflow.log_artifacts(run, str(path), record.get("artifact_path"))
        else:
            mlflow.log_artifact(run, str(path), record.get("artifact_path"))
    elif kind == "terminate":
        (record,) = records
        mlflow.set_terminated(run, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown record kind {kind!r}")
