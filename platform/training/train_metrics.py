"""What the worker loop (``vitok.platform.training.train_loop``) logs: the ``MetricWindow`` (means
over a logging window, saved with each checkpoint) and ``StepLogger`` (rank 0's MLflow
logging, each step once across restarts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitok.platform import storage
from vitok.platform.tracking.runs import RunLogger
from vitok.platform.training.config import TrainJob

LOG_MARK_FILE = "vitok_logged.json"


class MetricWindow:
    """Means of the per-step logs over one logging window. Its sums are part of the loop
    state, so a window a checkpoint cut in two averages what an uninterrupted one would."""

    def __init__(self, saved: Mapping[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict((saved or {}).get("sums", {}))
        self.count = int((saved or {}).get("count", 0))

    def add(self, logs: Mapping[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def close(self) -> dict[str, float]:
        """``train/<key>`` means over the window; the window starts again empty."""
        means = {f"train/{k}": v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class StepLogger:
    """Rank 0's MLflow logging of one job, each (step, key) once across restarts:
    ``mark_uri`` holds ``{"run_id", "step", "keys"}``, the last step handed to the logger
    (which spools it to disk at once) and its keys; a restarted worker skips what it covers."""

    def __init__(self, job: TrainJob, mark_uri: str | None) -> None:
        self.inner = RunLogger(job.tracking.uri, job.run_id)
        self.prefix, self.run_id, self.mark_uri = job.metric_prefix, job.run_id, mark_uri
        self.mark: dict[str, Any] = {"run_id": job.run_id, "step": -1, "keys": []}
        if mark_uri and storage.is_file(mark_uri):
            saved = storage.read_json(mark_uri)
            if saved.get("run_id") == job.run_id:  # a new MLflow run starts its own curves
                self.mark = saved
        self.resumed = dict(self.mark)

    def logged(self, keys: list[str], step: int) -> bool:
        """Whether a previous attempt of this job already logged ``keys`` at ``step``."""
        done = self.resumed
        return step < done["step"] or (step == done["step"] and set(keys) <= set(done["keys"]))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        keys = [self.prefix + k for k in metrics]
        if not keys or self.logged(keys, step):
            return
        self.inner.log_metrics(dict(zip(keys, metrics.values())), step=step)
        same = step == self.mark["step"]
        self.mark = {
            "run_id": self.run_id,
            "step": step,
            "keys": sorted(set(keys) | (set(self.mark["keys"]) if same else set())),
        }
        if self.mark_uri:
            storage.write_json(self.mark_uri, self.mark)

    def close(self) -> None:
        self.inner.close()
