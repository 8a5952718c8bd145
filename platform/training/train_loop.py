"""The Ray Train worker loop in named pieces: the model and its engines (``Worker``), the
``Checkpointer``, ``evaluate`` and the ``Loop`` that steps them (started by
``train.run_training``), with this worker's data (``train_data.WorkerData``) and the
``MetricWindow`` and ``StepLogger`` from ``train_metrics.py``.

A resumed run ends as an uninterrupted one would (same weights, same curve): all a step
consumes is a function of (seed, epoch, world, rank, micro step) and of the checkpoint
(DeepSpeed state, task state, loop position, the open logging window's sums). The data order
too: each worker's batches are a plan over the split's row groups (``read_plan``), and a
resume starts reading at the checkpointed batch. The loop position holds the world size and
the epoch's earlier segments, so a restart at another world size splits what the epoch has
not yet consumed among the new workers.

Each step is logged once: steps re-run after a restart give the same values, but MLflow
would store them twice (and ``perf/*`` differ), so ``StepLogger`` skips what an earlier
attempt logged (a kill between its spool append and its mark write can still log one window
twice, with the same values).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitok.platform import storage
from vitok.platform.training.checkpoints import (
    CHECKPOINT_TAG,
    MODEL_FILE,
    STATE_FILE,
    TASK_STATE_FILE,
    load_checkpoint_state,
)
from vitok.platform.training.config import TrainJob, deepspeed_config
from vitok.platform.training.engines import (
    OptimizerPart,
    build_engines,
    named_losses,
    optimizer_parts,
    step_seed,
)
from vitok.platform.training.train_data import WorkerData
from vitok.platform.training.train_metrics import LOG_MARK_FILE, MetricWindow, StepLogger
from vitok.platform.training.weights import export_state, fp32_copy, snapshot_frozen

COMMITTED_FILE = "vitok_committed"  # written once every rank's part is uploaded


# ----------------------------------------------------------------------------- model
class Worker:
    """The model, its optimizer parts and their DeepSpeed engines on one worker."""

    def __init__(self, job: TrainJob) -> None:
        cfg = job.train
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = job.task.build_model()
        self.parts = optimizer_parts(job.task, self.model, cfg, cfg.peak_lr(job.lr_frames))
        self.frozen = snapshot_frozen(self.model)  # fp32 values no optimizer holds a master of
        self.engines = build_engines(self.parts, cfg)
        self.device = self.engines[0].device
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self._exported: tuple[int, dict[str, torch.Tensor] | None] = (-1, None)
        self.pairs: list[tuple[OptimizerPart, Any]] = list(zip(self.parts, self.engines))

    def tags(self) -> list[tuple[str, Any]]:
        """``(checkpoint tag, engine)`` of every optimizer part."""
        return [(_part_file(self.parts, p, CHECKPOINT_TAG), e) for p, e in self.pairs]

    def fp32_state(self, step: int) -> dict[str, torch.Tensor]:
        """The fp32 weights at ``step`` (collective: every rank calls it at the same steps)."""
        if self._exported[0] != step:
            self._exported = (step, export_state(self.model, self.engines, self.frozen))
        return self._exported[1]


# ----------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Saves and restores a worker's DeepSpeed state, the task's extra state, the fp32
    weights and the loop position (``state``, which includes the open metric window)."""

    def __init__(self, job: TrainJob, worker: Worker, rank: int, run_dir: str | None) -> None:
        self.job, self.worker, self.rank, self.run_dir = job, worker, rank, run_dir

    def latest(self) -> Any:
        """The newest checkpoint: Ray Train's, or a newer one under ``run_dir`` that every
        rank finished uploading. Ray Train's controller learns of a report when it next polls
        the workers (every 2 s), so a worker killed just after one restarts from the one
        before (or from step 0) unless the folder itself is trusted."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        names = [storage.name(checkpoint.path)] if checkpoint is not None else []
        if self.run_dir and storage.exists(self.run_dir):
            for name in storage.listdir(self.run_dir):
                marker = storage.join(self.run_dir, name, COMMITTED_FILE)
                if name.startswith("checkpoint_") and storage.is_file(marker):
                    names.append(name)
        if not names:
            return None
        newest = max(names)  # checkpoint_<step, 8 digits>
        if checkpoint is not None and newest == names[0]:
            return checkpoint
        return ray.train.Checkpoint(storage.join(self.run_dir, newest))

    def restore(self, state: dict[str, Any]) -> bool:
        """Load the latest checkpoint (``latest``) into a (re)started worker, if any."""
        checkpoint = self.latest()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as ckpt_dir:
            for tag, engine in self.worker.tags():
                engine.load_checkpoint(ckpt_dir, tag=tag)
            state.update(load_checkpoint_state(ckpt_dir)["loop"])
            extra = Path(ckpt_dir) / TASK_STATE_FILE
            if extra.exists():
                saved = torch.load(extra, map_location="cpu", weights_only=True)
                self.job.task.load_extra_state(saved)
        return True

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Every rank writes its DeepSpeed shard into one temp dir, then one report."""
        import ray.train

        job, worker, cfg = self.job, self.worker, self.job.train
        tmp = Path(tempfile.mkdtemp(prefix=f"vitok-ckpt-r{self.rank}-"))
        for tag, engine in worker.tags():
            engine.save_checkpoint(str(tmp), tag=tag, client_state={"vitok_step": state["step"]})
        weights = worker.fp32_state(state["step"])
        if self.rank == 0:
            torch.save(weights, tmp / MODEL_FILE)
            torch.save(job.task.extra_state(), tmp / TASK_STATE_FILE)
            meta = {"loop": state, "name": job.name, "params": job.params, "metrics": metrics}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str))
            for part in worker.parts:
                ds_file = _part_file(worker.parts, part, "deepspeed_config") + ".json"
                (tmp / ds_file).write_text(json.dumps(deepspeed_config(cfg, part.grad_clip)))
        name = f"checkpoint_{state['step']:08d}"
        ray.train.report(
            {**metrics, "step": state["step"]},
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=name,
        )
        shutil.rmtree(tmp, ignore_errors=True)
        torch.distributed.barrier()  # every rank's part is uploaded
        if self.rank == 0 and self.run_dir:
            storage.write_text(storage.join(self.run_dir, name, COMMITTED_FILE), "")


# ----------------------------------------------------------------------------- evaluation
def evaluate(
    job: TrainJob, worker: Worker, data: WorkerData, rank: int, step: int
) -> tuple[dict[str, float], Any]:
    """``val/<metric>`` of the job's evaluator over the whole validation split (each worker
    reads its part; ``Evaluator.compute`` reduces across workers), and the evaluator (None
    without one), which may draw what it evaluated (``log_artifacts``)."""
    if job.make_evaluator is None:
        return {}, None
    cfg = job.train
    evaluator = job.make_evaluator()
    eval_dtype, root = worker.dtype, worker.model
    if cfg.precision == "bf16":  # evaluate the fp32 weights that are saved and exported
        state = worker.fp32_state(step)
        root = fp32_copy(worker.model, state, worker.device, zero3=cfg.zero_stage == 3)
        eval_dtype = torch.float32
    eval_model = job.task.eval_module(root)
    was_training = eval_model.training
    eval_model.eval()
    torch.manual_seed(step_seed(cfg.seed + 1, rank, step))
    with torch.no_grad(), contextlib.closing(data.eval_batches()) as batches:
        for i, batch in enumerate(batches):
            if cfg.eval_batches and i >= cfg.eval_batches:
                break
            gen = torch.Generator().manual_seed(step_seed(cfg.seed + 1, rank, i))
            model_batch = job.batch_fn(_select(batch, job.columns), False, gen)
            evaluator.update(eval_model, _on_device(job, model_batch, worker.device, eval_dtype))
    eval_model.train(was_training)
    return {f"val/{k}": v for k, v in evaluator.compute().items()}, evaluator


# ----------------------------------------------------------------------------- the loop
class Loop:
    """Steps one worker through ``train.steps`` optimizer steps, from a checkpoint if any."""

    def __init__(
        self, job: TrainJob, rank: int, world: int, run_dir: str | None, splits: Mapping[str, Any]
    ) -> None:
        self.job, self.cfg, self.rank, self.world = job, job.train, rank, world
        self.worker = Worker(job)
        self.checkpointer = Checkpointer(job, self.worker, rank, run_dir)
        # train_s / eval_s: seconds in training steps and in evaluation, summed over restarts
        # (the study compares them with a trial's wall time: the rest is the platform's cost)
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
        # world: the size the open segment of the epoch runs at; segments: the epoch's
        # earlier (world, batches) segments, closed by a restart at another world size
        self.state.update(train_s=0.0, eval_s=0.0, world=world, segments=[])
        self.resumed = self.checkpointer.restore(self.state)
        self.state.setdefault("segments", [])  # a checkpoint from before segments
        resume_at_world(self.state, world)
        self.window = MetricWindow(self.state.pop("window", None))
        self.logger = None
        if rank == 0 and job.run_id and job.tracking is not None and job.tracking.enabled:
            mark = storage.join(run_dir, LOG_MARK_FILE) if run_dir else None
            self.logger = StepLogger(job, mark)
            if self.state["step"]:  # the run's page says it restarted, and from where
                tag = f"vitok.{job.metric_prefix}resumed_at_step"
                self.logger.inner.set_tags({tag: self.state["step"]})
        self.metrics: dict[str, float] = {}
        self.micro = 0
        pin = self.cfg.use_gpu and torch.cuda.is_available()  # batches land in pinned memory
        self.data = WorkerData(splits, self.cfg, rank, world, pin_memory=pin)
        self.clock = (time.perf_counter(), self.state["step"])
        self.first_step_at = 0.0  # wall clock (epoch s) when this attempt began its first step

    def run(self) -> None:
        cfg, job, state = self.cfg, self.job, self.state
        if self.resumed and self.rank == 0:
            print(f"[vitok] {job.name}: resumed at step {state['step']}", flush=True)
        monitor = None
        if self.logger and job.tracking.system_metrics:
            monitor = self.logger.inner.start_system_metrics()
        for module in (*self.worker.engines, self.worker.model):
            module.train()
        while state["step"] < cfg.steps:
            self.epoch()
        final = self.evaluate(final=True)
        times = {"time/train_s": state["train_s"], "time/eval_s": state["eval_s"]}
        times["time/first_step_at"] = self.first_step_at
        self.metrics = {**self.metrics, **final, **times}
        if self.rank == 0:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in final.items())
            print(f"[vitok] {job.name} finished at step {state['step']}: {summary}", flush=True)
            if self.logger:
                self.logger.log(final, step=state["step"])
        if monitor is not None:
            monitor.finish()
        self.save()
        if self.logger:  # send what is queued (bounded wait); the driver ends the run
            self.logger.close()

    def epoch(self) -> None:
        """Steps through the rest of the current epoch (or until the last step), reading
        from the checkpointed batch on."""
        state = self.state
        segments = [tuple(seg) for seg in state["segments"]]
        if self.data.batches_in_epoch(segments) == 0 and not segments:
            raise RuntimeError(
                f"{self.job.name}: the training split yields no full batch of "
                f"{self.cfg.batch_size} per worker ({self.world} workers); add data or lower "
                "train.batch_size"
            )
        first = state["step"] * self.cfg.grad_accum + self.micro  # micro step of batch 0
        batches = self.data.train_batches(
            state["epoch"],
            segments,
            state["batch_in_epoch"],
            transform=lambda batch, i: self.prepare_batch(batch, first + i),
        )
        with contextlib.closing(batches):
            for batch in batches:
                state["batch_in_epoch"] += 1
                if self.train_step(batch) and self.after_step():
                    return
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        state["segments"] = []

    def prepare_batch(self, batch: dict[str, torch.Tensor], micro_step: int) -> dict:
        """The task's batch of micro step ``micro_step`` (its crops and flips drawn from a
        generator seeded by it): run in the reader thread, ahead of the step."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.rank, micro_step))
        return self.job.batch_fn(_select(batch, self.job.columns), True, gen)

    def train_step(self, model_batch: dict[str, torch.Tensor]) -> bool:
        """One micro step on a prepared batch; True when it completed an optimizer step."""
        job, cfg, worker, step = self.job, self.cfg, self.worker, self.state["step"]
        started = time.perf_counter()
        self.first_step_at = self.first_step_at or time.time()
        micro_step = step * cfg.grad_accum + self.micro  # each micro batch its own draws
        torch.manual_seed(step_seed(cfg.seed, self.rank, micro_step))
        model_batch = _on_device(job, model_batch, worker.device, worker.dtype)
        loss, logs = job.task.training_step(worker.model, model_batch, step)
        losses = named_losses(loss, worker.parts)
        for part, engine in worker.pairs:  # all backwards before any update
            engine.backward(losses[part.name])
        for engine in worker.engines:  # each clips and steps its own part
            engine.step()
        self.state["train_s"] += time.perf_counter() - started
        self.micro = (self.micro + 1) % cfg.grad_accum
        self.state["samples"] += cfg.batch_size * self.world
        if self.micro != 0:
            return False
        self.state["step"] = step = step + 1
        job.task.on_optimizer_step(worker.model, step)
        if len(worker.parts) == 1:
            step_logs = {"loss": losses[worker.parts[0].name], **logs}
        else:
            step_logs = {**{f"loss/{n}": v for n, v in losses.items()}, **logs}
        self.window.add(_to_float(step_logs))
        return True

    def after_step(self) -> bool:
        """Log, evaluate and checkpoint as configured; True at the last step."""
        cfg, step = self.cfg, self.state["step"]
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.log_window(step)
        is_last = step >= cfg.steps
        if cfg.eval_every and step % cfg.eval_every == 0 and not is_last:
            import ray.train

            val = self.evaluate()
            if self.logger and val:
                self.logger.log(val, step=step)
            ray.train.report({**self.metrics, **val, "step": step})
        if not is_last and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.save()
        return is_last

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """The evaluation (its time is work); after the final one, rank 0 logs what the
        evaluator drew of the clips it evaluated (tracking: the platform's time, not work)."""
        started = time.perf_counter()
        try:
            step = self.state["step"]
            metrics, evaluator = evaluate(self.job, self.worker, self.data, self.rank, step)
        finally:
            self.state["eval_s"] += time.perf_counter() - started
        if final and self.logger and hasattr(evaluator, "log_artifacts"):
            evaluator.log_artifacts(self.logger.inner, self.job.metric_prefix)
        return metrics

    def log_window(self, step: int) -> None:
        cfg, worker = self.cfg, self.worker
        now = time.perf_counter()
        rate = (step - self.clock[1]) / max(now - self.clock[0], 1e-9)
        metrics = self.window.close()
        metrics.update(_learning_rates(worker.parts, worker.engines))
        metrics["perf/steps_per_s"] = rate
        metrics["perf/samples_per_s"] = rate * cfg.global_batch
        if self.job.tokens_per_sample:
            metrics["perf/tokens_per_s"] = rate * cfg.global_batch * self.job.tokens_per_sample
        metrics["epoch"] = self.state["epoch"]
        if self.rank == 0:
            shown = ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
            print(f"[vitok] {self.job.name} step {step}/{cfg.steps}: {shown}", flush=True)
            if self.logger:
                self.logger.log(metrics, step=step)
        self.metrics = metrics
        self.clock = (now, step)

    def save(self) -> None:
        state = {**self.state, "window": self.window.state()}
        self.checkpointer.save(state, self.metrics)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config`` holds the ``job`` and ``run_dir`` (its Ray
    Train storage: the checkpoints, and ``StepLogger``'s mark)."""
    import ray.train

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    # DeepSpeed builds its CPU comm op in torch's extensions folder (one per user): installs
    # sharing it rebuild each other's op, and a worker killed mid-build leaves a lock all
    # later workers wait on forever. So one folder per Python install, unless set.
    prefix = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "torch_extensions" / f"vitok-{prefix}"
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(default)
    if not job.train.use_gpu:
        torch.set_num_threads(max(1, round(job.train.cpus_per_worker)))
    Loop(job, rank, world, config.get("run_dir"), config["splits"]).run()


# ----------------------------------------------------------------------------- helpers
def resume_at_world(state: dict[str, Any], world: int) -> None:
    """The loop position for a (re)start at ``world`` workers: at another world size than
    the checkpoint's, the epoch's open segment is closed where it stopped, and the rows no
    worker consumed yet are split among the new workers (``read_plan.worker_order``)."""
    saved = int(state.get("world", world))
    if saved != world and state["batch_in_epoch"] > 0:
        state["segments"] = [*state["segments"], [saved, state["batch_in_epoch"]]]
        state["batch_in_epoch"] = 0
    state["world"] = world


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


def _to_float(logs: Mapping[str, Any]) -> dict[str, float]:
    """Per-step logs as floats (a tensor: its mean)."""
    return {
        k: v.detach().float().mean().item() if isinstance(v, torch.Tensor) else float(v)
        for k, v in logs.items()
    }


def _select(batch: Mapping[str, torch.Tensor], columns: tuple[str, ...]) -> dict:
    return {k: batch[k] for k in columns if k in batch}


def _on_device(job: TrainJob, batch: dict[str, torch.Tensor], device: Any, dtype: torch.dtype):
    """The task's batch on ``device``: tensors moved there, floating-point ones cast to
    ``dtype``, then the batch function's ``on_device`` if it has one."""
    moved = {
        k: v.to(device, dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        if isinstance(v, torch.Tensor)
        else v
        for k, v in batch.items()
    }
    finish = getattr(job.batch_fn, "on_device", None)
    return finish(moved, dtype) if finish is not None else moved


__all__ = [
    "Loop",
    "StepLogger",
    "train_loop_per_worker",
]
