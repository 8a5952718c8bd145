"""The study's parent MLflow run has one owner (``tracking.owned_run``): whatever fails after
it starts, it ends FAILED with the error in its ``vitok.error`` tag, never RUNNING."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vitok.pipelines.presets import preset
from vitok.platform import storage
from vitok.platform.data.prepare import PreparedData
from vitok.platform.storage import StorageConfig
from vitok.platform.tracking.runs import TrackingConfig


def _cfg(tmp_path: Path, mlflow_uri: str):
    cfg = preset("smoke-study")
    return dataclasses.replace(
        cfg,
        tracking=TrackingConfig(uri=mlflow_uri, experiment="parent-run", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
    )


def _prepared(cfg, root: str) -> PreparedData:
    """What ``prepare`` returns, without decoding anything: these tests fail later on."""
    return PreparedData(
        root=storage.join(root, "data", "fake"),
        manifest={"config": {}, "files": {"train": [], "val": []}},
        label_map={},
        rejects_path="",
        num_rejects=0,
        num_train=8,
        num_val=4,
        config_hash="fake",
        reused=True,
    )


def _raise(message: str):
    def fail(*args, **kwargs):
        raise RuntimeError(message)

    return fail


def _parent(mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("parent-run")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'study'")
    return parent


@pytest.fixture
def no_trials(monkeypatch):
    """A study with nothing to run: no Tune run, no trial, no data decoded."""
    from vitok.pipelines import scaling_study

    monkeypatch.setattr("vitok.platform.data.prepare.prepare", _prepared)
    monkeypatch.setattr(scaling_study, "tune_run", lambda *a, **k: (None, None))
    return scaling_study


@pytest.mark.parametrize("where", ["tune_run", "collect", "write_report", "register_best"])
def test_a_failure_after_the_parent_run_starts_ends_it_failed(
    ray_local, tmp_path, mlflow_uri, no_trials, monkeypatch, where
):
    scaling_study = no_trials
    monkeypatch.setattr(scaling_study, where, _raise(f"boom in {where}"))
    if where in ("write_report", "register_best"):  # reached only when a trial finished
        row = {"trial": "c2", "E": 64, "val/psnr": 12.0}
        monkeypatch.setattr(scaling_study, "collect", lambda *a, **k: ([row], []))
    cfg = _cfg(tmp_path, mlflow_uri)
    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        scaling_study.run_study(cfg, preset_name="smoke-study")
    parent = _parent(mlflow_uri)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["vitok.error"] == f"RuntimeError: boom in {where}"
    study = tmp_path / "store" / "studies" / "smoke-study"
    assert not (study / "driver.json").exists()  # the lease is given back too


def test_a_study_where_no_trial_finished_ends_failed_and_says_why(
    ray_local, tmp_path, mlflow_uri, no_trials, monkeypatch
):
    scaling_study = no_trials
    lost = [{"trial": "c2", "error": "RuntimeError: worker died"}]
    monkeypatch.setattr(scaling_study, "collect", lambda *a, **k: ([], lost))
    result = scaling_study.run_study(_cfg(tmp_path, mlflow_uri), preset_name="smoke-study")
    assert result.rows == [] and result.failed == lost
    parent = _parent(mlflow_uri)
    assert parent.info.run_id == result.parent_run_id
    assert parent.info.status == "FAILED"
    assert "no trial finished" in parent.data.tags["vitok.error"]
    assert "c2: RuntimeError: worker died" in parent.data.tags["vitok.error"]


def test_a_resumed_run_that_finishes_drops_the_earlier_error(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from vitok.platform.tracking.runs import owned_run

    tracking = TrackingConfig(uri=mlflow_uri, experiment="owned", system_metrics=False)
    resume_file = tmp_path / "mlflow_run_id"
    with pytest.raises(ValueError, match="bad step"):
        with owned_run(tracking, "stage", resume_file=resume_file):
            raise ValueError("bad step")
    run_id = resume_file.read_text().strip()
    client = MlflowClient(mlflow_uri)
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["vitok.error"] == "ValueError: bad step"
    with owned_run(tracking, "stage", resume_file=resume_file) as logger:
        assert logger.run_id == run_id
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and "vitok.error" not in finished.data.tags
