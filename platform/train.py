"""One worker loop for every stage: Ray Train's TorchTrainer + DeepSpeed, CPU or GPU.

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
``vitok.platform.weights``), and evaluation under bf16 runs an fp32 copy holding them, so
what is evaluated is what is saved, exported and logged.

The pipeline wires the rest in a ``TrainJob``: how a Ray Data batch becomes the task's
batch (augmentation happens there, on the worker), and which evaluator reduces metrics
over the whole validation split across workers.

Resume: every checkpoint holds the DeepSpeed state (model, optimizer, LR schedule), the
task's extra state and the loop position (optimizer step, epoch, batch within the epoch).
Randomness is derived from (seed, rank, step), so a resumed run draws what an
uninterrupted one would have drawn from that step on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from vitok.platform import storage
from vitok.platform.config import check_choice, check_positive, check_range, parse_resources
from vitok.platform.tracking import RunLogger, TrackingConfig, resolve_uri
from vitok.platform.weights import export_state, fp32_copy, snapshot_frozen

CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "vitok_state.json"
MODEL_FILE = "model.pt"
TASK_STATE_FILE = "task_state.pt"


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
    shuffle_buffer: int = 64
    seed: int = 0
    max_failures: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "log_every"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        check_positive("train.lr", self.lr)
        check_positive("train.cpus_per_worker", self.cpus_per_worker)
        check_positive("train.keep_checkpoints", self.keep_checkpoints)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("train.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
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
    """Accumulates over a worker's part of a split; ``compute`` reduces across workers."""

    def update(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


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
    # Testing aid: raise once (a marker file remembers) when this optimizer step is reached.
    fail_once_at_step: int | None = None


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


# ----------------------------------------------------------------------------- optimizer parts
SINGLE_PART = "model"
PART_KEYS = ("module", "params", "lr", "lr_schedule", "grad_clip")


@dataclass
class OptimizerPart:
    """One optimizer of a stage: the module its DeepSpeed engine wraps, its parameter
    groups (each with its peak ``lr``), its LR schedule (a multiplier of the peak, by
    optimizer step) and its gradient clipping (0 = none)."""

    name: str
    module: nn.Module
    groups: list[dict[str, Any]]
    lr_schedule: Callable[[int], float]
    grad_clip: float


def optimizer_parts(
    task: Any, model: nn.Module, cfg: TrainConfig, peak_lr: float
) -> list[OptimizerPart]:
    """The task's optimizers: one over ``task.param_groups(model)`` unless the task's
    ``optimizer_parts(model)`` returns ``{name: spec}``. A spec holds ``module`` (a
    submodule of ``model``; its engine moves and casts it) and optionally ``params`` (default:
    the module's trainable parameters), ``lr`` (peak; default the stage's), ``lr_schedule``
    (``step -> multiplier``; default the stage's warm-up + cosine) and ``grad_clip`` (default
    ``train.grad_clip``). Every parameter of ``model`` must lie in exactly one part's module.
    """
    spec = task.optimizer_parts(model) if hasattr(task, "optimizer_parts") else None
    if spec is None:
        groups = task.param_groups(model)
        for group in groups:  # a group's own "lr" is its peak; the schedule scales every group
            group.setdefault("lr", peak_lr)
        return [OptimizerPart(SINGLE_PART, model, groups, lr_multiplier(cfg), cfg.grad_clip)]
    if not spec:
        raise ValueError("optimizer_parts returned no parts")
    parts = []
    for name, part in spec.items():
        unknown = sorted(set(part) - set(PART_KEYS))
        if unknown or "module" not in part:
            raise ValueError(
                f"optimizer part {name!r}: keys {sorted(part)}; needs 'module', allows {PART_KEYS}"
            )
        module = part["module"]
        params = list(part.get("params") or [p for p in module.parameters() if p.requires_grad])
        own = {id(p) for p in module.parameters()}
        if not params or any(id(p) not in own for p in params):
            raise ValueError(f"optimizer part {name!r}: its params must be its module's, >= 1")
        grad_clip = float(part.get("grad_clip", cfg.grad_clip))
        check_positive(f"optimizer part {name!r} grad_clip", grad_clip, allow_zero=True)
        group = {"params": params, "lr": float(part.get("lr", peak_lr))}
        schedule = part.get("lr_schedule") or lr_multiplier(cfg)
        parts.append(OptimizerPart(str(name), module, [group], schedule, grad_clip))
    covered = [id(p) for part in parts for p in part.module.parameters()]
    if len(covered) != len(set(covered)) or set(covered) != {id(p) for p in model.parameters()}:
        raise ValueError(
            "optimizer parts' modules must cover every parameter of the model exactly once"
        )
    return parts


def make_optimizer(
    part: OptimizerPart, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the part's groups (the stage's betas and weight decay) and its schedule;
    the worker loop hands both to DeepSpeed."""
    optimizer = torch.optim.AdamW(
        part.groups, lr=part.groups[0]["lr"], betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, part.lr_schedule)


def named_losses(
    loss: torch.Tensor | Mapping[str, torch.Tensor], parts: list[OptimizerPart]
) -> dict[str, torch.Tensor]:
    """``training_step``'s loss as ``{part name: loss}`` (one tensor for one part)."""
    names = [part.name for part in parts]
    if isinstance(loss, Mapping):
        if sorted(loss) != sorted(names):
            raise ValueError(f"training_step returned losses {sorted(loss)}; parts are {names}")
        return dict(loss)
    if len(names) != 1:
        raise ValueError(f"training_step returned one loss; parts {names} need one each")
    return {names[0]: loss}


def build_engines(parts: list[OptimizerPart], cfg: TrainConfig) -> list[Any]:
    """One DeepSpeed engine per part: its module, AdamW, LR schedule and clipping (needs an
    initialised process group)."""
    import deepspeed

    engines = []
    for part in parts:
        optimizer, scheduler = make_optimizer(part, cfg)
        engine, *_ = deepspeed.initialize(
            model=part.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, part.grad_clip),
            dist_init_required=False,
        )
        engines.append(engine)
    return engines


def _learning_rates(parts: list[OptimizerPart], engines: list[Any]) -> dict[str, float]:
    """``train/lr`` (the first part's) and ``train/lr/<part>`` for every other part."""
    out = {}
    for i, (part, engine) in enumerate(zip(parts, engines)):
        lr = engine.lr_scheduler.get_last_lr()[0]
        out["train/lr" if i == 0 else f"train/lr/{part.name}"] = lr
    return out


def _part_file(parts: list[OptimizerPart], part: OptimizerPart, stem: str) -> str:
    """A checkpoint name per part: plain for a single optimizer, suffixed by part name."""
    return stem if len(parts) == 1 else f"{stem}-{part.name}"


# ----------------------------------------------------------------------------- helpers
def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1)


def _to_float(logs: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().float().mean().item()
        out[k] = float(v)
    return out


def _checkpoint_file(checkpoint: str | Path, file_name: str) -> Path:
    """A local copy of one file of a checkpoint (a local folder or a URI under storage)."""
    uri = storage.join(str(checkpoint), file_name)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"{uri} is missing: not a vitok training checkpoint")
    return storage.local_copy(uri)


def load_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The plain model weights saved beside the DeepSpeed state (safe load)."""
    path = _checkpoint_file(checkpoint, MODEL_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_task_state(checkpoint: str | Path) -> dict[str, Any]:
    """The task's extra state (e.g. EMA weights) of a checkpoint; {} when it has none."""
    if not storage.is_file(storage.join(str(checkpoint), TASK_STATE_FILE)):
        return {}
    path = _checkpoint_file(checkpoint, TASK_STATE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads(_checkpoint_file(checkpoint, STATE_FILE).read_text())


@dataclass(frozen=True)
class CheckpointWeights:
    """A picklable ``() -> state dict`` of a checkpoint's model weights: a task calls it on
    whatever node it runs, and the file is fetched from storage there."""

    checkpoint: str

    def __call__(self) -> dict[str, torch.Tensor]:
        return load_model_state(self.checkpoint)


# ----------------------------------------------------------------------------- worker loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: DeepSpeed engines, train, evaluate, checkpoint."""
    import ray.train

    job: TrainJob = config["job"]
    cfg = job.train
    task = job.task
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = task.build_model()
    frames = int(job.params.get("frames", 1) or 1)
    peak_lr = cfg.peak_lr(frames)
    parts = optimizer_parts(task, model, cfg, peak_lr)
    frozen = snapshot_frozen(model)  # fp32 values of what no optimizer holds a master of
    engines = build_engines(parts, cfg)
    device = engines[0].device
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    exported: dict[str, Any] = {"step": -1, "state": None}

    def fp32_state() -> dict[str, torch.Tensor]:
        """The fp32 weights now (collective: every rank calls it at the same steps)."""
        if exported["step"] != state["step"]:
            exported["state"] = export_state(model, engines, frozen)
            exported["step"] = state["step"]
        return exported["state"]

    # train_s / eval_s: seconds in training steps and in evaluation, summed over restarts;
    # the study compares them with a trial's wall time (the rest is the platform's cost).
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "train_s": 0.0}
    state["eval_s"] = 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            for part, engine in zip(parts, engines):
                engine.load_checkpoint(ckpt_dir, tag=_part_file(parts, part, CHECKPOINT_TAG))
            saved = load_checkpoint_state(ckpt_dir)
            state.update(saved["loop"])
            extra = Path(ckpt_dir) / TASK_STATE_FILE
            if extra.exists():
                task.load_extra_state(torch.load(extra, map_location="cpu", weights_only=True))
        if rank == 0:
            print(
                f"[vitok] {job.name}: resumed at step {state['step']} (epoch {state['epoch']})",
                flush=True,
            )

    logger = None
    monitor = None
    if rank == 0 and job.run_id and job.tracking is not None and job.tracking.enabled:
        logger = _PrefixedLogger(RunLogger(job.tracking.uri, job.run_id), job.metric_prefix)
        if job.tracking.system_metrics:
            monitor = logger.inner.start_system_metrics()
        if state["step"]:  # the run's page says it restarted, and from where
            logger.inner.set_tags({f"vitok.{job.metric_prefix}resumed_at_step": state["step"]})

    def save_checkpoint(metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"vitok-ckpt-r{rank}-"))
        client_state = {"vitok_step": state["step"]}
        for part, engine in zip(parts, engines):
            tag = _part_file(parts, part, CHECKPOINT_TAG)
            engine.save_checkpoint(str(tmp), tag=tag, client_state=client_state)
        weights = fp32_state()
        if rank == 0:
            torch.save(weights, tmp / MODEL_FILE)
            torch.save(task.extra_state(), tmp / TASK_STATE_FILE)
            meta = {"loop": state, "name": job.name, "params": job.params, "metrics": metrics}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str))
            for part in parts:
                ds_file = _part_file(parts, part, "deepspeed_config") + ".json"
                (tmp / ds_file).write_text(json.dumps(deepspeed_config(cfg, part.grad_clip)))
        ray.train.report(
            {**metrics, "step": state["step"]},
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=f"checkpoint_{state['step']:08d}",
        )
        shutil.rmtree(tmp, ignore_errors=True)

    def evaluate() -> dict[str, float]:
        if job.make_evaluator is None:
            return {}
        started = time.perf_counter()
        try:
            return _evaluate()
        finally:
            state["eval_s"] += time.perf_counter() - started

    def _evaluate() -> dict[str, float]:
        evaluator = job.make_evaluator()
        eval_dtype = dtype
        root = model
        if cfg.precision == "bf16":  # evaluate the fp32 weights that are saved and exported
            root = fp32_copy(model, fp32_state(), device, zero3=cfg.zero_stage == 3)
            eval_dtype = torch.float32
        eval_model = task.eval_module(root)
        was_training = eval_model.training
        eval_model.eval()
        shard = ray.train.get_dataset_shard("val")
        torch.manual_seed(_step_seed(cfg.seed + 1, rank, state["step"]))
        with torch.no_grad():
            for i, batch in enumerate(
                shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False)
            ):
                if cfg.eval_batches and i >= cfg.eval_batches:
                    break
                gen = torch.Generator().manual_seed(_step_seed(cfg.seed + 1, rank, i))
                model_batch = job.batch_fn(_select(batch, job.columns), False, gen)
                model_batch = _to_device(model_batch, device, eval_dtype)
                evaluator.update(eval_model, model_batch)
        eval_model.train(was_training)
        return {f"val/{k}": v for k, v in evaluator.compute().items()}

    shard = ray.train.get_dataset_shard("train")
    for engine in engines:
        engine.train()
    model.train()
    last_log_time, last_log_step = time.perf_counter(), state["step"]
    window: dict[str, float] = {}
    window_count = 0
    metrics: dict[str, float] = {}
    micro = 0
    while state["step"] < cfg.steps:
        batches_seen = 0
        skip = state["batch_in_epoch"]
        iterator = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + state["epoch"] if cfg.shuffle_buffer else None,
        )
        for batch in iterator:
            batches_seen += 1
            if batches_seen <= skip:
                continue  # fast-forward to the resumed position within this epoch
            step = state["step"]
            started = time.perf_counter()
            if job.fail_once_at_step is not None and step == job.fail_once_at_step:
                _fail_once(job, step)
            torch.manual_seed(_step_seed(cfg.seed, rank, step * cfg.grad_accum + micro))
            gen = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, step))
            model_batch = _to_device(
                job.batch_fn(_select(batch, job.columns), True, gen), device, dtype
            )
            loss, logs = task.training_step(model, model_batch, step)
            losses = named_losses(loss, parts)
            for part, engine in zip(parts, engines):  # all backwards before any update
                engine.backward(losses[part.name])
            for engine in engines:  # each clips and steps its own part
                engine.step()
            state["train_s"] += time.perf_counter() - started
            micro = (micro + 1) % cfg.grad_accum
            state["batch_in_epoch"] = batches_seen
            state["samples"] += cfg.batch_size * world
            if micro != 0:
                continue
            state["step"] = step = step + 1
            task.on_optimizer_step(model, step)
            if len(parts) == 1:
                step_logs = {"loss": losses[parts[0].name], **logs}
            else:
                step_logs = {**{f"loss/{n}": v for n, v in losses.items()}, **logs}
            for k, v in _to_float(step_logs).items():
                window[k] = window.get(k, 0.0) + v
            window_count += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                metrics = {f"train/{k}": v / window_count for k, v in window.items()}
                metrics.update(_learning_rates(parts, engines))
                metrics["perf/steps_per_s"] = rate
                metrics["perf/samples_per_s"] = rate * cfg.global_batch
                if job.tokens_per_sample:
                    metrics["perf/tokens_per_s"] = rate * cfg.global_batch * job.tokens_per_sample
                metrics["epoch"] = state["epoch"]
                if rank == 0:
                    shown = ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
                    print(f"[vitok] {job.name} step {step}/{cfg.steps}: {shown}", flush=True)
                    if logger:
                        logger.log_metrics(metrics, step=step)
                window, window_count = {}, 0
                last_log_time, last_log_step = now, step

            is_last = step >= cfg.steps
            if cfg.eval_every and step % cfg.eval_every == 0 and not is_last:
                val = evaluate()
                if rank == 0 and logger and val:
                    logger.log_metrics(val, step=step)
                ray.train.report({**metrics, **val, "step": step})
            if is_last:
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(metrics)
        else:
            if batches_seen == 0:
                raise RuntimeError(
                    f"{job.name}: the training split yields no full batch of {cfg.batch_size} "
                    f"per worker ({cfg.num_workers} workers); add data or lower "
                    "train.batch_size"
                )
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            continue
        break

    final = evaluate()
    metrics = {**metrics, **final, "time/train_s": state["train_s"], "time/eval_s": state["eval_s"]}
    if rank == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in final.items())
        print(f"[vitok] {job.name} finished at step {state['step']}: {summary}", flush=True)
        if logger and final:
            logger.log_metrics(final, step=state["step"])
    if monitor is not None:
        monitor.finish()
    save_checkpoint(metrics)
    if logger:  # send what is queued (bounded wait); the driver ends the run
        logger.close()


class _PrefixedLogger:
    def __init__(self, inner: RunLogger, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.inner.close()


def _select(batch: Mapping[str, torch.Tensor], columns: tuple[str, ...]) -> dict:
    return {k: batch[k] for k in columns if k in batch}


def _to_device(batch: dict[str, torch.Tensor], device: Any, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _fail_once(job: TrainJob, step: int) -> None:
    marker = Path(tempfile.gettempdir()) / f"vitok-fail-once-{job.name}-{step}"
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError(f"injected failure at step {step} (fail_once_at_step)")


# ----------------------------------------------------------------------------- driver
def run_training(
    job: TrainJob,
    datasets: Mapping[str, Any],
    *,
    storage_path: str | Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Fit ``job`` with a TorchTrainer; rerunning with the same name and storage resumes.

    ``storage_path`` is a folder or URI under the storage root (every node must reach it:
    checkpoints are persisted there). ``datasets`` maps "train" (and optionally "val") to
    Ray Datasets; each worker reads its shard. The MLflow run (``job.run_id``) is created by
    the caller and marked here. ``callbacks`` are Ray Train callbacks (a Tune trial passes
    one that forwards reports to Tune).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.train
    if job.tracking is not None:  # workers run in another directory: ship an absolute URI
        tracking = dataclasses.replace(job.tracking, uri=resolve_uri(job.tracking.uri))
        job = dataclasses.replace(job, tracking=tracking)
    location = storage.resolve_root(str(storage_path))
    if "val" not in datasets and job.make_evaluator is not None:
        raise ValueError(f"{job.name}: an evaluator needs a 'val' dataset")
    resources = {"CPU": cfg.cpus_per_worker, **parse_resources("train.resources", cfg.resources)}
    if cfg.use_gpu:
        resources["GPU"] = 1
    env = {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"job": job},
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
        datasets=dict(datasets),
    )
    logger = RunLogger(job.tracking.uri, job.run_id) if job.run_id and job.tracking else None
    if logger:
        logger.log_dict(deepspeed_config(cfg), "deepspeed_config.json")
    try:
        result = trainer.fit()
    except Exception:
        if logger:
            logger.finish("FAILED")
        raise
    ckpt = None
    if result.checkpoint is not None:  # as a location under storage (a URI when remote)
        ckpt = storage.join(location, job.name, storage.name(result.checkpoint.path))
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    if logger and ckpt:
        logger.set_tags({"checkpoint": ckpt, "ray_storage": storage.join(location, job.name)})
    if logger:  # sent before the caller ends the run with its own logger
        logger.close()
    return TrainResult(
        checkpoint_dir=ckpt,
        metrics=metrics,
        storage_dir=storage.join(location, job.name),
        run_id=job.run_id,
    )


__all__ = [
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
    "resolve_uri",
    "run_training",
    "train_loop_per_worker",
]
