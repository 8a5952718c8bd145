"""Wiring of the generator stage: frozen tokenizer -> latents -> DiT training -> generation eval.

1. Latent extraction (Ray Data, actor pool): the frozen tokenizer encodes the centre-cropped
   train and val clips (posterior mean) into Parquet; per-channel statistics of the training
   latents normalise the generator's inputs (``vitok.platform.latents``).
2. The DiT trains through the platform's Ray Train + DeepSpeed loop (``GeneratorTask``),
   with the validation diffusion loss as its evaluation.
3. Generation eval: ``metrics.gen_samples`` samples (DDIM + classifier-free guidance, EMA
   weights), drawn in batches across Ray workers and decoded by the tokenizer
   (``vitok.pipelines.generation_eval``); the first few of each class are logged as a grid
   PNG (and an mp4 for video). gFID / gFVD when the Inception / I3D weight files are
   configured; always ``frechet_tokenizer_latent`` (see ``generation_metrics``), never called
   FID; the sample counts beside them.

One MLflow run per generator, tagged with its tokenizer (and nested under a parent run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitok.generator.config import GeneratorConfig
from vitok.generator.diffusion import Objective, build_objective
from vitok.generator.dit import DiT
from vitok.generator.task import GeneratorTask
from vitok.pipelines.experiment import ExperimentConfig, dump_config
from vitok.pipelines.generation_eval import (
    GenerationSpec,
    Workers,
    generated_moments,
    generation_metrics,
    preview_clips,
    preview_ids,
    real_moments,
    resolve_networks,
)
from vitok.pipelines.tokenizer_stage import load_tokenizer
from vitok.platform import storage
from vitok.platform.config import to_dict
from vitok.platform.data import PreparedData, clip_dataset, to_model_input
from vitok.platform.latents import LatentSet, LatentStats, extract_latents
from vitok.platform.tracking import RunLogger, start_run
from vitok.platform.train import TrainConfig, TrainJob, TrainResult, run_training
from vitok.tokenizer.config import TokenizerConfig

PREVIEW_PER_CLASS = 4  # generated samples per class in the logged grid / mp4


# ----------------------------------------------------------------------------- worker pieces
@dataclass(frozen=True)
class TokenizerEncoder:
    """Picklable encoder factory for ``extract_latents``: ``factory(device) -> encode`` where
    ``encode(clips (B, T, H, W, 3) uint8) -> posterior mean (B, t, h, w, c)``."""

    checkpoint_dir: str
    model: TokenizerConfig
    crop: tuple[int, int] | None

    def __call__(self, device: str):
        tokenizer = load_tokenizer(self.checkpoint_dir, self.model).to(device)
        crop = self.crop

        def encode(clips: torch.Tensor) -> torch.Tensor:
            x = to_model_input(clips, crop=crop, flip=False)  # (B, T, h, w, 3) centre crop
            return tokenizer.encode(x).mode()  # (B, t, h, w, c)

        return encode


@dataclass(frozen=True)
class LatentBatch:
    """Ray Data batch -> task batch on the worker: normalised latents and labels."""

    stats: LatentStats

    def __call__(self, batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator):
        return {"z": self.stats.normalise(batch["latent"]), "label": batch["label"]}


class DiffusionLossEvaluator:
    """The diffusion loss over a split (no label dropout; timesteps and noise drawn from a
    fixed seed, ``repeats`` draws per clip), averaged across workers."""

    def __init__(self, cfg: GeneratorConfig, repeats: int = 4, seed: int = 1234) -> None:
        self.objective: Objective = build_objective(dataclasses.replace(cfg, class_dropout=0.0))
        self.repeats, self.seed = repeats, seed
        self.total, self.count, self.batches = 0.0, 0, 0

    def update(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        z, y = batch["z"], batch["label"].long()  # (B, t, h, w, c), (B,)
        for r in range(self.repeats):
            gen = torch.Generator(device=z.device)
            gen.manual_seed(self.seed + 1000 * self.batches + r)
            loss, _ = self.objective.training_loss(model, z, y, generator=gen)
            self.total += float(loss.detach()) * z.shape[0]
            self.count += z.shape[0]
        self.batches += 1

    def compute(self) -> dict[str, float]:
        sums = torch.tensor([self.total, float(self.count)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                sums = sums.cuda()
            dist.all_reduce(sums)
        total, count = sums.tolist()
        return {"diffusion_loss": total / max(count, 1.0)}


@dataclass(frozen=True)
class MakeDiffusionEvaluator:
    cfg: GeneratorConfig

    def __call__(self) -> DiffusionLossEvaluator:
        return DiffusionLossEvaluator(self.cfg)


# ----------------------------------------------------------------------------- latents
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
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    datasets = {"train": clip_dataset(prepared, "train")}
    if prepared.num_val:
        datasets["val"] = clip_dataset(prepared, "val")
    return extract_latents(
        datasets,
        TokenizerEncoder(tokenizer_checkpoint, model, crop),
        storage.join(out_root, key),
        batch_size=train.batch_size,
        num_cpus=train.cpus_per_worker,
        num_gpus=1.0 if train.use_gpu else 0.0,
        info=key_src,
    )


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def log_samples(
    logger: RunLogger, clips: torch.Tensor, labels: list[int], names: list[str], fps: float
) -> None:
    """A grid PNG (one row per sample, frames across, grouped by class) and, for video, an
    mp4 tiling the samples (classes down, samples across). clips: (N, T, H, W, 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitok.platform.media import encode_video

    frames = _to_uint8(clips)  # (N, T, H, W, 3)
    step = max(1, frames.shape[1] // 8)
    grid = np.concatenate(
        [np.concatenate(list(clip[::step][:8]), axis=1) for clip in frames], axis=0
    )  # (N*H, F*W, 3)
    fig, ax = plt.subplots(figsize=(min(16, 2 + grid.shape[1] / 40), min(20, grid.shape[0] / 40)))
    ax.imshow(grid)
    ax.set_axis_off()
    classes = ", ".join(f"{i}={names[i]}" for i in sorted(set(labels)))
    ax.set_title(f"generated samples, rows by class ({classes})", fontsize=8)
    logger.log_figure(fig, "samples/grid.png")
    plt.close(fig)
    if frames.shape[1] > 1:
        per_class = labels.count(labels[0])
        rows = [
            np.concatenate(list(frames[i : i + per_class]), axis=2)  # (T, H, k*W, 3)
            for i in range(0, len(frames), per_class)
        ]
        video = np.concatenate(rows, axis=1)  # (T, classes*H, k*W, 3)
        h, w = video.shape[1:3]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "samples.mp4"
            encode_video(path, video[:, : h - h % 2, : w - w % 2], fps)
            logger.log_artifact(path, "samples")


# ----------------------------------------------------------------------------- the stage
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
    train = cfg.generator_train
    if train is None:
        raise ValueError("generator_train=None: set generator_train.* to train a generator")
    num_labels = len(prepared.label_map)
    if num_labels > cfg.generator.num_classes:
        raise ValueError(
            f"generator.num_classes={cfg.generator.num_classes} is smaller than the data's "
            f"{num_labels} labels {sorted(prepared.label_map)}"
        )
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
    run_id = start_run(
        cfg.tracking,
        name,
        resume_file=storage.join(out_dir, "mlflow_run_id"),
        parent_run_id=parent_run_id,
        tags=tags,
    )
    logger = RunLogger(cfg.tracking.uri, run_id) if run_id else None
    try:
        crop = cfg.data.crop
        latent_set = latents_for(
            prepared,
            tokenizer_checkpoint,
            cfg.tokenizer,
            crop,
            storage.join(out_dir, "latents"),
            train,
        )
        latent_shape = latent_set.latent_shape  # (t, h, w, c)
        channels = latent_shape[-1]
        task = GeneratorTask(cfg.generator, channels)
        dit_params = sum(p.numel() for p in DiT(cfg.generator, channels).parameters())
        params = {
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
        if logger:
            logger.log_params(params)
            logger.log_params(
                {"generator": to_dict(cfg.generator), "generator_train": to_dict(train)}
            )
            logger.log_text(dump_config(cfg), "config.yaml")
            logger.log_dict(dataclasses.asdict(latent_set.stats), "latents/latent_stats.json")
            logger.log_metrics({f"latents/{s}": n for s, n in latent_set.counts.items()})

        datasets = {split: latent_set.dataset(split) for split in latent_set.splits}
        job = TrainJob(
            name=name,
            task=task,
            train=train,
            batch_fn=LatentBatch(latent_set.stats),
            make_evaluator=MakeDiffusionEvaluator(cfg.generator) if "val" in datasets else None,
            columns=("latent", "label"),
            tokens_per_sample=params["L"],
            tracking=cfg.tracking,
            run_id=run_id,
            params=params,
        )
        result = run_training(job, datasets, storage_path=storage.join(out_dir, "ray"))
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
        eval_started = time.perf_counter()
        metrics.update(
            evaluate_generation(
                cfg,
                prepared,
                result.checkpoint_dir,
                tokenizer_checkpoint,
                latent_set,
                logger=logger,
            )
        )
        eval_s = time.perf_counter() - eval_started
        if logger:
            logger.log_metrics({f"final/{k.split('/', 1)[-1]}": v for k, v in metrics.items()})
            logger.set_tags({"checkpoint": result.checkpoint_dir})
            logger.finish("FINISHED")
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    return GeneratorRun(
        run_id, result.checkpoint_dir, metrics, result, latent_set, params, eval_s=eval_s
    )


def evaluate_generation(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    generator_checkpoint: str,
    tokenizer_checkpoint: str,
    latent_set: LatentSet,
    *,
    logger: RunLogger | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Sample ``cfg.metrics.gen_samples`` clips from the EMA generator in batches across Ray
    workers (one per generator training worker, with its resources), log the first
    ``PREVIEW_PER_CLASS`` of each class, and return the generation metrics (see the module
    docstring) with ``gen/samples`` (and ``gen/real_samples``) beside them."""
    names = [n for n, _ in sorted(prepared.label_map.items(), key=lambda kv: kv[1])]
    metrics_cfg = resolve_networks(cfg.metrics)
    spec = GenerationSpec(
        generator_checkpoint=str(generator_checkpoint),
        tokenizer_checkpoint=str(tokenizer_checkpoint),
        generator=cfg.generator,
        tokenizer=cfg.tokenizer,
        stats=latent_set.stats,
        latent_shape=tuple(latent_set.latent_shape),
        metrics=metrics_cfg,
        num_labels=len(names),
        seed=seed,
    )
    train = cfg.generator_train or TrainConfig()
    workers = Workers(
        num_actors=train.num_workers,
        batch_size=metrics_cfg.gen_batch_size,
        num_cpus=train.cpus_per_worker,
        num_gpus=1.0 if train.use_gpu else 0.0,
    )
    count = metrics_cfg.gen_samples
    generated = generated_moments(spec, count, workers)
    real_split = "val" if "val" in latent_set.splits else "train"
    real = torch.from_numpy(latent_set.pooled(real_split))  # (N, c)
    reference = None
    if real_split == "val":  # a real set of the generated set's size: the attainable level
        reference = torch.from_numpy(latent_set.pooled("train")[:count])
    # The real side in the fixed spaces (pooled pixels; Inception / I3D with weight files).
    dataset = clip_dataset(prepared, real_split)
    real_networks, real_clips = real_moments(spec, dataset, count, cfg.data.crop, workers)
    metrics = generation_metrics(generated, real, reference, real_networks, real_clips)
    if logger:
        ids = preview_ids(count, len(names), PREVIEW_PER_CLASS)
        clips = torch.from_numpy(preview_clips(spec, ids, workers)).float() / 127.5 - 1
        log_samples(logger, clips, [i % len(names) for i in ids], names, cfg.data.fps)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"[vitok] generation eval: {shown}", flush=True)
    return {f"gen/{k}": v for k, v in metrics.items()}
