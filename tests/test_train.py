"""The generic Ray Train + DeepSpeed loop, with a toy task (the tokenizer's has its own test)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitok.platform.config import apply_overrides
from vitok.platform.tracking import TrackingConfig, start_run
from vitok.platform.train import (
    TrainConfig,
    TrainJob,
    deepspeed_config,
    load_checkpoint_state,
    load_model_state,
    lr_multiplier,
    run_training,
)


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
    return {"x": batch["x"].float()}


def toy_datasets(ray):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 16)).astype("float32")
    rows = (rng.normal(size=(256, 4)).astype("float32") @ basis) / 4
    train = ray.data.from_items([{"x": r} for r in rows[:224]])
    val = ray.data.from_items([{"x": r} for r in rows[224:]])
    return {"train": train, "val": val}


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


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_toy_training_two_workers_lowers_loss(ray_local, tmp_path, mlflow_uri, zero_stage):
    tracking = TrackingConfig(uri=mlflow_uri, experiment="toy", system_metrics=False)
    name = f"toy-z{zero_stage}"
    run_id = start_run(tracking, name, resume_file=tmp_path / name / "mlflow_run_id")
    cfg = TrainConfig(
        steps=40,
        batch_size=8,
        lr=3e-2,
        warmup_steps=2,
        num_workers=2,
        zero_stage=zero_stage,
        checkpoint_every=20,
        log_every=10,
        cpus_per_worker=0.5,
    )
    job = TrainJob(
        name=name,
        task=ToyTask(),
        train=cfg,
        batch_fn=toy_batch,
        make_evaluator=ToyEvaluator,
        columns=("x",),
        tracking=tracking,
        run_id=run_id,
    )
    result = run_training(job, toy_datasets(ray_local), storage_path=tmp_path / "ray")
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


@pytest.mark.slow
def test_failure_resumes_from_checkpoint_same_steps_one_run(ray_local, tmp_path, mlflow_uri):
    tracking = TrackingConfig(uri=mlflow_uri, experiment="toy", system_metrics=False)
    name = f"toy-fail-{tmp_path.name}"
    resume_file = tmp_path / "mlflow_run_id"
    run_id = start_run(tracking, name, resume_file=resume_file)
    cfg = TrainConfig(
        steps=30,
        batch_size=8,
        lr=3e-2,
        warmup_steps=2,
        num_workers=2,
        checkpoint_every=10,
        log_every=5,
        cpus_per_worker=0.5,
        max_failures=2,
    )
    job = TrainJob(
        name=name,
        task=ToyTask(),
        train=cfg,
        batch_fn=toy_batch,
        make_evaluator=ToyEvaluator,
        columns=("x",),
        tracking=tracking,
        run_id=run_id,
        fail_once_at_step=15,
    )
    result = run_training(job, toy_datasets(ray_local), storage_path=tmp_path / "ray")
    state = load_checkpoint_state(result.checkpoint_dir)
    assert state["loop"]["step"] == 30
    # The restarted worker group resumed at step 10, so steps 11-15 were logged twice
    # at most, never more than the run's 30 steps; and it is still one MLflow run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps == [5, 10, 15, 20, 25, 30]
    assert start_run(tracking, name, resume_file=resume_file) == run_id
    runs = client.search_runs(
        [client.get_experiment_by_name("toy").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )
    assert len(runs) == 1
    assert Path(result.storage_dir).exists()
