"""MLflow tracking: where runs go, which run, and the logger that writes to it.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db``; it is always made absolute, because Ray workers run in
another directory. SQLite takes one writer at a time, so only the driver and rank 0 log.

``RunLogger`` (``run_logger``) is the one way runs are logged to. It keeps training going
when the tracking server is away: what it is given is queued in memory and spooled to the
node's scratch disk, sent in order by a background thread once the server answers again, and
whatever is still unsent at the end is reported by kind and kept (see ``tracking_spool``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitok.platform import storage
from vitok.platform.tracking.run_logger import RunLogger
from vitok.platform.tracking.tracking_client import mlflow_client, resolve_uri

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ERROR_TAG = "vitok.error"  # why a run owned by ``owned_run`` ended FAILED
ERROR_TAG_CHARS = 2000  # MLflow keeps tag values of up to 8000 characters

__all__ = [
    "ERROR_TAG",
    "RunLogger",
    "TrackingConfig",
    "error_text",
    "get_or_create_experiment",
    "log_pyfunc_model",
    "owned_run",
    "register_model",
    "resolve_uri",
    "start_run",
]


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``uri=None`` means MLFLOW_TRACKING_URI or ./mlflow.db."""

    uri: str | None = None
    experiment: str = "vitok"
    enabled: bool = True
    system_metrics: bool = True
    # A study registers its best tokenizer as a version of this MLflow model ("" = none).
    registered_model: str = "vitok-tokenizer"

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("tracking.experiment='' must be a non-empty name")


def get_or_create_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)
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
    any node finds the run; a reopened run loses the error tag of its failed attempt.
    Returns the run id, or None when tracking is disabled.
    """
    if not cfg.enabled:
        return None
    uri = resolve_uri(cfg.uri)
    client = mlflow_client(uri)
    resume_file = str(resume_file) if resume_file is not None else None
    if resume_file is not None and storage.is_file(resume_file):
        run_id = storage.read_text(resume_file).strip()
        try:
            earlier = client.get_run(run_id)
        except Exception:
            run_id = ""
        if run_id:
            client.update_run(run_id, status="RUNNING")
            if ERROR_TAG in earlier.data.tags:
                client.delete_tag(run_id, ERROR_TAG)
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


@contextmanager
def owned_run(
    cfg: TrackingConfig,
    run_name: str,
    *,
    resume_file: str | Path | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RunLogger | None]:
    """The one owner of a stage's run: creates (or resumes, see ``start_run``) the run and
    yields its logger (None when tracking is disabled); ends it FINISHED when the body
    returns and FAILED when it raises, with the error (``Type: message``) in the
    ``vitok.error`` tag. Workers log steps to the same run by its id."""
    run_id = start_run(
        cfg, run_name, resume_file=resume_file, parent_run_id=parent_run_id, tags=tags
    )
    logger = RunLogger(cfg.uri, run_id) if run_id else None
    try:
        yield logger
    except BaseException as err:
        if logger:
            logger.set_tags({ERROR_TAG: error_text(err)})
            logger.finish("FAILED")
        raise
    if logger:
        logger.finish("FINISHED")


def error_text(err: BaseException) -> str:
    """``Type: message`` of an exception, cut to what a tag holds."""
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text[:ERROR_TAG_CHARS]


def log_pyfunc_model(
    uri: str,
    run_id: str,
    name: str,
    python_model: Any,
    module: Any,
    config_yaml: str,
    pip_requirements: Sequence[str],
    *,
    signature: Any = None,
    input_example: Any = None,
) -> str:
    """Log ``module`` (an ``nn.Module``) as an MLflow pyfunc model ``name`` in ``run_id``:
    its state dict and config YAML as the artifacts ``weights`` and ``config`` that
    ``python_model`` (a ``PythonModel``, or the path of a models-from-code file) loads.
    Returns the model URI."""
    import mlflow
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{name}.pt"
        torch.save(module.state_dict(), weights)
        config = Path(tmp) / f"{name}.yaml"
        config.write_text(config_yaml)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                signature=signature,
                input_example=input_example,
                artifacts={"weights": str(weights), "config": str(config)},
                pip_requirements=list(pip_requirements),
            )
    return info.model_uri


def register_model(model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
    """Register a logged model as a new version of ``name``: ``models:/<name>/<version>``."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return f"models:/{name}/{version.version}"
