"""Study settings that cannot act are refused before compute, naming the fields: Optuna's
settings under a grid, ASHA with nothing to compare, an objective no trial produces. Where a
combination is legitimate (ASHA left to its default with one evaluation per trial), the
study says what it does instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vitok.pipelines.presets import PRESETS, preset
from vitok.pipelines.search import SearchConfig
from vitok.platform.config import apply_overrides


@pytest.mark.parametrize(
    "field,value",
    [("num_samples", 4), ("seed", 3), ("asha", True), ("asha", False), ("asha_grace_period", 2)],
)
def test_a_grid_refuses_what_only_optuna_uses(field, value):
    with pytest.raises(ValueError, match=rf"search\.{field}={value!r}.*search\.mode='grid'"):
        SearchConfig(mode="grid", sweeps=("c=2,4",), **{field: value})
    # The same through the command line, on the preset the README runs.
    with pytest.raises(ValueError, match=rf"search\.{field}"):
        apply_overrides(preset("demo"), [f"search.{field}={str(value).lower()}"])
    optuna = SearchConfig(mode="optuna", sweeps=("c=2,4",), **{field: value})
    assert getattr(optuna, field) == value


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_preset_sets_what_its_search_mode_ignores(name):
    search = preset(name).search
    if search.mode == "grid":
        unused = ("num_samples", "seed", "asha", "asha_grace_period")
        assert all(getattr(search, f) is None for f in unused), search


def test_optuna_defaults_apply_when_unset():
    search = SearchConfig(mode="optuna", sweeps=("c=2,4",))
    assert (search.samples, search.sampler_seed, search.grace_period) == (8, 0, 1)
    search = SearchConfig(mode="optuna", sweeps=("c=2,4",), num_samples=3, seed=5)
    assert (search.samples, search.sampler_seed) == (3, 5)


def test_optuna_without_axes_is_refused():
    with pytest.raises(ValueError, match=r"search\.mode='optuna' needs search\.sweeps"):
        SearchConfig(mode="optuna")


def test_asha_on_several_objectives_is_refused():
    with pytest.raises(ValueError, match=r"search\.asha=True.*search\.objectives"):
        SearchConfig(
            mode="optuna", sweeps=("c=2,4",), objectives=("psnr:max", "gflops:min"), asha=True
        )
    with pytest.raises(ValueError, match=r"search\.asha_grace_period=2.*search\.asha=False"):
        SearchConfig(mode="optuna", sweeps=("c=2,4",), asha=False, asha_grace_period=2)


def test_asha_without_evaluations_during_training_is_refused():
    optuna = ["search.mode=optuna"]  # over the demo's sweeps
    demo = preset("demo")
    assert demo.train.eval_every == 0
    with pytest.raises(ValueError, match=r"search\.asha=True.*train\.eval_every=0"):
        apply_overrides(demo, [*optuna, "search.asha=true"])
    with pytest.raises(ValueError, match=r"search\.asha_grace_period=2.*train\.eval_every=0"):
        apply_overrides(demo, [*optuna, "search.asha_grace_period=2"])
    evaluating = apply_overrides(demo, [*optuna, "search.asha=true", "train.eval_every=100"])
    assert evaluating.search.asha is True


def test_asha_left_unset_says_why_it_is_off():
    from vitok.pipelines.study_tune import asha_plan

    optuna = ["search.mode=optuna"]  # over the demo's sweeps
    on, why = asha_plan(apply_overrides(preset("demo"), [*optuna, "train.eval_every=100"]))
    assert on and why == ""
    on, why = asha_plan(apply_overrides(preset("demo"), optuna))
    assert not on and "train.eval_every=0" in why
    multi = apply_overrides(preset("demo"), [*optuna, "search.objectives=[psnr:max,gflops:min]"])
    on, why = asha_plan(multi)
    assert not on and "2 objectives" in why
    on, why = asha_plan(apply_overrides(preset("demo"), [*optuna, "search.asha=false"]))
    assert not on and "search.asha=false" in why


# ----------------------------------------------------------------------------- objectives
def _with(cfg, **search):
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **search))


def test_objectives_every_trial_produces_pass():
    from vitok.pipelines.study_preflight import objective_problems, trial_metrics
    from vitok.pipelines.study_trial import RECON_METRICS

    cfg = preset("smoke-study")  # a generator, a val split, no weight files
    assert {f"val/{m}" for m in RECON_METRICS} <= set(trial_metrics(cfg))
    for objective in (
        "psnr:max",
        "val/ssim:max",
        "gflops:min",
        "E:max",
        "decoder_params_M:min",
        "time/trial_s:min",
        "gen/frechet_pixels:min",
        "gen/diffusion_loss:min",
    ):
        assert objective_problems(_with(cfg, objectives=(objective,))) == [], objective


@pytest.mark.parametrize(
    "objective,change,named",
    [
        ("psnrr:max", {}, "no trial produces"),
        ("variant:max", {}, "no trial produces"),
        ("fid:min", {}, "metrics.inception_weights"),
        ("fvd:min", {}, "metrics.i3d_weights"),
        ("lpips:min", {}, "loss.vgg_weights"),
        ("gen/gfid:min", {}, "metrics.inception_weights"),
        ("gen/frechet_pixels:min", {"generator_train": None}, "generator_train"),
        ("psnr:max", {"val_fraction": 0.0}, "data.val_fraction=0.0"),
    ],
)
def test_an_objective_no_trial_produces_is_named_with_its_fix(
    objective, change, named, monkeypatch
):
    from vitok.pipelines.study_preflight import objective_problems

    for env in ("VITOK_INCEPTION_WEIGHTS", "VITOK_I3D_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)
    cfg = _with(preset("smoke-study"), objectives=(objective,))
    if "val_fraction" in change:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))
    elif change:
        cfg = dataclasses.replace(cfg, **change)
    (problem,) = objective_problems(cfg)
    assert f"search.objectives: {objective!r}" in problem and named in problem, problem


def test_a_val_split_that_came_out_empty_is_named(monkeypatch):
    from vitok.pipelines.study_preflight import objective_problems

    cfg = preset("smoke-study")
    assert objective_problems(cfg, num_val=4) == []
    (problem,) = objective_problems(cfg, num_val=0)
    assert "'psnr:max'" in problem and "0 val clips" in problem


def test_the_preflight_refuses_an_objective_no_trial_produces(ray_local):
    from vitok.pipelines.study_preflight import preflight

    cfg = _with(preset("smoke-study"), objectives=("psnrr:max",))
    with pytest.raises(SystemExit, match="search.objectives: 'psnrr:max'"):
        preflight(cfg)


def test_a_study_whose_val_split_is_empty_stops_before_any_run(
    ray_local, tmp_path: Path, mlflow_uri, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from vitok.pipelines import scaling_study
    from vitok.platform.data.prepare import PreparedData
    from vitok.platform.storage import StorageConfig
    from vitok.platform.tracking.runs import TrackingConfig

    def no_val(cfg, root, **kw):
        return PreparedData(root, {}, {}, "", 0, 8, 0, "fake", True)

    monkeypatch.setattr("vitok.platform.data.prepare.prepare", no_val)
    monkeypatch.setattr(scaling_study, "tune_run", pytest.fail)
    cfg = dataclasses.replace(
        preset("smoke-study"),
        tracking=TrackingConfig(uri=mlflow_uri, experiment="no-val", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
    )
    with pytest.raises(SystemExit, match="0 val clips"):
        scaling_study.run_study(cfg)
    assert MlflowClient(mlflow_uri).get_experiment_by_name("no-val") is None


def test_register_best_says_when_no_trial_has_the_objective(tmp_path, mlflow_uri, capsys):
    from vitok.pipelines.study_best import register_best
    from vitok.platform.study.store import StudyStore
    from vitok.platform.tracking.runs import TrackingConfig

    cfg = dataclasses.replace(preset("smoke-study"), tracking=TrackingConfig(uri=mlflow_uri))
    store = StudyStore(str(tmp_path / "study"))
    rows = [{"trial": "c2", "E": 64, "tokenizer_run_id": "r1"}]
    assert register_best(cfg, store, rows) is None
    out = capsys.readouterr().out
    assert "no finished trial has val/psnr" in out and "search.objectives" in out
