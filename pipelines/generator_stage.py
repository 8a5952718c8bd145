"""The generator stage: frozen tokenizer -> latents -> DiT training -> generation eval.

1. Latent extraction (Ray Data, actor pool): the frozen tokenizer encodes the centre-cropped
   train and val clips (posterior mean) into Parquet; per-channel statistics of the training
   latents normalise the generator's inputs (``vitok.platform.data.latents``).
2. The DiT trains through the platform's Ray Train + DeepSpeed loop (``GeneratorTask``),
   with the validation diffusion loss as its evaluation.
3. Generation eval (``vitok.pipelines.generation_eval``): ``metrics.gen_samples`` samples
   from the EMA weights, their Frechet distances, and a preview grid (and mp4 for video).

One MLflow run per generator, tagged with its tokenizer (and nested under a parent run); the
stage owns it from creation to its end.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitok.generator.dit import DiT
from vitok.generator.task import DiffusionLoss, GeneratorTask
from vitok.pipelines.checkpoint_models import TokenizerEncoder
from vitok.pipelines.experiment import ExperimentConfig, dump_config
from vitok.pipelines.generation_eval import GenerationSections, evaluate_generation
from vitok.platform import storage
from vitok.platform.config import to_dict
from vitok.platform.data.latents import LatentBatch, LatentSet, extract_latents, keyed_dir
from vitok.platform.data.prepare import PreparedData, clip_datasets
from vitok.platform.metrics.evaluate import MakeMeanEvaluator
from vitok.platform.tracking.runs import RunLogger, owned_run
from vitok.platform.training.train import TrainConfig, TrainJob, TrainResult, run_recorded_training
from vitok.tokenizer.config import TokenizerConfig


@dataclass
class GeneratorRun:
    run_id: str | None
    checkpoint_dir: str
    metrics: dict[str, float]
    train: TrainResult
    latents: LatentSet
    params: dict[str, Any]
    eval_s: float = 0.0  # the generation metrics' sampling and features

    @property
    def work_s(self) -> float:
        return self.train.work_s + self.eval_s


def run_generator(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    tokenizer_checkpoint: str | Path,
    *,
    run_dir: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tokenizer_run_id: str | None = None,
) -> GeneratorRun:
    """Train and evaluate one generator on a frozen tokenizer, logging one MLflow run.

    ``cfg.generator_train`` must be set. ``run_dir`` (default ``<storage root>/runs/<name>``)
    keeps the MLflow run id, the latents and the Ray Train storage: rerunning with the same
    name resumes the training and reuses the latents. ``metrics`` holds
    ``val/diffusion_loss`` and the generation metrics (``frechet_tokenizer_latent`` ...;
    ``gfid`` / ``gfvd`` with weight files).
    """
    train = _check(cfg, prepared)
    tokenizer_checkpoint = storage.resolve_root(str(tokenizer_checkpoint))
    name = run_name or f"{cfg.name}-generator"
    out_dir = run_dir or cfg.run_dir(name)
    tags = {
        "vitok.kind": "generator",
        "vitok.variant": cfg.tokenizer.variant,
        "vitok.tokenizer_checkpoint": tokenizer_checkpoint,
    }
    if tokenizer_run_id:
        tags["vitok.tokenizer_run_id"] = tokenizer_run_id
    resume_file = storage.join(out_dir, "mlflow_run_id")
    with owned_run(
        cfg.tracking, name, resume_file=resume_file, parent_run_id=parent_run_id, tags=tags
    ) as logger:
        latent_dir = storage.join(out_dir, "latents")
        latent_set = latents_for(
            prepared, tokenizer_checkpoint, cfg.tokenizer, cfg.data.crop, latent_dir, train
        )
        params = generator_params(cfg, prepared, latent_set, tokenizer_checkpoint)
        if logger:
            _log_setup(logger, cfg, params, latent_set)
        datasets = {split: latent_set.split(split) for split in latent_set.splits}
        job = TrainJob(
            name=name,
            task=GeneratorTask(cfg.generator, latent_set.latent_shape[-1]),
            train=train,
            batch_fn=LatentBatch(latent_set.stats),
            make_evaluator=MakeMeanEvaluator(DiffusionLoss(cfg.generator))
            if "val" in datasets
            else None,
            columns=("latent", "label"),
            tokens_per_sample=params["L"],
            tracking=cfg.tracking,
            run_id=logger.run_id if logger else None,
            params=params,
        )
        storage_path = storage.join(out_dir, "ray")
        result = run_recorded_training(logger, job, datasets, storage_path=storage_path)
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
        eval_started = time.perf_counter()
        sections = GenerationSections(cfg.generator, cfg.tokenizer, cfg.metrics, train, cfg.data)
        ckpt = result.checkpoint_dir
        metrics.update(
            evaluate_generation(
                sections, prepared, ckpt, tokenizer_checkpoint, latent_set, logger=logger
            )
        )
        eval_s = time.perf_counter() - eval_started
        if logger:
            logger.log_metrics({f"final/{k.split('/', 1)[-1]}": v for k, v in metrics.items()})
    return GeneratorRun(job.run_id, ckpt, metrics, result, latent_set, params, eval_s=eval_s)


def _check(cfg: ExperimentConfig, prepared: PreparedData) -> TrainConfig:
    """The generator's training config, once the data's labels fit its classes."""
    if cfg.generator_train is None:
        raise ValueError("generator_train=None: set generator_train.* to train a generator")
    num_labels = len(prepared.label_map)
    if num_labels > cfg.generator.num_classes:
        raise ValueError(
            f"generator.num_classes={cfg.generator.num_classes} is smaller than the data's "
            f"{num_labels} labels {sorted(prepared.label_map)}"
        )
    return cfg.generator_train


def latents_for(
    prepared: PreparedData,
    tokenizer_checkpoint: str,
    model: TokenizerConfig,
    crop: tuple[int, int] | None,
    out_root: str,
    train: TrainConfig,
) -> LatentSet:
    """Latents of the prepared clips under ``out_root`` (storage), keyed by tokenizer
    checkpoint, config and data hash."""
    key_src = {
        "checkpoint": tokenizer_checkpoint,
        "tokenizer": to_dict(model),
        "crop": list(crop) if crop else None,
        "data": prepared.config_hash,
    }
    return extract_latents(
        clip_datasets(prepared),
        TokenizerEncoder(tokenizer_checkpoint, model, crop),
        keyed_dir(out_root, key_src),
        batch_size=train.batch_size,
        num_cpus=train.cpus_per_worker,
        num_gpus=1.0 if train.use_gpu else 0.0,
        info=key_src,
    )


def generator_params(
    cfg: ExperimentConfig, prepared: PreparedData, latent_set: LatentSet, tokenizer_checkpoint: str
) -> dict[str, Any]:
    """What a generator run logs: its size and parameters, the latent grid (L, c, E) and
    where its tokenizer, data and latents are."""
    latent_shape = latent_set.latent_shape  # (t, h, w, c)
    channels = latent_shape[-1]
    dit_params = sum(p.numel() for p in DiT(cfg.generator, channels).parameters())
    return {
        "generator_size": cfg.generator.size,
        "generator_params_M": dit_params / 1e6,
        "latent_shape": list(latent_shape),
        "L": int(np.prod(latent_shape[:-1])),
        "c": channels,
        "E": int(np.prod(latent_shape)),
        "tokenizer_variant": cfg.tokenizer.variant,
        "tokenizer_checkpoint": tokenizer_checkpoint,
        "data_hash": prepared.config_hash,
        "latents_dir": str(latent_set.root),
        "gen_samples": cfg.metrics.gen_samples,  # behind every generation metric
    }


def _log_setup(
    logger: RunLogger, cfg: ExperimentConfig, params: dict[str, Any], latent_set: LatentSet
) -> None:
    logger.log_params(params)
    logger.log_params(
        {"generator": to_dict(cfg.generator), "generator_train": to_dict(cfg.generator_train)}
    )
    logger.log_text(dump_config(cfg), "config.yaml")
    logger.log_dict(dataclasses.asdict(latent_set.stats), "latents/latent_stats.json")
    logger.log_metrics({f"latents/{s}": n for s, n in latent_set.counts.items()})
