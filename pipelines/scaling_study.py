"""The scaling study: Ray Tune (+ Optuna) over bottleneck, encoder and decoder size.

    python pipelines/scaling_study.py                      # the `demo` preset, CPU minutes
    python pipelines/scaling_study.py --preset smoke       # the fastest full path
    python pipelines/scaling_study.py --preset demo --set search.mode=optuna
    python pipelines/scaling_study.py --preset demo --resume   # continue a stopped study
    ray job submit --working-dir . -- python pipelines/scaling_study.py \\
        --preset paper-video-ucf --data /data/UCF-101

Each Tune trial runs one tokenizer's whole path as Ray Train runs (stage 1 -> optional
stage 2 -> reconstruction eval -> latents -> generator -> generation eval). MLflow holds a
parent run per study and a child run per trial; the report (scaling plots with fitted
lines and R^2, a table of all trials, the paper's numbers where the setup matches) is
logged to the parent run and written to the study folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vitok.pipelines.cli import (
    ExperimentConfig,
    add_config_arguments,
    dump_config,
    resolve_config,
)
from vitok.pipelines.paper import FINDINGS, paper_row
from vitok.pipelines.presets import PRESETS, preset
from vitok.pipelines.search import parse_objective, trial_name
from vitok.platform import storage
from vitok.platform.config import apply_overrides, to_yaml
from vitok.platform.data import ensure_ray
from vitok.platform.report import (
    console_table,
    markdown_table,
    scaling_figure,
    write_csv,
)
from vitok.platform.study import (
    FINISHED,
    StudyStore,
    report_to_tune_callback,
    seeded_optuna_storage,
    study_progress,
)
from vitok.platform.tracking import RunLogger, resolve_uri, start_run

RECON_METRICS = ("psnr", "ssim", "lpips", "fid", "fvd")


def objective_key(metric: str) -> str:
    """'psnr' -> 'val/psnr' (a reconstruction metric); 'gflops', 'gen/...' stay as given."""
    return f"val/{metric}" if metric in RECON_METRICS else metric


def trial_overrides(config: dict[str, Any]) -> tuple[str, ...]:
    """A Tune trial's config (grid: its override list; Optuna: axis -> value) as overrides."""
    if "overrides" in config:
        return tuple(config["overrides"])
    return tuple(f"{k}={v}" for k, v in sorted(config.items()))


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, int | float | str)}


# ----------------------------------------------------------------------------- one trial
def run_trial(
    config: dict[str, Any], *, base: ExperimentConfig, study_uri: str, parent_run_id: str | None
) -> None:
    """A Tune function trainable: one tokenizer's whole path, committed, reported to Tune.

    Runs on any node: everything it reads and writes is under the storage root. A trial
    that finds its committed result reports it and returns (a rerun costs nothing); one
    killed half-way resumes its Ray Train runs from their checkpoints, into its MLflow runs.
    """
    import ray
    import ray.data
    from ray import tune

    from vitok.pipelines.generator_stage import run_generator
    from vitok.pipelines.tokenizer_stage import run_tokenizer, tokenizer_params
    from vitok.platform.data import prepare

    overrides = trial_overrides(config)
    name = trial_name(overrides)
    store = StudyStore(study_uri)
    committed = store.result(name)
    if committed is not None:
        tune.report(_scalars(committed))
        return
    started = time.perf_counter()
    # Concurrent trials' Ray Data progress bars would interleave on the study's console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    node = ray.get_runtime_context().get_node_id()
    store.log_event(name, "started", node_id=node)
    cfg = dataclasses.replace(apply_overrides(base, list(overrides)), name=name)
    prepared = prepare(cfg.data, cfg.storage.uri, progress=False)  # committed: reused at once
    objectives = [objective_key(m) for m, _ in map(parse_objective, cfg.search.objectives)]
    to_tune = report_to_tune_callback(objectives, _scalars(tokenizer_params(cfg.tokenizer)))
    tok = run_tokenizer(
        cfg,
        prepared,
        run_dir=store.trial_dir(name),
        parent_run_id=parent_run_id,
        run_name=name,
        log_model=False,
        callbacks=[to_tune],
    )
    result: dict[str, Any] = {"trial": name, "tokenizer_run_id": tok.run_id or ""}
    result.update(_scalars(tok.params))
    result.update(tok.metrics)
    result["tokenizer_checkpoint"] = tok.checkpoint_dir
    work_s = tok.work_s
    if cfg.generator_train is not None:
        gen = run_generator(
            cfg,
            prepared,
            tok.checkpoint_dir,
            run_dir=storage.join(store.trial_dir(name), "generator"),
            parent_run_id=parent_run_id,
            run_name=f"{name}-gen",
            tokenizer_run_id=tok.run_id,
        )
        result.update({f"gen/{k.split('/', 1)[-1]}": v for k, v in gen.metrics.items()})
        result["generator_run_id"] = gen.run_id or ""
        result["generator_checkpoint"] = gen.checkpoint_dir
        work_s += gen.work_s
    result.update(time_shares(time.perf_counter() - started, work_s))
    if tok.run_id:  # beside the trial's curves, for the runs table
        logger = RunLogger(cfg.tracking.uri, tok.run_id)
        logger.log_metrics({k: v for k, v in result.items() if k.startswith("time/")})
        logger.close()
    result["node_id"] = node
    store.commit(name, {**result, "params": dict(config), "overrides": list(overrides)})
    store.log_event(name, "finished", node_id=node)
    tune.report(_scalars(result))


# ----------------------------------------------------------------------------- the study
@dataclasses.dataclass
class StudyResult:
    store: StudyStore
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    fits: dict[str, float]
    parent_run_id: str | None
    best: dict[str, Any] | None = None  # the registered best tokenizer: trial, uri


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


def _tuner(
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
                store, lambda c: trial_name(trial_overrides(c)), _trial_line, ["E", *metrics]
            )
        ],
        verbose=0,  # the study's own status table and trial lines instead
    )
    if search.mode == "grid":
        pending = [list(t) for t in _unique_trials(cfg) if trial_name(t) not in done]
        if not pending:
            return None, None
        print(f"[vitok] {len(done)} trials already committed, {len(pending)} to run")
        space = {"overrides": tune.grid_search(pending)}
        tune_config = TuneConfig(max_concurrent_trials=search.max_concurrent)
        tuner = Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
        return tuner, None

    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    axes = search.space()
    if not axes:
        raise SystemExit("error: search.mode=optuna needs search.sweeps to define the axes")
    remaining = search.num_samples - len(done)
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
        seed=search.seed + len(done),  # a resumed study does not replay the same draws
    )
    scheduler = None
    if search.asha and single:
        # Every result Tune sees carries the objective (report_to_tune_callback), so ASHA
        # compares evaluations at equal numbers of evaluations.
        scheduler = ASHAScheduler(
            metric=metrics[0], mode=modes[0], grace_period=search.asha_grace_period, max_t=10**6
        )
    tune_config = TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=remaining,
        max_concurrent_trials=search.max_concurrent,
    )
    space = {name: tune.choice(values) for name, values in axes.items()}
    tuner = Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    return tuner, db


def time_shares(wall_s: float, work_s: float) -> dict[str, float]:
    """A trial's wall time split into work (training steps and evaluation) and the platform's
    share (start-up, data pipelines, checkpoints, tracking). A resumed trial's work includes
    the steps done before the restart, so its share is a lower bound (clamped at 0)."""
    share = max(0.0, 1.0 - work_s / wall_s) if wall_s > 0 else 0.0
    return {"time/trial_s": wall_s, "time/work_s": work_s, "time/platform_share": share}


def _trial_line(result: dict[str, Any]) -> str:
    """``E=1024, PSNR 21.3 dB, SSIM 0.61, platform 12%`` for a finished trial's console line."""
    shown = [f"E={result['E']}"] if "E" in result else []
    for key, label, unit in (("val/psnr", "PSNR", " dB"), ("val/ssim", "SSIM", "")):
        if key in result:
            shown.append(f"{label} {result[key]:.3g}{unit}")
    if "time/platform_share" in result:
        shown.append(f"platform {result['time/platform_share']:.0%}")
    return ", ".join(shown) or "no metrics"


def _unique_trials(cfg: ExperimentConfig) -> list[tuple[str, ...]]:
    """Grid trials, dropping any whose resolved config equals an earlier one."""
    seen: set[str] = set()
    out = []
    for overrides in cfg.search.trials():
        key = to_yaml(apply_overrides(cfg, list(overrides)))
        if key not in seen:
            seen.add(key)
            out.append(overrides)
    return out


def missing_weight_files(cfg: ExperimentConfig) -> list[str]:
    """What a study would miss at its first step (or its evaluation), as fixes to apply."""
    import os

    problems = []
    loss = cfg.loss
    if loss.lpips_weight > 0 and (cfg.train is not None or cfg.stage2 is not None):
        if not loss.lpips_available:
            problems.append(
                f"loss.lpips_weight={loss.lpips_weight} needs loss.vgg_weights=<torchvision "
                "vgg16 state dict .pth> and loss.lpips_weights=<the lpips package's "
                "weights/v0.1/vgg.pth>; or --set loss.lpips_weight=0 to train without LPIPS"
            )
        else:
            for field in ("vgg_weights", "lpips_weights"):
                path = getattr(loss, field)
                if not Path(path).expanduser().is_file():
                    problems.append(f"loss.{field}={path!r} is not a file on this node")
    files = {
        "fid": (
            "inception_weights",
            "VITOK_INCEPTION_WEIGHTS",
            "pt_inception-2015-12-05-6726825d.pth",
        ),
        "fvd": ("i3d_weights", "VITOK_I3D_WEIGHTS", "i3d_torchscript.pt"),
    }
    for metric in cfg.metrics.require:
        field, env, file_name = files[metric]
        path = getattr(cfg.metrics, field) or os.environ.get(env)
        if not path:
            problems.append(
                f"metrics.require asks for {metric}: set metrics.{field}=<{file_name}> "
                f"(or {env}); or drop it from metrics.require"
            )
        elif not Path(path).expanduser().is_file():
            problems.append(f"metrics.{field}={path!r} ({metric}) is not a file on this node")
    return problems


def resource_problems(cfg: ExperimentConfig) -> tuple[list[str], list[dict[str, float]]]:
    """What no node (type) of this cluster can ever hold, naming the setting to change; and
    the largest GPU stage's worker bundles, to ask an autoscaler for."""
    from vitok.platform import cluster
    from vitok.platform.config import parse_resources

    types = cluster.autoscaler_node_types()
    live = cluster.live_node_resources()
    where = "no node type of this cluster's autoscaler" if types else "no node of this cluster"
    problems, wanted = [], []
    stages = {"train": cfg.train, "stage2": cfg.stage2, "generator_train": cfg.generator_train}
    for stage, train in stages.items():
        if train is None:
            continue
        bundle = {
            "CPU": train.cpus_per_worker,
            **parse_resources(f"{stage}.resources", train.resources),
        }
        if train.use_gpu:
            bundle["GPU"] = 1.0
        what = cluster.describe_bundles([bundle])
        if not cluster.can_ever_fit(bundle, types, live):
            problems.append(
                f"{stage}: one worker needs {what[4:]} but {where} has that; set "
                f"{stage}.use_gpu / {stage}.cpus_per_worker / {stage}.resources to what exists "
                "(a laptop: --set " + f"{stage}.use_gpu=false --set {stage}.num_workers=1)"
            )
        elif cluster.max_bundles(bundle, types, live) < train.num_workers:
            problems.append(
                f"{stage}.num_workers={train.num_workers} asks for {train.num_workers} x "
                f"{what[4:]} but this cluster can hold at most "
                f"{cluster.max_bundles(bundle, types, live):g} at once; lower "
                f"{stage}.num_workers or add nodes"
            )
        elif train.use_gpu and len(wanted) < train.num_workers:
            wanted = [bundle] * train.num_workers
    trial = {"CPU": cfg.search.trial_cpus, **cfg.search.trial_resources_dict()}
    if not cluster.can_ever_fit(trial, types, live):
        problems.append(
            f"search.trial_resources={list(cfg.search.trial_resources)}: {where} holds a "
            f"trial driver of {cluster.describe_bundles([trial])[4:]}"
        )
    return problems, wanted if types is not None else []


def preflight(cfg: ExperimentConfig, wait_s: float = 1800.0) -> bool:
    """Fail fast, naming every missing piece and its fix, when a study cannot run here (a
    paper preset on a laptop): weight files, data, resources; all before any compute. On an
    autoscaling cluster, ask for the largest GPU stage's workers and wait (timed lines).
    Returns whether an autoscaler request stands (released when the study ends)."""
    from vitok.platform import cluster
    from vitok.platform.sources import parse_source

    problems = missing_weight_files(cfg)
    for src in cfg.data.sources:
        kind, path = parse_source(src)
        if path and storage.is_local(path) and not Path(path).expanduser().exists():
            problems.append(
                f"data source {src!r} does not exist here; pass --data /path/to/dataset "
                "(a folder of videos or images at the same path on every node)"
            )
    ensure_ray(log_to_driver=False)  # trials' output: MLflow and `ray logs`; here the table
    more, wanted = resource_problems(cfg)
    problems += more
    if problems:
        raise SystemExit("error: this study cannot start:\n  - " + "\n  - ".join(problems))
    if not wanted:
        return False
    if not cluster.request_and_wait(wanted, timeout_s=wait_s, keep=True):
        raise SystemExit(f"error: the autoscaler did not bring up the GPUs within {wait_s:.0f} s")
    return True


def run_study(
    cfg: ExperimentConfig, *, resume: bool = False, force: bool = False, preset_name: str = ""
) -> StudyResult:

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    requested = preflight(cfg)
    # Trials run in other directories and on other nodes: ship absolute locations only.
    cfg = dataclasses.replace(
        cfg,
        tracking=dataclasses.replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)),
        storage=dataclasses.replace(cfg.storage, root=cfg.storage.uri),
    )
    store = StudyStore.locate(cfg.storage.root, cfg.name, resume=resume)
    store.acquire()  # one driver per study: a second start or --resume is refused
    try:
        return _run_claimed_study(cfg, store, resume, force, preset_name, requested)
    finally:
        store.release()


def _run_claimed_study(
    cfg: ExperimentConfig,
    store: StudyStore,
    resume: bool,
    force: bool,
    preset_name: str,
    requested: bool,
) -> StudyResult:
    from ray import tune

    from vitok.platform.data import prepare

    if resume:
        check_resumable(store, cfg, force=force)
    else:
        storage.write_text(store.path("config.yaml"), dump_config(cfg))
    print(f"[vitok] study {store.name}: {store.uri}")
    prepared = prepare(cfg.data, cfg.storage.root)
    parent = start_run(
        cfg.tracking,
        store.name,
        resume_file=store.path("mlflow_run_id"),
        tags={"vitok.kind": "study", "vitok.preset": preset_name or "custom"},
    )
    logger = RunLogger(cfg.tracking.uri, parent) if parent else None
    if logger:
        logger.log_params(
            {
                "preset": preset_name or "custom",
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
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, study_uri=store.uri, parent_run_id=parent),
        {"CPU": cfg.search.trial_cpus, **cfg.search.trial_resources_dict()},
    )
    tuner, optuna_db = _tuner(cfg, store, trainable, store.results())
    errors: list[dict[str, Any]] = []
    try:
        if tuner is not None:
            errors = _errors(tuner.fit())
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    finally:
        if optuna_db is not None and optuna_db.exists():
            storage.upload(optuna_db, store.path("optuna.db"))
        if requested:
            from vitok.platform.cluster import release_request

            release_request()
    rows, failed = _collect(store, errors)
    fits = write_report(cfg, store, rows, failed, logger)
    best = register_best(cfg, store, rows)
    if logger:
        logger.log_metrics({f"r2/{k}": v for k, v in fits.items()})
        if best:
            logger.set_tags({"vitok.best_trial": best["trial"], "vitok.best_model": best["uri"]})
        logger.finish("FINISHED" if rows else "FAILED")
    return StudyResult(store, rows, failed, fits, parent, best)


def register_best(
    cfg: ExperimentConfig, store: StudyStore, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Register the best trial's tokenizer (first objective) as an MLflow model version,
    once per best trial (a resumed study with the same best registers nothing new)."""
    from vitok.pipelines.tokenizer_stage import register_tokenizer

    name = cfg.tracking.registered_model
    metric, mode = parse_objective(cfg.search.objectives[0])
    key = objective_key(metric)
    scored = [r for r in rows if isinstance(r.get(key), int | float) and r.get("tokenizer_run_id")]
    if not name or not cfg.tracking.enabled or not scored:
        return None
    best = (max if mode == "max" else min)(scored, key=lambda r: r[key])
    record_uri = store.path("registered_model.json")
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("trial") == best["trial"]:
            return record
    overrides = store.results()[best["trial"]].get("overrides", [])
    tokenizer = apply_overrides(cfg, list(overrides)).tokenizer
    tags = {"study": store.name, "trial": best["trial"], key: best[key], "E": best.get("E", "")}
    try:
        uri = register_tokenizer(
            cfg.tracking.uri,
            best["tokenizer_run_id"],
            best["tokenizer_checkpoint"],
            tokenizer,
            name,
            tags,
        )
    except Exception as err:  # e.g. a tracking store without a model registry
        print(f"[vitok] warning: could not register the best tokenizer as {name!r}: {err}")
        return None
    record = {"trial": best["trial"], "uri": uri, key: best[key]}
    storage.write_json(record_uri, record)
    return record


def check_resumable(store: StudyStore, cfg: ExperimentConfig, *, force: bool) -> None:
    """A resumed study keeps its config: refuse a different one (listing the keys) unless
    ``force``."""
    from vitok.platform.config import flatten_dict, from_yaml, to_dict

    stored = from_yaml(ExperimentConfig, storage.read_text(store.path("config.yaml")))
    before, after = flatten_dict(to_dict(stored)), flatten_dict(to_dict(cfg))
    ignore = {"name", "storage.root", "tracking.uri"}  # where it runs, not what it computes
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    differ = [k for k in differ if k not in ignore]
    if not differ:
        return
    shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differ[:12])
    if not force:
        raise SystemExit(
            f"error: --resume of {store.name} with a config that differs from the stored one "
            f"({shown}); resume with the same settings, or add --force to go on with the new"
        )
    print(f"[vitok] --force: resuming {store.name} with changed settings: {shown}")
    storage.write_text(store.path("config.yaml"), dump_config(cfg))


def _errors(grid: Any) -> list[dict[str, Any]]:
    out = []
    for result in grid:
        if result.error is not None:
            config = result.config or {}
            name = trial_name(trial_overrides(config)) if config else "?"
            out.append({"trial": name, "error": str(result.error).splitlines()[0][:300]})
    return out


def _collect(
    store: StudyStore, errors: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of every committed trial (this run's and earlier runs'), and the others."""
    rows, failed = [], []
    for name, result in sorted(store.results().items()):
        if result.get("status") == FINISHED:
            rows.append(_scalars(result))
        else:
            failed.append({"trial": name, "error": "stopped early (ASHA)"})
    failed += [e for e in errors if e["trial"] not in {r["trial"] for r in rows}]
    rows.sort(key=lambda r: (r.get("E", 0), str(r.get("trial"))))
    return rows, failed


# ----------------------------------------------------------------------------- the report
PLOT_METRICS = [
    ("val/psnr", "PSNR (dB)"),
    ("val/ssim", "SSIM"),
    ("val/lpips", "LPIPS"),
    ("val/fid", "rFID"),
    ("val/fvd", "rFVD"),
    ("gen/diffusion_loss", "val diffusion loss"),
    ("gen/frechet_pixels", "Frechet distance, 4x4-pooled frames"),
    ("gen/gfid", "gFID"),
    ("gen/gfvd", "gFVD"),
]
TABLE_COLUMNS = [
    "trial",
    "variant",
    "p",
    "q",
    "c",
    "L",
    "E",
    "pixels_per_float",
    "encoder_params_M",
    "decoder_params_M",
    "gflops",
    "val/psnr",
    "val/ssim",
    "val/lpips",
    "val/fid",
    "val/fvd",
    "gen/diffusion_loss",
    "gen/samples",  # generated samples behind the Frechet distances beside it
    "gen/frechet_pixels",  # a fixed space shared by every trial (frechet_tokenizer_latent
    "gen/gfid",  # is in each tokenizer's own latent space: in its trial's run only)
    "gen/gfvd",
]


def _sweep_rows(rows: list[dict[str, Any]], vary: str, fixed: tuple[str, ...]) -> list[dict]:
    """The largest group of trials that differ only in ``vary`` (e.g. the encoder sweep)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in fixed), []).append(row)
    best = max(groups.values(), key=lambda g: len({r.get(vary) for r in g}), default=[])
    return best if len({r.get(vary) for r in best}) >= 2 else []


def write_report(
    cfg: ExperimentConfig,
    store: StudyStore,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
) -> dict[str, float]:
    """Plots, tables and the paper comparison into the study's ``report/`` and the parent
    run (built in local scratch, then copied under the storage root)."""
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as tmp:
        out = Path(tmp)
        fits = _write_report_files(cfg, store.name, out, rows, failed, logger)
        storage.upload(out, store.path("report"))
    return fits


def _write_report_files(
    cfg: ExperimentConfig,
    study_name: str,
    out: Path,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
) -> dict[str, float]:
    import matplotlib.pyplot as plt

    fits: dict[str, float] = {}
    present = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    write_csv(rows, present, out / "trials.csv")
    # E sweep: all trials that share encoder and decoder sizes (the paper's finding 1).
    e_rows = _sweep_rows(rows, "E", ("encoder_size", "decoder_size")) or rows
    enc_rows = _sweep_rows(rows, "encoder_params_M", ("E", "p", "decoder_size"))
    dec_rows = _sweep_rows(rows, "decoder_params_M", ("E", "p", "encoder_size"))
    plots = [
        ("scaling_E.png", e_rows, "E", "E (floats in the latent)", True, "E"),
        (
            "scaling_encoder.png",
            enc_rows,
            "encoder_params_M",
            "encoder params (M)",
            False,
            "encoder",
        ),
        (
            "scaling_decoder.png",
            dec_rows,
            "decoder_params_M",
            "decoder params (M)",
            False,
            "decoder",
        ),
    ]
    lines = [f"# Scaling study `{study_name}`", ""]
    for file_name, subset, x_key, label, log2, tag in plots:
        if len(subset) < 2:
            continue
        fig, panel_fits = scaling_figure(
            subset,
            x_key,
            PLOT_METRICS,
            x_label=label,
            log2_x=log2,
            title=f"{study_name}: metrics against {label} ({len(subset)} trials)",
        )
        fig.savefig(out / file_name, dpi=120)
        if logger:
            logger.log_figure(fig, f"report/{file_name}")
        plt.close(fig)
        lines.append(f"## Against {label}")
        lines.append(f"![{tag}]({file_name})")
        for metric, fit in panel_fits.items():
            if fit is not None:
                fits[f"{tag}/{metric}"] = fit.r2
                lines.append(
                    f"- {metric}: slope {fit.slope:.4g} per unit, R^2 = {fit.r2:.3f} (n = {fit.n})"
                )
        lines.append("")
    lines += ["## All trials", "", markdown_table(rows, present), ""]
    if failed:
        lines += ["## Failed or stopped trials", "", markdown_table(failed, ["trial", "error"]), ""]
    paper = _beside_paper(rows, cfg.tokenizer.input_size)
    lines += ["## The paper's findings", ""] + [f"- {k}: {v}" for k, v in FINDINGS.items()]
    if paper:
        lines += [
            "",
            "### Our numbers beside the paper's",
            "",
            markdown_table(paper, list(paper[0])),
            "",
        ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "fits.json").write_text(json.dumps(fits, indent=2))
    if logger:
        logger.log_artifact(out / "trials.csv", "report")
        logger.log_text(text, "report/report.md")
        # The parent run's description (a tag: MLflow keeps at most 8000 characters).
        note = text if len(text) < 7500 else text[:7500] + "\n\n(cut: see report/report.md)"
        logger.set_tags({"mlflow.note.content": note})
    return fits


def _beside_paper(rows: list[dict[str, Any]], input_size: Any) -> list[dict[str, Any]]:
    """Our numbers next to the paper's, for the trials whose setup the paper reports."""
    paper = []
    for row in rows:
        ref = paper_row(str(row.get("variant")), int(row.get("c", 0)), input_size)
        if ref:
            paper.append(
                {
                    "trial": row["trial"],
                    "ours psnr": row.get("val/psnr"),
                    "paper psnr": ref.get("psnr"),
                    "ours ssim": row.get("val/ssim"),
                    "paper ssim": ref.get("ssim"),
                    "paper rFID": ref.get("rfid"),
                    **generation_beside_paper(row, ref),
                }
            )
    return paper


def generation_beside_paper(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """gFID / gFVD, ours and the paper's, each with the sample count it was measured at."""
    out: dict[str, Any] = {}
    for metric in ("gfid", "gfvd"):
        if ref.get(metric) is not None or row.get(f"gen/{metric}") is not None:
            out[f"ours {metric} (samples)"] = _with_count(row.get(f"gen/{metric}"), row)
            out[f"paper {metric} (samples)"] = _with_count(ref.get(metric), ref)
    return out


def _with_count(value: Any, source: dict[str, Any]) -> str:
    count = source.get("gen/samples", source.get("gen_samples"))
    shown = "-" if value is None else f"{value:.4g}"
    return f"{shown} ({int(count)})" if count is not None and value is not None else shown


def print_summary(cfg: ExperimentConfig, result: StudyResult, minutes: float) -> None:
    columns = [
        "trial",
        "variant",
        "c",
        "E",
        "encoder_params_M",
        "decoder_params_M",
        "val/psnr",
        "val/ssim",
        "gen/frechet_pixels",
    ]
    columns = [c for c in columns if any(c in r for r in result.rows)]
    print()
    print(
        f"[vitok] study {result.store.name}: {len(result.rows)} trials finished, "
        f"{len(result.failed)} failed or stopped, {minutes:.1f} min"
    )
    if result.rows:
        print(console_table(result.rows, columns))
    for trial in result.failed:
        print(f"  failed: {trial['trial']}: {trial['error']}")
    for key, r2 in sorted(result.fits.items()):
        print(f"  R^2 {key}: {r2:.3f}")
    print_time_shares(result.rows)
    if result.best:
        print(f"  best model:  {result.best['uri']} (trial {result.best['trial']})")
    print(f"  report:      {result.store.path('report', 'report.md')}")
    uri = resolve_uri(cfg.tracking.uri)
    print(
        f"  mlflow:      mlflow ui --backend-store-uri {uri}   (parent run {result.parent_run_id})"
    )


def print_time_shares(rows: list[dict[str, Any]]) -> None:
    """The platform's share of the trials' wall time (what is not training or evaluating)."""
    timed = [r for r in rows if r.get("time/trial_s")]
    if not timed:
        return
    wall = sum(r["time/trial_s"] for r in timed)
    work = sum(r["time/work_s"] for r in timed)
    worst = max(timed, key=lambda r: r["time/platform_share"])
    print(
        f"  time:        {work / 60:.1f} of {wall / 60:.1f} trial-minutes training and "
        f"evaluating; platform overhead {max(0.0, 1 - work / wall):.0%} "
        f"(worst {worst['trial']} {worst['time/platform_share']:.0%})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, sorted(PRESETS))
    parser.add_argument("--data", default=None, help="a folder of videos or images")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest study of this name under the storage root",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --resume: accept a changed config"
    )
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        args.preset = "demo"
    try:
        cfg = resolve_config(args, preset("demo"), preset)
        if args.data:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(args.data,)))
    except ValueError as err:
        parser.error(str(err))
    if args.print_config:
        print(dump_config(cfg))
        return 0
    t0 = time.perf_counter()
    result = run_study(cfg, resume=args.resume, force=args.force, preset_name=args.preset or "")
    print_summary(cfg, result, (time.perf_counter() - t0) / 60)
    return 0 if result.rows else 1


if __name__ == "__main__":
    sys.exit(main())
