"""The Tune run of a study: a grid over what is left, or Optuna (with ASHA for a single
objective) told the trials already committed; and the study's rows once it returns."""

from __future__ import annotations

from typing import Any

from vitok.pipelines.experiment import ExperimentConfig
from vitok.pipelines.search import parse_objective, trial_name
from vitok.pipelines.study_report import trial_line
from vitok.pipelines.study_trial import objective_key, scalars, trial_overrides
from vitok.platform import storage
from vitok.platform.config import apply_overrides, to_yaml
from vitok.platform.study.store import FINISHED, StudyStore, seeded_optuna_storage, study_progress


def tune_run(
    cfg: ExperimentConfig, store: StudyStore, trainable: Any, done: dict[str, dict[str, Any]]
) -> tuple[Any, Any]:
    """A fresh Tune run for what is left (None when nothing is), and the Optuna db to keep.

    Never restores Tune's own state: finished trials are the committed results in ``done``.
    """
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    search = cfg.search
    objectives = [parse_objective(o) for o in search.objectives]
    metrics = [objective_key(m) for m, _ in objectives]
    modes = [mode for _, mode in objectives]
    attempt = storage.attempt_id()
    run_config = RunConfig(
        name=f"attempt-{attempt}",
        storage_path=store.path("tune"),
        # A retried trial resumes: committed results return at once, Train runs restore.
        failure_config=FailureConfig(max_failures=search.max_failures),
        callbacks=[
            study_progress(
                store, lambda c: trial_name(trial_overrides(c)), trial_line, ["E", *metrics]
            )
        ],
        verbose=0,  # the study's own status table and trial lines instead
    )
    if search.mode == "grid":
        pending = [list(t) for t in unique_trials(cfg) if trial_name(t) not in done]
        if not pending:
            return None, None
        print(f"[vitok] {len(done)} trials already committed, {len(pending)} to run")
        space = {"overrides": tune.grid_search(pending)}
        tune_config = TuneConfig(max_concurrent_trials=search.max_concurrent, reuse_actors=True)
        tuner = Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
        return tuner, None

    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    axes = search.space()  # not empty: SearchConfig refuses optuna without sweeps
    remaining = search.samples - len(done)
    if remaining <= 0:
        return None, None
    seeds = [
        (r["params"], [r[m] for m in metrics])
        for r in done.values()
        if "params" in r and all(m in r for m in metrics)
    ]
    db = storage.scratch_dir() / f"optuna-{store.name}-{attempt}.db"
    url = seeded_optuna_storage(str(db), cfg.name, axes, modes, seeds)
    print(f"[vitok] optuna: {len(seeds)} finished trials told to the sampler, {remaining} to run")
    single = len(metrics) == 1
    searcher = OptunaSearch(
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        storage=__import__("optuna").storages.RDBStorage(url),
        study_name=cfg.name,
        seed=search.sampler_seed + len(done),  # a resumed study does not replay the same draws
    )
    scheduler = None
    asha, why_not = asha_plan(cfg)
    if asha:
        # Every result Tune sees carries the objective (report_to_tune_callback), so ASHA
        # compares evaluations at equal numbers of evaluations.
        scheduler = ASHAScheduler(
            metric=metrics[0], mode=modes[0], grace_period=search.grace_period, max_t=10**6
        )
    else:
        print(f"[vitok] optuna without ASHA (no trial is stopped early): {why_not}")
    tune_config = TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=remaining,
        max_concurrent_trials=search.max_concurrent,
        reuse_actors=True,
    )
    space = {name: tune.choice(values) for name, values in axes.items()}
    tuner = Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    return tuner, db


def asha_plan(cfg: ExperimentConfig) -> tuple[bool, str]:
    """Whether an Optuna study stops trials early with ASHA, and if not, why (a setting
    that asks for ASHA where it cannot act is refused by the config instead)."""
    search = cfg.search
    if search.asha is False:
        return False, "search.asha=false"
    if len(search.objectives) > 1:
        return False, f"{len(search.objectives)} objectives (ASHA stops trials on one metric)"
    if cfg.train.eval_every == 0:
        return False, (
            "train.eval_every=0: each trial reports once, at its end, so ASHA would have "
            "nothing to compare; set train.eval_every=N to let it stop trials early"
        )
    return True, ""


def unique_trials(cfg: ExperimentConfig) -> list[tuple[str, ...]]:
    """Grid trials, dropping any whose resolved config equals an earlier one."""
    seen: set[str] = set()
    out = []
    for overrides in cfg.search.trials():
        key = to_yaml(apply_overrides(cfg, list(overrides)))
        if key not in seen:
            seen.add(key)
            out.append(overrides)
    return out


def errors_of(grid: Any) -> list[dict[str, Any]]:
    out = []
    for result in grid:
        if result.error is not None:
            config = result.config or {}
            name = trial_name(trial_overrides(config)) if config else "?"
            out.append({"trial": name, "error": str(result.error).splitlines()[0][:300]})
    return out


def collect(
    store: StudyStore, errors: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of every committed trial (this run's and earlier runs'), and the others."""
    rows, failed = [], []
    for name, result in sorted(store.results().items()):
        if result.get("status") == FINISHED:
            rows.append(scalars(result))
        else:
            failed.append({"trial": name, "error": "stopped early (ASHA)"})
    failed += [e for e in errors if e["trial"] not in {r["trial"] for r in rows}]
    rows.sort(key=lambda r: (r.get("E", 0), str(r.get("trial"))))
    return rows, failed
