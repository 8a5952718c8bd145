"""One worker loop for every stage: Ray Train's TorchTrainer + DeepSpeed, CPU or GPU.

``run_training`` fits a ``TrainJob`` (``config``: the ``Task`` protocol it trains, its
``TrainConfig``, batch function and evaluator) on Ray Train workers that run the loop of
``train_loop``, where a resumed run ends as an uninterrupted one would. This module is the
package's front door: it also re-exports the public names of ``config``, ``engines`` and
``checkpoints``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitok.platform import storage
from vitok.platform.config import parse_resources
from vitok.platform.tracking.runs import RunLogger, resolve_uri
from vitok.platform.training.checkpoints import (
    CheckpointWeights,
    load_checkpoint_state,
    load_model_state,
    load_task_state,
)
from vitok.platform.training.config import (
    BatchFn,
    Evaluator,
    Task,
    TrainConfig,
    TrainJob,
    TrainResult,
    deepspeed_config,
    lr_multiplier,
)
from vitok.platform.training.engines import (
    OptimizerPart,
    build_engines,
    make_optimizer,
    named_losses,
    optimizer_parts,
)


# ----------------------------------------------------------------------------- driver
def run_training(
    job: TrainJob,
    datasets: Mapping[str, Any],
    *,
    storage_path: str | Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Fit ``job`` with a TorchTrainer; rerunning with the same name and storage resumes.

    ``storage_path`` is a folder or URI under the storage root that every node reaches (the
    checkpoints live there). ``datasets``: "train" and optionally "val" splits
    (``shard_reader.ShardSplit`` or ``ArraySplit``); each worker reads its own share of them
    (``train_data.WorkerData``). The caller owns the MLflow run (``job.run_id``): it
    creates and ends it and sets its tags (the workers' rank 0 logs the steps to it);
    ``callbacks`` are Ray Train callbacks (a Tune trial passes one that forwards reports).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vitok.platform.training.train_data import check_splits
    from vitok.platform.training.train_loop import train_loop_per_worker

    cfg = job.train
    check_splits(datasets)
    if job.tracking is not None:  # workers run in another directory: ship an absolute URI
        tracking = dataclasses.replace(job.tracking, uri=resolve_uri(job.tracking.uri))
        job = dataclasses.replace(job, tracking=tracking)
    location = storage.resolve_root(str(storage_path))
    run_dir = storage.join(location, job.name)  # Ray Train's storage for this job
    if "val" not in datasets and job.make_evaluator is not None:
        raise ValueError(f"{job.name}: an evaluator needs a 'val' dataset")
    resources = {"CPU": cfg.cpus_per_worker, **parse_resources("train.resources", cfg.resources)}
    if cfg.use_gpu:
        resources["GPU"] = 1
    # The controller polls its workers this often (Ray's default: 2 s), so each poll it
    # waits for (a finished worker, a reported checkpoint) costs a short run up to that long.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"job": job, "run_dir": run_dir, "splits": dict(datasets)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=location,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks or []),
        ),
    )
    result = trainer.fit()
    ckpt = None
    if result.checkpoint is not None:  # as a location under storage (a URI when remote)
        ckpt = storage.join(run_dir, storage.name(result.checkpoint.path))
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return TrainResult(checkpoint_dir=ckpt, metrics=metrics, storage_dir=run_dir, run_id=job.run_id)


def run_recorded_training(
    logger: RunLogger | None,
    job: TrainJob,
    datasets: Mapping[str, Any],
    *,
    storage_path: str | Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """``run_training``, recorded on the caller's run through its logger (which stays open):
    the DeepSpeed config before, the ``checkpoint`` and ``ray_storage`` tags after."""
    if logger:
        logger.log_dict(deepspeed_config(job.train), "deepspeed_config.json")
    result = run_training(job, datasets, storage_path=storage_path, callbacks=callbacks)
    if logger and result.checkpoint_dir:
        logger.set_tags({"checkpoint": result.checkpoint_dir, "ray_storage": result.storage_dir})
    return result


__all__ = [
    "BatchFn",
    "CheckpointWeights",
    "Evaluator",
    "OptimizerPart",
    "Task",
    "TrainConfig",
    "TrainJob",
    "TrainResult",
    "build_engines",
    "deepspeed_config",
    "load_checkpoint_state",
    "load_model_state",
    "load_task_state",
    "lr_multiplier",
    "make_optimizer",
    "named_losses",
    "optimizer_parts",
    "run_recorded_training",
    "run_training",
]
