"""What a training stage is made of: ``TrainConfig`` (optimisation, parallelism,
checkpointing), the ``Task`` and ``Evaluator`` protocols, the batch function, ``TrainJob``
and ``TrainResult``. The worker loop, the engines and the driver import this file; it
imports no other module of the training package.

The platform trains a ``Task`` (a small structural protocol; ``tokenizer/`` and
``generator/`` each provide one without importing anything from here):

    task.build_model() -> nn.Module
    task.param_groups(model) -> list[dict]          # optimizer groups (may carry their own lr)
    task.training_step(model, batch, step) -> (loss, logs)
    task.on_optimizer_step(model, step) -> None     # e.g. an EMA update
    task.extra_state() / task.load_extra_state(d)   # e.g. the EMA weights
    task.eval_module(model) -> nn.Module            # the weights to evaluate (EMA or live)

A task that trains several networks with separate optimizers (a GAN: the decoder and its
discriminator) also defines ``task.optimizer_parts(model)``, returning None (one optimizer
over ``param_groups``) or ``{name: {"module": nn.Module, ...}}``; see ``optimizer_parts``.
Each part gets its own DeepSpeed engine, so its own AdamW, gradient clipping and LR
schedule, and ``training_step`` returns ``({name: loss}, logs)``: each part is stepped with
the gradient of its own loss only.

Weights: checkpoints hold the fp32 weights (under bf16, the optimizer's fp32 master copy;
``weights``), and evaluation under bf16 runs an fp32 copy holding them, so what is evaluated
is what is saved, exported and logged.

The pipeline wires the rest in a ``TrainJob`` (batch function, evaluator); the worker loop
is ``train_loop``, where a resumed run ends as an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from vitok.platform.config import check_choice, check_positive, check_range, parse_resources
from vitok.platform.tracking.runs import TrackingConfig


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, parallelism and checkpointing of one training stage.

    ``batch_size`` is per worker and per micro step; the global batch is
    ``batch_size * grad_accum * num_workers``. ``lr`` is the peak learning rate; with
    ``scale_lr`` it is multiplied by ``global batch * frames / 256`` as in the paper.
    """

    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    scale_lr: bool = False
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Extra Ray resources per worker, "name=amount" (e.g. "accelerator_type:H100=0.001").
    resources: tuple[str, ...] = ()
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 10
    # A worker reads read_span consecutive row groups of a shard (clips, in the current
    # layout) with one request; each epoch permutes these units globally, and each worker
    # deals its share into batches within windows of shuffle_buffer rows (at least
    # read_span * batch_size), so that no two clips of one unit share a batch. 0 = reads of
    # about 1 MiB on a file system and 8 MiB on object storage (whose requests cost
    # latency), in row groups of the split's stored clip size (train_data.read_span).
    shuffle_buffer: int = 64
    read_span: int = 0
    # Row groups a worker has read are kept in memory up to this many MB: a small split is
    # read once per worker and then served from memory (a small dataset runs hundreds of
    # epochs), a larger one saves that fraction of its reads. 0 reads every epoch anew.
    cache_mb: int = 1024
    # Reader threads per worker (reads in flight at once; 0 = 1 on a file system, where more
    # threads only contend for the GIL, 8 on object storage, whose requests wait on latency)
    # and batches read ahead of the step.
    read_threads: int = 0
    prefetch_batches: int = 2
    seed: int = 0
    max_failures: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "log_every"):
            check_positive(f"train.{name}", getattr(self, name))
        check_positive("train.prefetch_batches", self.prefetch_batches)
        for name in ("read_threads", "read_span"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        check_positive("train.lr", self.lr)
        check_positive("train.cpus_per_worker", self.cpus_per_worker)
        check_positive("train.keep_checkpoints", self.keep_checkpoints)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("train.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        check_positive("train.cache_mb", self.cache_mb, allow_zero=True)
        check_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for i, beta in enumerate(self.betas):
            check_range(f"train.betas[{i}]", beta, 0.0, 0.99999)
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check_choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        parse_resources("train.resources", self.resources)
        if self.max_failures < -1:
            raise ValueError(f"train.max_failures={self.max_failures} must be >= -1")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers

    def peak_lr(self, frames: int = 1) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.global_batch * frames / 256


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return fn


def deepspeed_config(cfg: TrainConfig, grad_clip: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config generated from the typed TrainConfig (saved with every run);
    ``grad_clip`` overrides ``cfg.grad_clip`` (an optimizer part with its own clipping)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.grad_clip if grad_clip is None else grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------- protocols
class Task(Protocol):
    """What the platform trains; see the module docstring."""

    def build_model(self) -> nn.Module: ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...

    def training_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def on_optimizer_step(self, model: nn.Module, step: int) -> None: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: Mapping[str, Any]) -> None: ...

    def eval_module(self, model: nn.Module) -> nn.Module: ...


class Evaluator(Protocol):
    """Accumulates over a worker's part of a split; ``compute`` reduces across workers.
    One may also define ``log_artifacts(logger, prefix)``: rank 0 calls it after the final
    evaluation to log what it drew from the clips it evaluated (a ``RunLogger``)."""

    def update(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


# (batch, training, generator) -> the task's batch. A training batch is prepared in the reader
# thread ahead of its step, so a batch function draws only from the generator it is given
# (seeded by the micro step), never from torch's global generator. A batch function may also
# define ``on_device(batch, dtype) -> batch``: the loop calls it once the batch is on the
# worker's device (floating tensors cast to the worker's dtype), for work the device does
# better than the reader (``ClipBatch`` hands over uint8 crops and scales them there).
BatchFn = Callable[[dict[str, torch.Tensor], bool, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class TrainJob:
    """Everything a worker needs; pickled once and shipped to every worker."""

    name: str
    task: Any  # a Task (structural protocol; any picklable object with those methods)
    train: TrainConfig
    batch_fn: BatchFn
    make_evaluator: Callable[[], Evaluator] | None = None
    columns: tuple[str, ...] = ("clip", "label")
    tokens_per_sample: int = 0
    tracking: TrackingConfig | None = None
    run_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # Prefix for this job's MLflow metric keys, so stages sharing a run stay apart.
    metric_prefix: str = ""
    # Frames per sample in the LR scaling (train.scale_lr: lr x global batch x frames / 256).
    lr_frames: int = 1


@dataclass
class TrainResult:
    checkpoint_dir: str | None
    metrics: dict[str, float]
    storage_dir: str
    run_id: str | None

    @property
    def work_s(self) -> float:
        """Seconds spent in training steps and evaluation (the rest is start-up and I/O)."""
        return self.metrics.get("time/train_s", 0.0) + self.metrics.get("time/eval_s", 0.0)
