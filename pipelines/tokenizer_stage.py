"""The tokenizer stage: data -> Ray Train (stage 1, optional stage 2) -> metrics -> MLflow.

A recipe of calls: tokenizer/ provides the model and its task, platform/ the data, the
training loop, the metrics and the tracking; neither imports the other. The stage owns its
MLflow run: it creates (or resumes) it, logs the setup, the training and the results, and
ends it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vitok.pipelines.checkpoint_models import tokenizer_from_checkpoint
from vitok.pipelines.experiment import ExperimentConfig, dump_config
from vitok.pipelines.model_stats import tokenizer_params
from vitok.platform import storage
from vitok.platform.config import to_dict
from vitok.platform.data.clips import ClipBatch, clip_splits
from vitok.platform.data.prepare import PreparedData
from vitok.platform.metrics.artifacts import log_reconstructions
from vitok.platform.metrics.evaluate import MakeReconstructionEvaluator
from vitok.platform.tracking.runs import RunLogger, owned_run
from vitok.platform.training.train import (
    CheckpointWeights,
    TrainConfig,
    TrainJob,
    TrainResult,
    run_recorded_training,
)
from vitok.tokenizer.losses import build_lpips
from vitok.tokenizer.task import TokenizerTask, reconstruct

RECONSTRUCTION_EXAMPLES = 4  # val clips drawn over their reconstructions by the final evaluation
SWEEP_AXES = ("E", "log2_E", "L", "c", "p", "q", "encoder_params_M", "decoder_params_M", "gflops")


@dataclass
class TokenizerRun:
    run_id: str | None
    stage1: TrainResult
    stage2: TrainResult | None
    checkpoint_dir: str
    metrics: dict[str, float]
    params: dict[str, Any]

    @property
    def work_s(self) -> float:
        """Seconds in training steps and evaluation over both stages."""
        return self.stage1.work_s + (self.stage2.work_s if self.stage2 else 0.0)


def run_tokenizer(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    *,
    run_dir: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    log_model: bool = True,
    callbacks: list[Any] | None = None,
    on_finish: Callable[[TokenizerRun], Mapping[str, float]] | None = None,
) -> TokenizerRun:
    """Train one tokenizer (stage 1, then stage 2 if configured), logging one MLflow run.

    ``run_dir`` (default ``<storage root>/runs/<name>``) keeps the MLflow run id and the Ray
    Train storage, so rerunning the same call resumes into the same run from any node.
    ``on_finish(run)`` runs after the stage's own results are logged and before its run ends;
    the metrics it returns are logged on the run (a study trial runs its generator there and
    returns its time shares, so they land beside the tokenizer's curves); an error there ends
    the run FAILED, like any other.
    """
    name = run_name or cfg.name
    out_dir = run_dir or cfg.run_dir(name)
    params = {**tokenizer_params(cfg.tokenizer), "data_hash": prepared.config_hash}
    datasets = clip_splits(prepared)
    tags = {"vitok.kind": "tokenizer", "vitok.variant": cfg.tokenizer.variant}
    resume_file = storage.join(out_dir, "mlflow_run_id")
    with owned_run(
        cfg.tracking, name, resume_file=resume_file, parent_run_id=parent_run_id, tags=tags
    ) as logger:
        run_id = logger.run_id if logger else None
        if logger:
            _log_setup(logger, cfg, params, prepared)
        job = functools.partial(_job, cfg, name, run_id, params, bool(prepared.num_val))
        train = functools.partial(
            run_recorded_training,
            logger,
            datasets=datasets,
            storage_path=storage.join(out_dir, "ray"),
            callbacks=callbacks,
        )
        stage1 = train(job(1, cfg.train, None))
        stage2 = None
        if cfg.stage2 is not None:
            stage2 = train(job(2, cfg.stage2, CheckpointWeights(stage1.checkpoint_dir)))
        final = stage2 or stage1
        metrics = {k: v for k, v in final.metrics.items() if k.startswith("val/")}
        run = TokenizerRun(run_id, stage1, stage2, final.checkpoint_dir, metrics, params)
        if logger:
            _log_result(logger, cfg, prepared, run, log_model)
        extra = on_finish(run) if on_finish is not None else {}
        if logger and extra:
            logger.log_metrics(extra)
    return run


def _job(
    cfg: ExperimentConfig,
    name: str,
    run_id: str | None,
    params: dict[str, Any],
    evaluate: bool,
    stage: int,
    train: TrainConfig,
    init: CheckpointWeights | None,
) -> TrainJob:
    """The training job of stage 1 or 2 (stage 2 starts from stage 1's weights)."""
    make_eval = None
    if evaluate:
        make_lpips = functools.partial(build_lpips, cfg.loss)
        make_eval = MakeReconstructionEvaluator(
            cfg.metrics, reconstruct, make_lpips, examples=RECONSTRUCTION_EXAMPLES, fps=cfg.data.fps
        )
    return TrainJob(
        name=f"{name}-stage{stage}",
        task=TokenizerTask(cfg.tokenizer, cfg.loss, stage, init),
        train=train,
        batch_fn=ClipBatch(cfg.data.crop),
        make_evaluator=make_eval,
        tokens_per_sample=cfg.tokenizer.num_tokens,
        tracking=cfg.tracking,
        run_id=run_id,
        params=params,
        metric_prefix="" if stage == 1 else "stage2/",
        lr_frames=cfg.tokenizer.input_size[0],
    )


def _log_setup(
    logger: RunLogger, cfg: ExperimentConfig, params: dict[str, Any], prepared: PreparedData
) -> None:
    logger.log_params(params)
    logger.log_params({"config": to_dict(cfg)})
    logger.log_text(dump_config(cfg), "config.yaml")
    # The sweep axes as metrics too: MLflow's scatter and parallel-coordinates charts plot
    # metrics against metrics (x = axis/log2_E, y = final/psnr for the E sweep).
    axes = {f"axis/{k}": v for k, v in params.items() if k in SWEEP_AXES}
    data = {
        "data/train_clips": prepared.num_train,
        "data/val_clips": prepared.num_val,
        "data/rejects": prepared.num_rejects,
    }
    logger.log_metrics({**axes, **data})


def _log_result(
    logger: RunLogger,
    cfg: ExperimentConfig,
    prepared: PreparedData,
    run: TokenizerRun,
    log_model: bool,
) -> None:
    """The final metrics and (optionally) the model."""
    logger.log_metrics({f"final/{k[4:]}": v for k, v in run.metrics.items()})
    # The final evaluation drew the val clips over their reconstructions, in the worker;
    # without a val split none ran, so train clips are drawn here.
    if not prepared.num_val:
        tokenizer = tokenizer_from_checkpoint(run.checkpoint_dir, cfg.tokenizer)
        reconstructed = functools.partial(reconstruct, tokenizer)
        log_reconstructions(logger, reconstructed, prepared, cfg.data.crop, cfg.data.fps)
    if log_model:
        # Imported only here: it imports the model's code file, which names the model to
        # MLflow (set_model) as it loads; a run that logs no model needs none of that.
        from vitok.pipelines.model_registry import log_mlflow_model

        model_uri = log_mlflow_model(logger.uri, logger.run_id, run.checkpoint_dir, cfg.tokenizer)
        logger.set_tags({"tokenizer_model_uri": model_uri})
