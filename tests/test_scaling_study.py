"""The scaling study: search space, report maths, and the smoke study end to end."""

from __future__ import annotations

import dataclasses
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
from vitok.platform.storage import StorageConfig
from vitok.platform.study.report import fit_line, scaling_figure
from vitok.platform.tracking.runs import TrackingConfig

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
    from vitok.pipelines.study_tune import unique_trials

    trials = unique_trials(cfg)
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
        tracking=TrackingConfig(uri=mlflow_uri, experiment="study-test", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
        search=dataclasses.replace(cfg.search, **search),
    )


def test_trial_names_are_unique_over_the_whole_override():
    a = trial_name(("train.steps=20", "tokenizer.channels=4"))
    b = trial_name(("generator_train.steps=20", "tokenizer.channels=4"))
    assert a != b and a == "c4-train.steps20"


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
        assert row["gen/frechet_pixels"] > 0  # the fixed space every trial shares
    assert result.rows[0]["E"] * 4 == result.rows[1]["E"]
    report = Path(result.store.path("report"))
    assert (report / "scaling_E.png").stat().st_size > 1000
    text = (report / "report.md").read_text()
    assert "c8" in text
    header = next(line for line in text.splitlines() if line.startswith("| trial"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.index("gen/samples") + 1 == columns.index("gen/frechet_pixels")
    assert "gen/frechet_tokenizer_latent" not in columns  # each trial's own space: not compared
    # Everything under the storage root: committed results, checkpoints, shards, latents.
    assert set(result.store.results()) == {"c2", "c8"}
    for row in result.store.results().values():
        assert row["tokenizer_checkpoint"].startswith(str(tmp_path / "store" / "studies"))
        assert Path(row["tokenizer_checkpoint"], "model.pt").is_file()
    assert list((tmp_path / "store" / "data").glob("*/manifest.json"))
    exp = client.get_experiment_by_name("study-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    kinds = sorted(r.data.tags["vitok.kind"] for r in children)
    assert kinds == ["generator", "generator", "tokenizer", "tokenizer"]
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert "report/scaling_E.png" in parent_artifacts
    assert "R^2" in client.get_run(result.parent_run_id).data.tags["mlflow.note.content"]

    # The sweep axes are metrics of each child (for MLflow's charts); each trial's time is
    # split into training + evaluation and the platform's share.
    for run in (r for r in children if r.data.tags["vitok.kind"] == "tokenizer"):
        assert {"axis/E", "axis/log2_E", "axis/c", "time/platform_share"} <= set(run.data.metrics)
    for row in result.rows:
        assert 0 < row["time/work_s"] < row["time/trial_s"]
        assert row["time/platform_share"] == pytest.approx(
            1 - row["time/work_s"] / row["time/trial_s"]
        )
        # start-up is platform time: it fits in what is not training or evaluating
        startup = row["time/to_first_step_s"]
        assert 0 < startup < row["time/trial_s"] - row["time/work_s"]
    # The best trial (psnr:max) is a registered model version that loads and reconstructs.
    best = max(result.rows, key=lambda r: r["val/psnr"])
    assert result.best["trial"] == best["trial"]
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(result.best["uri"])
    clips = np.zeros((1, *cfg.tokenizer.input_size, 3), np.uint8)
    assert model.predict(clips).shape == clips.shape
    version = client.get_model_version(*result.best["uri"].split("/")[1:])
    assert version.tags["trial"] == best["trial"] and version.run_id == best["tokenizer_run_id"]


@pytest.mark.slow
def test_smoke_study_optuna_multi_objective(ray_local, tmp_path, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.scaling_study import run_study
    from vitok.platform.study.pareto import pareto_front

    cfg = _study_cfg(
        tmp_path, mlflow_uri, mode="optuna", num_samples=2, objectives=("psnr:max", "gflops:min")
    )
    cfg = dataclasses.replace(cfg, generator_train=None)
    result = run_study(cfg, preset_name="smoke-study")
    assert len(result.rows) == 2 and not result.failed
    db = Path(result.store.path("optuna.db"))
    assert db.exists()
    import optuna

    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{db}")
    assert len(study.directions) == 2
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2
    # The Pareto front: the best models (each registered, tagged), tagged on the trials'
    # runs for the runs table, plotted and tabled in the report and the parent's description.
    flags = pareto_front(result.rows, [("val/psnr", "max"), ("gflops", "min")])
    front = {r["trial"] for r, on in zip(result.rows, flags) if on}
    assert result.best["rule"] == "pareto front"
    assert {f["trial"] for f in result.best["front"]} == front
    client = MlflowClient(mlflow_uri)
    for row, on in zip(result.rows, flags):
        tags = client.get_run(row["tokenizer_run_id"]).data.tags
        assert tags["vitok.pareto_front"] == ("true" if on else "false")
    for entry in result.best["front"]:
        version = client.get_model_version(*entry["uri"].split("/")[1:])
        assert version.tags["pareto_front"] == "true" and version.tags["trial"] == entry["trial"]
    assert (Path(result.store.path("report")) / "pareto_front.png").stat().st_size > 1000
    parent = client.get_run(result.parent_run_id).data.tags
    assert "## Pareto front" in parent["mlflow.note.content"]
    plot = f"(get-artifact?path=report%2Fpareto_front.png&run_uuid={result.parent_run_id})"
    assert plot in parent["mlflow.note.content"]
    assert parent["vitok.best_trial"] == ",".join(f["trial"] for f in result.best["front"])
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert "report/pareto_front.png" in parent_artifacts
    # --resume with one more sample: both objectives of the finished trials are told to the
    # new sampler, and no finished trial runs again. Both values of c have run, so the
    # sample repeats one: the console says its result was reused.
    capsys.readouterr()
    more = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, num_samples=3))
    second = run_study(more, resume=True, force=True, preset_name="smoke-study")
    assert second.store.uri == result.store.uri and not second.failed
    assert "reused: this configuration already ran" in capsys.readouterr().out
    starts = [e["trial"] for e in second.store.events() if e["event"] == "started"]
    assert len(starts) == len(set(starts)) == len(second.store.results()) in (2, 3)
    told = optuna.load_study(
        study_name=cfg.name, storage=f"sqlite:///{second.store.path('optuna.db')}"
    )
    assert len(told.directions) == 2 and len(told.trials) == 3


@pytest.mark.slow
def test_a_configuration_proposed_twice_at_once_trains_once(
    ray_local, tmp_path, mlflow_uri, capsys
):
    """Optuna with two trials at a time over one configuration: both proposals start
    together; one trains, the other waits for its result and says it reused it (before, both
    trained into the same trial folder and MLflow run)."""
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.scaling_study import run_study

    cfg = _study_cfg(
        tmp_path, mlflow_uri, mode="optuna", num_samples=2, sweeps=("c=8",), max_concurrent=2
    )
    cfg = dataclasses.replace(cfg, generator_train=None)
    result = run_study(cfg, preset_name="smoke-study")
    assert [r["trial"] for r in result.rows] == ["c8"] and not result.failed
    starts = [e for e in result.store.events() if e["event"] == "started"]
    assert len(starts) == 1
    assert "trial c8 reused: this configuration already ran" in capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'tokenizer'")
    assert len(runs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("asha", [True, False], ids=["asha", "no-asha"])
def test_smoke_study_optuna_single_objective_resumes(ray_local, tmp_path, mlflow_uri, asha):
    """The default objective (psnr:max), with ASHA (the default) and without: every result
    Tune sees carries val/psnr (evaluations during training reach Tune, training-only reports
    do not); a resumed study tells the sampler the finished trials and runs only the
    remaining samples."""
    import optuna

    from vitok.pipelines.scaling_study import run_study

    cfg = _study_cfg(tmp_path, mlflow_uri, mode="optuna", num_samples=2, sweeps=("c=2,4,8",))
    search = dataclasses.replace(cfg.search, asha=asha)
    cfg = dataclasses.replace(
        cfg,
        generator_train=None,
        train=dataclasses.replace(cfg.train, eval_every=4),
        search=search,
    )
    assert cfg.search.asha == asha and cfg.search.objectives == ("psnr:max",)
    first = run_study(cfg, preset_name="smoke-study")
    assert len(first.rows) + len(first.failed) == 2, first.failed
    assert first.rows and all("val/psnr" in r for r in first.rows)
    more = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, num_samples=3))
    second = run_study(more, resume=True, force=True, preset_name="smoke-study")
    assert second.store.uri == first.store.uri
    # One more sample. TPE may propose a point already done (3 categories here): that trial
    # then finds its committed result and returns without running again.
    assert len(second.store.results()) in (2, 3)
    starts = [e["trial"] for e in second.store.events() if e["event"] == "started"]
    assert len(starts) == len(set(starts)) == len(second.store.results())
    db = Path(second.store.path("optuna.db"))
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 3  # the two told, the one run


def test_resume_refuses_a_changed_config_unless_forced(tmp_path):
    from vitok.pipelines.experiment import dump_config
    from vitok.pipelines.scaling_study import check_resumable
    from vitok.platform.study.store import StudyStore

    cfg = _study_cfg(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    store = StudyStore(str(tmp_path / "store" / "studies" / "smoke-study"))
    Path(store.uri).mkdir(parents=True)
    Path(store.path("config.yaml")).write_text(dump_config(cfg))
    check_resumable(store, cfg, force=False)  # the same config: fine
    changed = apply_overrides(cfg, ["train.steps=99", "tokenizer.channels=3"])
    with pytest.raises(SystemExit, match=r"train.steps: 12 -> 99"):
        check_resumable(store, changed, force=False)
    check_resumable(store, changed, force=True)
    assert "steps: 99" in Path(store.path("config.yaml")).read_text()


def _events(study_dir: Path) -> list[dict]:
    from vitok.platform.study.store import StudyStore

    return StudyStore(str(study_dir)).events() if study_dir.exists() else []


def kill_and_resume_args(tmp_path: Path, mlflow_uri: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "pipelines" / "scaling_study.py"),
        "--preset",
        "smoke-study",
        "--set",
        "generator_train=null",
        "--set",
        "search.sweeps=['c=2,4,8']",
        "--set",
        f"storage.root={tmp_path / 'store'}",
        "--set",
        f"tracking.uri={mlflow_uri}",
        "--set",
        "tracking.system_metrics=false",
    ]


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path, mlflow_uri):
    args = kill_and_resume_args(tmp_path, mlflow_uri)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    study_dir = tmp_path / "store" / "studies" / "smoke-study"
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
            time.sleep(1)
        else:
            pytest.fail("the first trial never finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the second trial is mid-way: no grace period
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
    assert not list(tmp_path.glob("results*")), "nothing under the working directory"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vitok")
    runs = client.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'tokenizer'")
    assert sorted(r.info.run_name for r in runs) == ["c2", "c4", "c8"]  # one run per trial
    assert {r.info.status for r in runs} == {"FINISHED"}  # the killed trial's run reopened


@pytest.mark.parametrize(
    "name", sorted(__import__("vitok.pipelines.presets", fromlist=["PRESETS"]).PRESETS)
)
def test_every_preset_round_trips_through_yaml(name):
    from vitok.pipelines.experiment import ExperimentConfig
    from vitok.platform.config import from_yaml, to_yaml

    cfg = preset(name)
    assert from_yaml(ExperimentConfig, to_yaml(cfg)) == cfg
    assert cfg.tokenizer.input_size[0] == cfg.data.frames


def test_derived_input_size_is_refused_when_set_to_another_value():
    """tokenizer.input_size follows data.frames and data.crop/size: an override of the data
    moves it along, setting it equal (as a dumped config does) is fine, another value is an
    error that names the full path, from --set, from YAML and in Python alike."""
    from vitok.pipelines.experiment import ExperimentConfig
    from vitok.platform.config import from_yaml, to_yaml

    cfg = preset("demo")
    resized = apply_overrides(cfg, ["data.frames=4", "data.crop=[16,16]"])
    assert resized.tokenizer.input_size == (4, 16, 16)
    same = f"tokenizer.input_size={list(cfg.tokenizer.input_size)}"
    assert apply_overrides(cfg, [same]) == cfg
    message = "tokenizer.input_size=(4, 8, 8) is derived from data.frames and data.crop/size"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(cfg, ["tokenizer.input_size=[4,8,8]"])
    edited = to_yaml(cfg).replace(f"frames: {cfg.data.frames}", "frames: 4", 1)
    with pytest.raises(ValueError, match="leave it unset"):
        from_yaml(ExperimentConfig, edited)
    with pytest.raises(ValueError, match="tokenizer.input_size="):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, frames=4))
    assert ExperimentConfig().tokenizer.input_size == (16, 64, 64)  # unset: derived


def test_paper_preset_on_a_laptop_is_refused_before_compute(ray_local, tmp_path, capsys):
    """No LPIPS/Inception/I3D files and no GPU: one refusal naming every setting to fix."""
    from vitok.pipelines.scaling_study import main

    (tmp_path / "ucf" / "ApplyEyeMakeup").mkdir(parents=True)
    argv = ["--preset", "paper-video-ucf", "--data", str(tmp_path / "ucf")]
    argv += ["--set", f"storage.root={tmp_path / 'store'}"]
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    for needle in (
        "loss.lpips_weight=1.0 needs loss.vgg_weights=",
        "--set loss.lpips_weight=0",
        "metrics.inception_weights=<pt_inception",
        "metrics.i3d_weights=<i3d_torchscript.pt>",
        "train: one worker needs {GPU: 1, CPU: 8}",
        "--set train.use_gpu=false",
    ):
        assert needle in message, message
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_autoscaling_cluster_is_asked_for_the_gpus(ray_local, tmp_path, monkeypatch):
    """With node types that have GPUs, the same preset passes the resource check and the
    autoscaler is asked for the largest GPU stage (8 workers of {GPU: 1, CPU: 8})."""
    from vitok.pipelines import scaling_study
    from vitok.platform.study import cluster

    monkeypatch.setenv("VITOK_AUTOSCALING_CONFIG", str(REPO / "cluster.yaml"))
    asked = []
    monkeypatch.setattr(
        cluster, "request_and_wait", lambda bundles, **kw: asked.append(bundles) or True
    )
    (tmp_path / "ucf").mkdir()
    cfg = apply_overrides(
        preset("paper-video-ucf"),
        [f"data.sources=['{tmp_path / 'ucf'}']", "loss.lpips_weight=0", "metrics.require=[]"],
    )
    assert scaling_study.preflight(cfg) is True
    assert asked == [[{"CPU": 8.0, "GPU": 1.0}] * 8]
    too_big = apply_overrides(cfg, ["train.num_workers=64"])
    with pytest.raises(SystemExit, match="train.num_workers=64 asks for 64"):
        scaling_study.preflight(too_big)
