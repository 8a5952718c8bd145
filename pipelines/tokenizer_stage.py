"""Wiring of the tokenizer stages: data -> Ray Train (stage 1, optional stage 2) -> MLflow.

This is where tokenizer/ (the model and its task) meets platform/ (data, training,
metrics, tracking); neither of those imports the other.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitok.pipelines.experiment import ExperimentConfig, dump_config
from vitok.platform import storage
from vitok.platform.config import to_dict
from vitok.platform.data import PreparedData, clip_dataset, first_clips, to_model_input
from vitok.platform.metrics import MetricsConfig, ReconstructionMetrics, to_uint8
from vitok.platform.tracking import RunLogger, start_run
from vitok.platform.train import (
    CheckpointWeights,
    TrainConfig,
    TrainJob,
    TrainResult,
    load_model_state,
    load_task_state,
    run_training,
)
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.flops import forward_flops, param_counts
from vitok.tokenizer.losses import LossConfig, build_lpips
from vitok.tokenizer.model import ViTok
from vitok.tokenizer.task import TokenizerTask
from vitok.tokenizer.task import load_tokenizer as tokenizer_from_state


# ----------------------------------------------------------------------------- worker pieces
@dataclass(frozen=True)
class ClipBatch:
    """Ray Data batch -> task batch, on the worker: crop/flip for training, centre crop for
    evaluation, values in [-1, 1]."""

    crop: tuple[int, int] | None

    def __call__(self, batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator):
        x = to_model_input(batch["clip"], crop=self.crop, flip=training, generator=gen)
        return {"x": x, "label": batch["label"]}


class TokenizerEvaluator:
    """PSNR, SSIM (and LPIPS, rFID, rFVD when their weights exist) over a whole split."""

    def __init__(self, metrics: MetricsConfig, loss: LossConfig) -> None:
        lpips = build_lpips(loss)
        if lpips is not None:
            lpips.requires_grad_(False).eval()
        self.metrics = ReconstructionMetrics(metrics, lpips_fn=lpips)

    def update(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        x = batch["x"]
        recon, _ = model(x, sample=False)  # evaluation decodes the posterior mean
        self.metrics.update(x.float(), recon.float().clamp(-1, 1))

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()


@dataclass(frozen=True)
class MakeEvaluator:
    metrics: MetricsConfig
    loss: LossConfig

    def __call__(self) -> TokenizerEvaluator:
        return TokenizerEvaluator(self.metrics, self.loss)


# ----------------------------------------------------------------------------- params
SWEEP_AXES = ("E", "log2_E", "L", "c", "p", "q", "encoder_params_M", "decoder_params_M", "gflops")


def tokenizer_params(model: TokenizerConfig) -> dict[str, Any]:
    """What a run logs about its tokenizer: variant, p, q, c, E, L, sizes, params, FLOPs."""
    counts = param_counts(model)
    flops = forward_flops(model)
    return {
        "variant": model.variant,
        "encoder_size": model.encoder_size,
        "decoder_size": model.decoder_size,
        "p": model.patch,
        "q": model.tubelet,
        "c": model.channels,
        "L": model.num_tokens,
        "E": model.latent_floats,
        "log2_E": float(np.log2(model.latent_floats)),
        "pixels_per_float": model.pixels_per_float,
        "frames": model.input_size[0],
        "encoder_params_M": counts["encoder"] / 1e6,
        "decoder_params_M": counts["decoder"] / 1e6,
        "params_M": counts["total"] / 1e6,
        "gflops": flops["gflops"],
    }


# ----------------------------------------------------------------------------- loading
def load_tokenizer(checkpoint_dir: str | Path, model: TokenizerConfig) -> ViTok:
    """The tokenizer from a training checkpoint (a folder or URI; stage 2: with the decoder's
    EMA)."""
    state, extra = load_model_state(checkpoint_dir), load_task_state(checkpoint_dir)
    return tokenizer_from_state(state, model, extra)


# ----------------------------------------------------------------------------- artifacts
def reconstruction_grid(clips: np.ndarray, recons: np.ndarray, max_frames: int = 8) -> np.ndarray:
    """Originals over reconstructions: (2*N*H, F*W, 3) uint8 from (N, T, H, W, 3) pairs."""
    n, t = clips.shape[:2]
    step = max(1, t // max_frames)
    rows = []
    for i in range(n):
        rows.append(np.concatenate(list(clips[i, ::step][:max_frames]), axis=1))  # (H, F*W, 3)
        rows.append(np.concatenate(list(recons[i, ::step][:max_frames]), axis=1))
    return np.concatenate(rows, axis=0)


def log_reconstructions(
    logger: RunLogger,
    tokenizer: ViTok,
    prepared: PreparedData,
    crop: tuple[int, int] | None,
    fps: float,
    count: int = 4,
) -> None:
    """A grid PNG of validation clips over their reconstructions (+ a side-by-side mp4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitok.platform.media import encode_video

    clips = first_clips(prepared, "val" if prepared.num_val else "train", count)
    x = to_model_input(torch.from_numpy(clips), crop=crop, flip=False)
    with torch.no_grad():
        recon, _ = tokenizer(x, sample=False)
    clips, recons = to_uint8(x).cpu().numpy(), to_uint8(recon).cpu().numpy()
    grid = reconstruction_grid(clips, recons)
    fig, ax = plt.subplots(figsize=(min(16, grid.shape[1] / 40), min(16, grid.shape[0] / 40)))
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title("validation clips (odd rows) over reconstructions (even rows)")
    logger.log_figure(fig, "reconstructions/grid.png")
    plt.close(fig)
    if clips.shape[1] > 1:
        side = np.concatenate([clips, recons], axis=3)  # (N, T, H, 2W, 3)
        frames = np.concatenate(list(side), axis=1)  # (T, N*H, 2W, 3)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "side_by_side.mp4"
            h, w = frames.shape[1:3]
            encode_video(path, frames[:, : h - h % 2, : w - w % 2], fps)
            logger.log_artifact(path, "reconstructions")


def log_mlflow_model(uri: str, run_id: str, checkpoint_dir: str, model: TokenizerConfig) -> str:
    """Log the trained tokenizer as an MLflow pyfunc model (uint8 clips in, out)."""
    import mlflow

    from vitok.pipelines import mlflow_model
    from vitok.platform.config import to_yaml

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "tokenizer.pt"
        torch.save(load_tokenizer(checkpoint_dir, model).state_dict(), weights)
        config = Path(tmp) / "tokenizer.yaml"
        config.write_text(to_yaml(model))
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="tokenizer",
                python_model=mlflow_model.__file__,  # models-from-code: nothing pickled
                signature=mlflow_model.signature(model.input_size),
                input_example=np.zeros((1, *model.input_size, 3), np.uint8),
                artifacts={"weights": str(weights), "config": str(config)},
                pip_requirements=["torch", "einops", "pyyaml", "vitok"],
            )
    return info.model_uri


def register_tokenizer(
    uri: str,
    run_id: str,
    checkpoint_dir: str,
    model: TokenizerConfig,
    name: str,
    tags: dict[str, Any],
) -> str:
    """Log the tokenizer as an MLflow model in ``run_id`` and register it as a new version
    of ``name``; returns ``models:/<name>/<version>`` (loadable with
    ``mlflow.pyfunc.load_model``)."""
    import mlflow

    model_uri = log_mlflow_model(uri, run_id, checkpoint_dir, model)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return f"models:/{name}/{version.version}"


# ----------------------------------------------------------------------------- stages
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


def _datasets(prepared: PreparedData) -> dict[str, Any]:
    out = {"train": clip_dataset(prepared, "train")}
    if prepared.num_val:
        out["val"] = clip_dataset(prepared, "val")
    return out


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
    checkpoint: str,
    metrics: dict[str, float],
    log_model: bool,
) -> None:
    """The final metrics, the checkpoint tag, reconstructions and (optionally) the model."""
    logger.log_metrics({f"final/{k[4:]}": v for k, v in metrics.items()})
    logger.set_tags({"checkpoint": checkpoint})
    tokenizer = load_tokenizer(checkpoint, cfg.tokenizer)
    log_reconstructions(logger, tokenizer, prepared, cfg.data.crop, cfg.data.fps)
    if log_model:
        model_uri = log_mlflow_model(logger.uri, logger.run_id, checkpoint, cfg.tokenizer)
        logger.set_tags({"tokenizer_model_uri": model_uri})


def run_tokenizer(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    *,
    run_dir: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    log_model: bool = True,
    callbacks: list[Any] | None = None,
) -> TokenizerRun:
    """Train one tokenizer (stage 1, then stage 2 if configured), logging one MLflow run.

    ``run_dir`` (default ``<storage root>/runs/<name>``) keeps the MLflow run id and the Ray
    Train storage, so rerunning the same call resumes into the same run from any node.
    """
    name = run_name or cfg.name
    out_dir = run_dir or cfg.run_dir(name)
    params = tokenizer_params(cfg.tokenizer)
    params["data_hash"] = prepared.config_hash
    run_id = start_run(
        cfg.tracking,
        name,
        resume_file=storage.join(out_dir, "mlflow_run_id"),
        parent_run_id=parent_run_id,
        tags={"vitok.kind": "tokenizer", "vitok.variant": cfg.tokenizer.variant},
    )
    logger = RunLogger(cfg.tracking.uri, run_id) if run_id else None
    if logger:
        _log_setup(logger, cfg, params, prepared)
    make_eval = MakeEvaluator(cfg.metrics, cfg.loss) if prepared.num_val else None
    crop = cfg.data.crop
    datasets = _datasets(prepared)

    def job(stage: int, train: TrainConfig, init: CheckpointWeights | None) -> TrainJob:
        task = TokenizerTask(cfg.tokenizer, cfg.loss, stage, init)
        return TrainJob(
            name=f"{name}-stage{stage}",
            task=task,
            train=train,
            batch_fn=ClipBatch(crop),
            make_evaluator=make_eval,
            tokens_per_sample=cfg.tokenizer.num_tokens,
            tracking=cfg.tracking,
            run_id=run_id,
            params=params,
            metric_prefix="" if stage == 1 else "stage2/",
            lr_frames=cfg.tokenizer.input_size[0],
        )

    try:
        stage1 = run_training(
            job(1, cfg.train, None),
            datasets,
            storage_path=storage.join(out_dir, "ray"),
            callbacks=callbacks,
        )
        final, stage2 = stage1, None
        if cfg.stage2 is not None:
            stage2 = run_training(
                job(2, cfg.stage2, CheckpointWeights(stage1.checkpoint_dir)),
                datasets,
                storage_path=storage.join(out_dir, "ray"),
                callbacks=callbacks,
            )
            final = stage2
        metrics = {k: v for k, v in final.metrics.items() if k.startswith("val/")}
        if logger:
            _log_result(logger, cfg, prepared, final.checkpoint_dir, metrics, log_model)
            logger.finish("FINISHED")
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    return TokenizerRun(run_id, stage1, stage2, final.checkpoint_dir, metrics, params)
