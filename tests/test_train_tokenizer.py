"""Tokenizer training end to end on a local Ray: real clips, 2 workers, DeepSpeed, MLflow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from vitok.pipelines.experiment import ExperimentConfig
from vitok.pipelines.presets import smoke, tokenizer_for
from vitok.platform.data import DataConfig, prepare
from vitok.platform.storage import StorageConfig
from vitok.platform.tracking import TrackingConfig
from vitok.platform.train import TrainConfig


def real_clip_config(tmp_path: Path, mlflow_uri: str) -> ExperimentConfig:
    data = DataConfig(
        sources=("samples",),
        frames=4,
        fps=8.0,
        size=(40, 40),
        crop=(32, 32),
        clips_per_video=6,
        val_fraction=0.25,
    )
    base = smoke()
    return dataclasses.replace(
        base,
        name="real",
        data=data,
        tokenizer=tokenizer_for(data, "N-N/2x8", channels=8),
        train=TrainConfig(
            steps=40,
            batch_size=4,
            lr=2e-3,
            warmup_steps=4,
            num_workers=2,
            cpus_per_worker=0.5,
            zero_stage=2,
            eval_every=10,
            checkpoint_every=20,
            log_every=10,
        ),
        stage2=TrainConfig(
            steps=6,
            batch_size=4,
            lr=5e-4,
            warmup_steps=1,
            num_workers=2,
            cpus_per_worker=0.5,
            checkpoint_every=0,
            log_every=3,
        ),
        tracking=TrackingConfig(uri=mlflow_uri, experiment="tokenizer-test", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
    )


@pytest.mark.slow
def test_tokenizer_training_real_clips_two_workers(ray_local, tmp_path, mlflow_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.tokenizer_stage import run_tokenizer

    cfg = real_clip_config(tmp_path, mlflow_uri)
    prepared = prepare(cfg.data, cfg.storage.uri, progress=False)
    assert prepared.num_train >= 8 and prepared.num_val >= 2
    run = run_tokenizer(cfg, prepared)
    client = MlflowClient(mlflow_uri)

    # Stage 1 lowered the loss and raised PSNR over the whole validation split.
    losses = [m.value for m in client.get_metric_history(run.run_id, "train/loss")]
    assert losses[-1] < losses[0]
    psnr = sorted(client.get_metric_history(run.run_id, "val/psnr"), key=lambda m: m.step)
    assert psnr[-1].value > psnr[0].value + 1.0, [p.value for p in psnr]
    # Stage 2 ran on the same run (discriminator terms logged), ending at its own step count.
    assert client.get_metric_history(run.run_id, "stage2/train/disc_loss")
    assert client.get_metric_history(run.run_id, "stage2/val/psnr")
    assert run.stage2 is not None and run.stage2.metrics["step"] == 6

    data = client.get_run(run.run_id).data
    assert data.params["variant"] == "N-N/2x8" and int(data.params["E"]) == 2 * 4 * 4 * 8
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "reconstructions"} <= artifacts
    recon = {a.path for a in client.list_artifacts(run.run_id, "reconstructions")}
    assert recon == {"reconstructions/grid.png", "reconstructions/side_by_side.mp4"}

    # The logged MLflow model loads back and reconstructs uint8 clips.
    model = mlflow.pyfunc.load_model(data.tags["tokenizer_model_uri"])
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    out = model.predict(clips)
    assert out.shape == clips.shape and out.dtype == np.uint8

    # Running the same experiment again continues the same MLflow run (no duplicate).
    from vitok.platform.tracking import start_run

    again = start_run(cfg.tracking, cfg.name, resume_file=f"{cfg.run_dir(cfg.name)}/mlflow_run_id")
    assert again == run.run_id
