"""The scaling study: search space, report maths, and the smoke study end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitok.pipelines.presets import preset
from vitok.pipelines.search import SearchConfig, trial_name
from vitok.platform.config import apply_overrides
from vitok.platform.report import fit_line, scaling_figure
from vitok.platform.tracking import TrackingConfig

REPO = Path(__file__).resolve().parents[1]


def test_grid_trials_are_the_union_of_sweep_products():
    search = SearchConfig(sweeps=("p=4,8 c=4,8", "encoder=N,T c=4"))
    trials = search.trials()
    assert len(trials) == 6
    assert ("tokenizer.channels=4", "tokenizer.patch=4") in trials
    assert ("tokenizer.channels=4", "tokenizer.encoder_size=T") in trials
    assert search.space() == {
        "tokenizer.patch": ["4", "8"],
        "tokenizer.channels": ["4", "8"],
        "tokenizer.encoder_size": ["N", "T"],
    }
    assert trial_name(trials[0]) == "c4-p4"


def test_search_config_errors_name_the_field():
    with pytest.raises(ValueError, match="search.sweeps"):
        SearchConfig(sweeps=("c4,8",))
    with pytest.raises(ValueError, match="search.objectives"):
        SearchConfig(objectives=("psnr:up",))
    with pytest.raises(ValueError, match="search.mode"):
        SearchConfig(mode="random")


def test_demo_preset_trials_resolve_to_valid_distinct_configs():
    cfg = preset("demo")
    from vitok.pipelines.scaling_study import _unique_trials

    trials = _unique_trials(cfg)
    resolved = [apply_overrides(cfg, list(t)) for t in trials]
    es = sorted({r.tokenizer.latent_floats for r in resolved})
    assert len(es) >= 4  # an E sweep the fit can mean something on
    assert {r.tokenizer.encoder_size for r in resolved} >= {"N", "M", "T"}
    assert {r.tokenizer.decoder_size for r in resolved} >= {"N", "M", "T"}


def test_fit_line_recovers_slope_and_r2():
    x = np.arange(10.0)
    fit = fit_line(x, 2 * x + 1)
    assert fit.slope == pytest.approx(2) and fit.intercept == pytest.approx(1)
    assert fit.r2 == pytest.approx(1.0)
    noisy = fit_line(x, np.random.default_rng(0).normal(size=10))
    assert noisy.r2 < 0.5
    assert fit_line([1, 1, 1], [1, 2, 3]) is None  # constant x: no fit


def test_scaling_figure_reports_fits_per_metric():
    rows = [
        {"trial": f"t{i}", "E": 2**i, "val/psnr": 10 + 2 * i, "val/ssim": 0.1 * i}
        for i in range(4, 9)
    ]
    fig, fits = scaling_figure(
        rows, "E", [("val/psnr", "PSNR"), ("val/fid", "rFID")], x_label="E", title="t", log2_x=True
    )
    assert set(fits) == {"val/psnr"}  # rFID has no values: no panel
    assert fits["val/psnr"].slope == pytest.approx(2.0)
    assert len(fig.axes) == 1


def _study_cfg(tmp_path: Path, mlflow_uri: str, **search):
    cfg = preset("smoke-study")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, output_root=str(tmp_path / "data")),
        tracking=TrackingConfig(uri=mlflow_uri, experiment="study-test", system_metrics=False),
        results_dir=str(tmp_path / "results"),
        search=dataclasses.replace(cfg.search, **search),
    )


@pytest.mark.slow
def test_smoke_study_grid_end_to_end(ray_local, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.scaling_study import run_study

    cfg = _study_cfg(tmp_path, mlflow_uri)
    result = run_study(cfg, preset_name="smoke-study")
    assert [r["trial"] for r in result.rows] == ["c2", "c8"] and not result.failed
    client = MlflowClient(mlflow_uri)
    for row in result.rows:
        # The study row carries the trial's own final numbers, with the sample count beside
        # the generation metric.
        final = client.get_run(row["tokenizer_run_id"]).data.metrics
        assert row["val/psnr"] == pytest.approx(final["final/psnr"], rel=1e-12)
        assert row["gen/samples"] == cfg.metrics.gen_samples
        assert "gen/frechet_tokenizer_latent" in row
    assert result.rows[0]["E"] * 4 == result.rows[1]["E"]
    report = result.study_dir / "report"
    assert (report / "scaling_E.png").stat().st_size > 1000
    text = (report / "report.md").read_text()
    assert "c8" in text
    header = next(line for line in text.splitlines() if line.startswith("| trial"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.index("gen/samples") + 1 == columns.index("gen/frechet_tokenizer_latent")
    exp = client.get_experiment_by_name("study-test")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    kinds = sorted(r.data.tags["vitok.kind"] for r in children)
    assert kinds == ["generator", "generator", "tokenizer", "tokenizer"]
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert "report/scaling_E.png" in parent_artifacts


@pytest.mark.slow
def test_smoke_study_optuna_multi_objective(ray_local, tmp_path, mlflow_uri):
    from vitok.pipelines.scaling_study import run_study

    cfg = _study_cfg(
        tmp_path, mlflow_uri, mode="optuna", num_samples=2, objectives=("psnr:max", "gflops:min")
    )
    cfg = dataclasses.replace(cfg, generator_train=None)
    result = run_study(cfg, preset_name="smoke-study")
    assert len(result.rows) == 2 and not result.failed
    assert (result.study_dir / "optuna.db").exists()
    import optuna

    study = optuna.load_study(
        study_name=cfg.name, storage=f"sqlite:///{result.study_dir / 'optuna.db'}"
    )
    assert len(study.directions) == 2
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2


def _events(study_dir: Path) -> list[dict]:
    path = study_dir / "trial_starts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path, mlflow_uri):
    args = [
        sys.executable,
        str(REPO / "pipelines" / "scaling_study.py"),
        "--preset",
        "smoke-study",
        "--set",
        "generator_train=null",
        "--set",
        "search.sweeps=['c=2,4,8']",
        "--set",
        f"results_dir={tmp_path / 'results'}",
        "--set",
        f"data.output_root={tmp_path / 'data'}",
        "--set",
        f"tracking.uri={mlflow_uri}",
        "--set",
        "tracking.system_metrics=false",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    study_dir = tmp_path / "results" / "smoke-study"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            events = _events(study_dir)
            if sum(e["event"] == "started" for e in events) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(2)
        else:
            pytest.fail("the first trial never finished")
        time.sleep(5)  # let Tune write its experiment state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = {e["trial"] for e in _events(study_dir) if e["event"] == "finished"}
    assert finished_before and len(finished_before) < 3

    resumed = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    events = _events(study_dir)
    for trial in finished_before:
        assert sum(e["trial"] == trial and e["event"] == "started" for e in events) == 1
    assert {e["trial"] for e in events if e["event"] == "finished"} == {"c2", "c4", "c8"}
    assert "3 trials finished" in resumed.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vitok")
    runs = client.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'tokenizer'")
    names = sorted(r.info.run_name for r in runs)
    assert names == ["c2", "c4", "c8"]  # one run per trial: a resumed trial kept its run


@pytest.mark.parametrize(
    "name", sorted(__import__("vitok.pipelines.presets", fromlist=["PRESETS"]).PRESETS)
)
def test_every_preset_round_trips_through_yaml(name):
    from vitok.pipelines.experiment import ExperimentConfig
    from vitok.platform.config import from_yaml, to_yaml

    cfg = preset(name)
    assert from_yaml(ExperimentConfig, to_yaml(cfg)) == cfg
    assert cfg.tokenizer.input_size[0] == cfg.data.frames
