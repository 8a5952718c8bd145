"""The generic Ray Train + DeepSpeed loop, with a toy task (the tokenizer's has its own test)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitok.platform.config import apply_overrides
from vitok.platform.tracking.runs import TrackingConfig, start_run
from vitok.platform.training.train import (
    TrainConfig,
    TrainJob,
    deepspeed_config,
    load_checkpoint_state,
    load_model_state,
    lr_multiplier,
    run_training,
)
from vitok.platform.training.train_data import split_from_arrays


class ToyTask:
    """A linear auto-encoder on 16-d vectors: enough to see the loss fall."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 16))

    def param_groups(self, model):
        return [{"params": list(model.parameters())}]

    def training_step(self, model, batch, step):
        x = batch["x"]
        loss = ((model(x) - x) ** 2).mean()
        return loss, {"mse": loss.detach()}

    def on_optimizer_step(self, model, step):
        pass

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def eval_module(self, model):
        return model


class ToyEvaluator:
    def __init__(self):
        self.sum, self.n = 0.0, 0

    def update(self, model, batch):
        x = batch["x"]
        self.sum += ((model(x) - x) ** 2).mean(dim=1).sum().item()
        self.n += x.shape[0]

    def compute(self):
        import torch.distributed as dist

        t = torch.tensor([self.sum, float(self.n)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return {"mse": (t[0] / t[1]).item(), "count": t[1].item()}


def toy_batch(batch, training, gen):
    return {"x": batch["x"].float(), "id": batch["id"]}


def toy_datasets():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 16)).astype("float32")
    rows = (rng.normal(size=(256, 4)).astype("float32") @ basis) / 4
    ids = np.arange(256)  # which row each is, so a test can see the data order
    return {
        "train": split_from_arrays({"x": rows[:224], "id": ids[:224]}),
        "val": split_from_arrays({"x": rows[224:], "id": ids[224:]}),
    }


def test_train_config_validation_and_overrides():
    with pytest.raises(ValueError, match="train.zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(precision="fp16")
    cfg = apply_overrides(TrainConfig(), ["zero_stage=2", "lr=3e-4"])
    assert cfg.zero_stage == 2 and cfg.lr == 3e-4
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == cfg.global_batch


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    fn = lr_multiplier(cfg)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.55, abs=1e-6)
    assert fn(100) == pytest.approx(0.1)
    assert all(fn(i) >= fn(i + 1) for i in range(10, 100))


@pytest.fixture(scope="module", autouse=True)
def _pickle_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


TOY_STEPS, TOY_LOG_EVERY, TOY_CHECKPOINT_EVERY = 40, 10, 20


def toy_job(name: str, tracking: TrackingConfig, run_id: str, zero_stage: int = 0, task=None):
    """Two workers, 40 steps, a checkpoint every 20, a logged window every 10."""
    cfg = TrainConfig(
        steps=TOY_STEPS,
        batch_size=8,
        lr=3e-2,
        warmup_steps=2,
        num_workers=2,
        zero_stage=zero_stage,
        checkpoint_every=TOY_CHECKPOINT_EVERY,
        log_every=TOY_LOG_EVERY,
        cpus_per_worker=0.5,
        max_failures=2,
    )
    return TrainJob(
        name=name,
        task=task or ToyTask(),
        train=cfg,
        batch_fn=toy_batch,
        make_evaluator=ToyEvaluator,
        columns=("x", "id"),
        tracking=tracking,
        run_id=run_id,
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """The toy job at ZeRO 0, never killed: (result, MLflow URI, run id, the folder of its
    rows-<rank> traces)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(uri=uri, experiment="toy", system_metrics=False)
    run_id = start_run(tracking, "toy-z0", resume_file=tmp_path / "mlflow_run_id")
    job = toy_job("toy-z0", tracking, run_id, task=KillOnce(ToyTask(), (), tmp_path))
    result = run_training(job, toy_datasets(), storage_path=tmp_path / "ray")
    return result, uri, run_id, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_toy_training_two_workers_lowers_loss(ray_local, request, tmp_path, mlflow_uri, zero_stage):
    if zero_stage == 0:
        result, mlflow_uri, run_id, _ = request.getfixturevalue("uninterrupted")
    else:
        tracking = TrackingConfig(uri=mlflow_uri, experiment="toy", system_metrics=False)
        name = f"toy-z{zero_stage}"
        run_id = start_run(tracking, name, resume_file=tmp_path / name / "mlflow_run_id")
        job = toy_job(name, tracking, run_id, zero_stage)
        result = run_training(job, toy_datasets(), storage_path=tmp_path / "ray")
    assert result.checkpoint_dir is not None
    state = load_checkpoint_state(result.checkpoint_dir)
    assert state["loop"]["step"] == 40
    weights = load_model_state(result.checkpoint_dir)
    assert set(weights) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    # The whole validation split (32 rows) was seen, across both workers.
    assert result.metrics["val/count"] == 32
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.5
    assert client.get_metric_history(run_id, "val/mse")[-1].value < losses[0]


class KillOnce:
    """Test-side fault: wraps a task and SIGKILLs its own Ray Train worker process (rank 0,
    the one that logs to MLflow) in the middle of each optimizer step of ``at_steps``, once
    per step (a marker file, written first, remembers). Rank 0 appends ``<pid> <step>`` of
    every step it starts to ``folder/trace``; every rank appends ``<step> <row ids>`` of
    every step to ``folder/rows-<rank>``."""

    def __init__(self, task, at_steps: tuple[int, ...], folder: Path) -> None:
        self.task, self.at_steps, self.folder = task, at_steps, folder

    def training_step(self, model, batch, step):
        import torch.distributed as dist

        ids = " ".join(str(i) for i in batch["id"].tolist())
        with open(self.folder / f"rows-{dist.get_rank()}", "a") as fh:
            fh.write(f"{step} {ids}\n")
        if dist.get_rank() != 0:
            return self.task.training_step(model, batch, step)
        with open(self.folder / "trace", "a") as fh:
            fh.write(f"{os.getpid()} {step}\n")
        out = self.task.training_step(model, batch, step)  # the forward is done
        marker = self.folder / f"killed-{step}"
        if step in self.at_steps and not marker.exists():
            marker.write_text(f"killed pid {os.getpid()} in step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    def __getattr__(self, name):  # every other Task method is the wrapped task's
        if name.startswith("__") or "task" not in self.__dict__:  # (unpickling)
            raise AttributeError(name)
        return getattr(self.task, name)


@pytest.mark.slow
def test_worker_killed_mid_step_resumes_equal_to_uninterrupted(
    uninterrupted, ray_local, tmp_path, mlflow_uri
):
    """SIGKILL of rank 0 in step 22, just after the checkpoint at 20 (most likely before Ray
    Train's controller polled that report), and in step 34 (after the window logged at 30):
    both times the restarted group resumes at 20, trains every step on the same rows as the
    uninterrupted run (both ranks, steps run again included), and it ends as the
    uninterrupted run did (same curve, weights within 1e-5, CPU fp32) in one MLflow run
    holding each step once."""
    from mlflow.tracking import MlflowClient

    tracking = TrackingConfig(uri=mlflow_uri, experiment="toy", system_metrics=False)
    name = f"toy-kill-{tmp_path.name}"
    resume_file = tmp_path / "mlflow_run_id"
    run_id = start_run(tracking, name, resume_file=resume_file)
    job = toy_job(name, tracking, run_id, task=KillOnce(ToyTask(), (21, 33), tmp_path))
    result = run_training(job, toy_datasets(), storage_path=tmp_path / "ray")

    base, base_uri, base_run, base_rows = uninterrupted
    trace = [line.split() for line in (tmp_path / "trace").read_text().splitlines()]
    first_steps = [int(s) for i, (p, s) in enumerate(trace) if i == 0 or trace[i - 1][0] != p]
    assert first_steps == [0, 20, 20]  # two kills, each resumed from the checkpoint at 20
    for rank in (0, 1):  # the data order is identical after the kills, on both workers
        want = dict(_rows_by_step(base_rows / f"rows-{rank}"))
        got = _rows_by_step(tmp_path / f"rows-{rank}")
        assert sorted(want) == list(range(TOY_STEPS)) and len(got) > TOY_STEPS
        assert all(rows == want[step] for step, rows in got), rank
        assert len({tuple(r) for r in want.values()}) == TOY_STEPS  # batches do differ
    assert load_checkpoint_state(result.checkpoint_dir)["loop"]["step"] == TOY_STEPS
    expected = load_model_state(base.checkpoint_dir)
    weights = load_model_state(result.checkpoint_dir)
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5

    client, base_client = MlflowClient(mlflow_uri), MlflowClient(base_uri)
    for key in ("train/loss", "train/mse", "train/lr"):
        history = client.get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == list(range(TOY_LOG_EVERY, TOY_STEPS + 1, TOY_LOG_EVERY)), key
        want = {m.step: m.value for m in base_client.get_metric_history(base_run, key)}
        assert {m.step: m.value for m in history} == pytest.approx(want, abs=1e-6), key
    # Step 30 was logged before the kill; the resumed group re-ran it but did not log it.
    (at_30,) = [m for m in client.get_metric_history(run_id, "train/loss") if m.step == 30]
    assert at_30.timestamp / 1000 <= (tmp_path / "killed-33").stat().st_mtime
    assert start_run(tracking, name, resume_file=resume_file) == run_id
    runs = client.search_runs(
        [client.get_experiment_by_name("toy").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )
    assert len(runs) == 1


@pytest.mark.slow
def test_a_restart_at_one_worker_sees_each_clip_once_in_the_epoch(ray_local, tmp_path):
    """A job at two workers stops after 5 steps, in the middle of its first epoch (14 steps
    of 2 x 8 rows); the same job restarted at one worker resumes there (from the
    checkpoint, whose loop state holds the world size) and trains on the rows the epoch has
    left: across both runs every one of the 224 rows is seen exactly once in epoch 0."""
    import dataclasses

    def job(workers: int, steps: int) -> TrainJob:
        base = toy_job("toy-resize", None, None, task=KillOnce(ToyTask(), (), tmp_path))
        cfg = dataclasses.replace(base.train, num_workers=workers, steps=steps, max_failures=0)
        return dataclasses.replace(base, train=dataclasses.replace(cfg, checkpoint_every=5))

    run_training(job(2, 5), toy_datasets(), storage_path=tmp_path / "ray")
    # The rest of epoch 0 at one worker: (224 - 5 x 16) / 8 = 18 steps, then one of epoch 1.
    result = run_training(job(1, 24), toy_datasets(), storage_path=tmp_path / "ray")
    assert load_checkpoint_state(result.checkpoint_dir)["loop"]["step"] == 24
    rank0, rank1 = (_rows_by_step(tmp_path / f"rows-{rank}") for rank in (0, 1))
    assert [step for step, _ in rank0] == list(range(24))  # 0-4 with rank 1, then alone
    assert [step for step, _ in rank1] == list(range(5))
    epoch0 = [r for step, rows in rank0 + rank1 if step < 5 + 18 for r in rows]
    assert sorted(epoch0) == list(range(224))  # every row of the split once


def _rows_by_step(path: Path) -> list[tuple[int, list[int]]]:
    """(step, row ids) of every step a worker ran, in the order it ran them."""
    out = []
    for line in path.read_text().splitlines():
        step, *ids = (int(v) for v in line.split())
        out.append((step, ids))
    return out


def test_train_config_errors_name_their_section():
    """The same TrainConfig sits at train, stage2 and generator_train: an error names the one
    that was set (a bare TrainConfig says train.)."""
    from vitok.pipelines.presets import preset
    from vitok.platform.config import apply_overrides

    cfg = preset("smoke-study")
    for override, message in (
        ("generator_train.steps=0", "generator_train.steps=0 must be > 0"),
        ("stage2.zero_stage=4", "stage2.zero_stage=4 is not allowed"),
        ("generator_train.betas=[0.9,2.0]", "generator_train.betas[1]=2.0 must lie in"),
        ("train.steps=0", "train.steps=0 must be > 0"),
    ):
        with pytest.raises(ValueError) as err:
            apply_overrides(cfg, [override])
        assert str(err.value).startswith(message), str(err.value)
