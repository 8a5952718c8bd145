"""MLflow tracking through one small module.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db``; it is always made absolute, because Ray workers run in
another directory. SQLite takes one writer at a time, so only the driver and rank 0 log.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitok.platform import storage
from vitok.platform.config import flatten_dict

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``uri=None`` means MLFLOW_TRACKING_URI or ./mlflow.db."""

    uri: str | None = None
    experiment: str = "vitok"
    enabled: bool = True
    system_metrics: bool = True

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("tracking.experiment='' must be a non-empty name")


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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        # A training experiment: MLflow 3 opens it on the runs table, not its GenAI views.
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    cfg: TrackingConfig,
    run_name: str,
    *,
    resume_file: str | Path | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Create a run, or reopen the one whose id ``resume_file`` holds (no duplicates).

    ``resume_file`` is a file under the storage root (a local path or a URI), so a rerun on
    any node finds the run. Returns the run id, or None when tracking is disabled.
    """
    if not cfg.enabled:
        return None
    uri = resolve_uri(cfg.uri)
    client = _client(uri)
    resume_file = str(resume_file) if resume_file is not None else None
    if resume_file is not None and storage.is_file(resume_file):
        run_id = storage.read_text(resume_file).strip()
        try:
            client.get_run(run_id)
        except Exception:
            run_id = ""
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
    exp_id = get_or_create_experiment(uri, cfg.experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    if resume_file is not None:
        storage.write_text(resume_file, run_id)
    return run_id


class RunLogger:
    """Logs to one existing run through the client API (safe from any process)."""

    def __init__(self, uri: str | None, run_id: str) -> None:
        self.uri = resolve_uri(uri)
        self.run_id = run_id
        self.client = _client(self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_dict(params)
        existing = self.client.get_run(self.run_id).data.params
        items = []
        for key, value in flat.items():
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            text = text[:MAX_PARAM_CHARS]
            if key in existing:  # params are immutable; a resumed run logs them again
                continue
            items.append(Param(key, text))
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def start_system_metrics(self):
        """Start MLflow's system-metrics sampler for this run (returns it, or None)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=5,
                samples_before_logging=1,
                resume_logging=True,
                tracking_uri=self.uri,
            )
            monitor.start()
            return monitor
        except Exception as err:  # psutil missing or an MLflow change: not worth a crash
            print(f"[vitok] system metrics off: {err}")
            return None
