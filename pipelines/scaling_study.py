"""The scaling study: Ray Tune (+ Optuna) over bottleneck, encoder and decoder size.

    python pipelines/scaling_study.py                      # the `demo` preset, CPU minutes
    python pipelines/scaling_study.py --preset smoke       # the fastest full path
    python pipelines/scaling_study.py --preset demo --set search.mode=optuna
    python pipelines/scaling_study.py --preset demo --resume   # continue a stopped study
    ray job submit --working-dir . -- python pipelines/scaling_study.py \\
        --preset paper-video-ucf --data /data/UCF-101

Each Tune trial runs one tokenizer's whole path as Ray Train runs (stage 1 -> optional
stage 2 -> reconstruction eval -> latents -> generator -> generation eval;
``study_trial.py``), after the checks of ``study_preflight.py``. MLflow holds a parent run
per study and a child run per trial; the report (``study_report.py``: scaling plots with
fitted lines and R^2, a table of all trials, the paper's numbers where the setup matches)
is logged to the parent run and written to the study folder.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vitok.pipelines.cli import (
    ExperimentConfig,
    config_from_args,
    config_parser,
    dump_config,
    show_config,
)
from vitok.pipelines.study_best import register_best
from vitok.pipelines.study_preflight import (
    check_resumable,
    objective_problems,
    preflight,
)
from vitok.pipelines.study_report import (
    StudyResult,
    log_outcome,
    print_summary,
    write_report,
)
from vitok.pipelines.study_trial import run_trial
from vitok.pipelines.study_tune import collect, errors_of, tune_run
from vitok.platform import storage
from vitok.platform.data.prepare import PreparedData
from vitok.platform.study.store import (
    StudyStore,
)
from vitok.platform.tracking.runs import RunLogger, owned_run, resolve_uri

# ----------------------------------------------------------------------------- the study


class NoTrialFinished(Exception):
    """Ends the parent run FAILED (the message in its ``vitok.error`` tag) when no trial
    finished; ``run_study`` still returns the study's result, for its summary."""

    def __init__(self, result: StudyResult) -> None:
        lost = "; ".join(f"{f['trial']}: {f['error']}" for f in result.failed)
        super().__init__(f"no trial finished ({len(result.failed)} failed or stopped: {lost})")
        self.result = result


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_study(
    cfg: ExperimentConfig, *, resume: bool = False, force: bool = False, preset_name: str = ""
) -> StudyResult:
    """Preflight, then the study under its lease and its parent run; an autoscaler request
    made by the preflight is released whatever happens."""
    # Results during training carry only evaluations, so Tune's own check that each result
    # holds the objective is off; the preflight checks that trials produce it instead.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one console
    requested = preflight(cfg)
    try:
        # Trials run in other directories and on other nodes: ship absolute locations only.
        cfg = dataclasses.replace(
            cfg,
            tracking=dataclasses.replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)),
            storage=dataclasses.replace(cfg.storage, root=cfg.storage.uri),
        )
        store = StudyStore.locate(cfg.storage.root, cfg.name, resume=resume)
        store.acquire()  # one driver per study: a second start or --resume is refused
        try:
            return _run_claimed_study(cfg, store, resume, force, preset_name or "custom")
        finally:
            store.release()
    finally:
        if requested:
            from vitok.platform.study.cluster import release_request

            release_request()


def _run_claimed_study(
    cfg: ExperimentConfig, store: StudyStore, resume: bool, force: bool, preset_name: str
) -> StudyResult:
    """The study's data, then everything else inside its parent run (``owned_run``: it ends
    FINISHED, or FAILED with the error in a tag whatever fails, or when no trial finished)."""
    from vitok.platform.data.prepare import prepare

    if resume:
        check_resumable(store, cfg, force=force)
    else:
        storage.write_text(store.path("config.yaml"), dump_config(cfg))
    print(f"[vitok] study {store.name}: {store.uri}")
    prepared = prepare(cfg.data, cfg.storage.root)
    problems = objective_problems(cfg, prepared.num_val)  # the data as it came out
    if problems:
        raise SystemExit("error: this study cannot start:\n  - " + "\n  - ".join(problems))
    tags = {"vitok.kind": "study", "vitok.preset": preset_name}
    try:
        with owned_run(
            cfg.tracking, store.name, resume_file=store.path("mlflow_run_id"), tags=tags
        ) as logger:
            parent = logger.run_id if logger else None
            if logger:
                _log_setup(logger, cfg, store, prepared, preset_name)
            rows, failed = _tune(cfg, store, parent)
            objectives = cfg.search.objectives
            fits = write_report(cfg.tokenizer, store, rows, failed, logger, objectives)
            best = register_best(cfg, store, rows)
            if logger:
                log_outcome(logger, fits, best)
            result = StudyResult(store, rows, failed, fits, parent, best)
            if not rows:
                raise NoTrialFinished(result)
    except NoTrialFinished as ended:
        return ended.result
    return result


def _log_setup(
    logger: RunLogger,
    cfg: ExperimentConfig,
    store: StudyStore,
    prepared: PreparedData,
    preset_name: str,
) -> None:
    """The study's settings as the parent run's params, and its config as an artifact."""
    logger.log_params(
        {
            "preset": preset_name,
            "search_mode": cfg.search.mode,
            "sweeps": list(cfg.search.sweeps),
            "objectives": list(cfg.search.objectives),
            "git_commit": _git_commit(),
            "data_hash": prepared.config_hash,
            "data_train_clips": prepared.num_train,
            "data_val_clips": prepared.num_val,
            "storage": store.uri,
        }
    )
    logger.log_text(dump_config(cfg), "config.yaml")


def _tune(
    cfg: ExperimentConfig, store: StudyStore, parent: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Tune run of what is left (none when every trial is committed); the rows of every
    committed trial and the failed or stopped ones."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, study_uri=store.uri, parent_run_id=parent),
        {"CPU": cfg.search.trial_cpus, **cfg.search.trial_resources_dict()},
    )
    tuner, optuna_db = tune_run(cfg, store, trainable, store.results())
    errors: list[dict[str, Any]] = []
    try:
        if tuner is not None:
            errors = errors_of(tuner.fit())
    finally:
        if optuna_db is not None and optuna_db.exists():
            storage.upload(optuna_db, store.path("optuna.db"))
    return collect(store, errors)


# ----------------------------------------------------------------------------- the result


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest study of this name under the storage root",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --resume: accept a changed config"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args, "demo")
    if show_config(args, cfg):
        return 0
    t0 = time.perf_counter()
    result = run_study(cfg, resume=args.resume, force=args.force, preset_name=args.preset or "")
    print_summary(cfg, result, (time.perf_counter() - t0) / 60)
    return 0 if result.rows else 1


if __name__ == "__main__":
    sys.exit(main())
