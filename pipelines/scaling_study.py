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

from vitok.platform.runtime import use_shipped_code

use_shipped_code()  # a Ray job runs the code it shipped, never a stale installed copy

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from vitok.pipelines.experiment import (  # noqa: E402
    ExperimentConfig,
    add_config_arguments,
    dump_config,
    resolve_config,
)
from vitok.pipelines.paper import FINDINGS, paper_row  # noqa: E402
from vitok.pipelines.presets import PRESETS, preset  # noqa: E402
from vitok.pipelines.search import parse_objective, trial_name  # noqa: E402
from vitok.platform.config import apply_overrides, to_yaml  # noqa: E402
from vitok.platform.report import (  # noqa: E402
    console_table,
    markdown_table,
    scaling_figure,
    write_csv,
)
from vitok.platform.tracking import RunLogger, resolve_uri, start_run  # noqa: E402

RECON_METRICS = ("psnr", "ssim", "lpips", "fid", "fvd")
TRIAL_LOG = "trial_starts.jsonl"


def objective_key(metric: str) -> str:
    """'psnr' -> 'val/psnr' (a reconstruction metric); 'gflops', 'gen/...' stay as given."""
    return f"val/{metric}" if metric in RECON_METRICS else metric


# ----------------------------------------------------------------------------- one trial
def run_trial(
    config: dict[str, Any], *, base: ExperimentConfig, study_dir: str, parent_run_id: str | None
) -> None:
    """A Tune function trainable: one tokenizer's whole path, reported back to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vitok.pipelines.generator_stage import run_generator
    from vitok.pipelines.tokenizer_stage import run_tokenizer
    from vitok.platform.data import prepare

    overrides = (
        tuple(config["overrides"])
        if "overrides" in config
        else tuple(f"{k}={v}" for k, v in sorted(config.items()))
    )
    cfg = apply_overrides(base, list(overrides))
    name = trial_name(overrides)
    cfg = dataclasses.replace(cfg, name=name, results_dir=str(Path(study_dir) / "trials"))
    _log_trial(study_dir, name, "started")
    prepared = prepare(cfg.data, progress=False)  # the study prepared it: reused instantly
    tok = run_tokenizer(
        cfg,
        prepared,
        parent_run_id=parent_run_id,
        run_name=name,
        log_model=False,
        callbacks=[TuneReportCallback()],
    )
    result: dict[str, Any] = {"trial": name, "tokenizer_run_id": tok.run_id or ""}
    result.update({k: v for k, v in tok.params.items() if isinstance(v, int | float | str)})
    result.update(tok.metrics)
    if cfg.generator_train is not None:
        gen = run_generator(
            cfg,
            prepared,
            tok.checkpoint_dir,
            parent_run_id=parent_run_id,
            run_name=f"{name}-gen",
            tokenizer_run_id=tok.run_id,
        )
        result.update({f"gen/{k.split('/', 1)[-1]}": v for k, v in gen.metrics.items()})
    tune.report(result)
    _log_trial(study_dir, name, "finished")


def _log_trial(study_dir: str, name: str, event: str) -> None:
    """Append-only evidence of what ran (a resumed study must not rerun finished trials)."""
    with open(Path(study_dir) / TRIAL_LOG, "a") as f:
        f.write(json.dumps({"trial": name, "event": event, "time": time.time()}) + "\n")


# ----------------------------------------------------------------------------- the study
@dataclasses.dataclass
class StudyResult:
    study_dir: Path
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    fits: dict[str, float]
    parent_run_id: str | None


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


def _study_dir(cfg: ExperimentConfig, resume: bool) -> Path:
    """The study's folder; a fresh (non-resumed) study never overwrites an earlier one."""
    root = cfg.results_path
    candidates = [root / cfg.name] + [root / f"{cfg.name}-{i}" for i in range(2, 1000)]
    existing = [p for p in candidates if p.exists()]
    if resume:
        if not existing:
            raise SystemExit(f"error: --resume but no study {cfg.name!r} under {root}")
        return existing[-1]
    return next(p for p in candidates if not p.exists())


def _tuner(cfg: ExperimentConfig, study_dir: Path, trainable: Any, resume: bool):
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    tune_path = study_dir / "tune" / "study"
    if resume and Tuner.can_restore(str(tune_path)):
        print(f"[vitok] resuming the Tune study at {tune_path}")
        return Tuner.restore(str(tune_path), trainable, resume_errored=True)
    search = cfg.search
    objectives = [parse_objective(o) for o in search.objectives]
    metrics = [objective_key(m) for m, _ in objectives]
    modes = [mode for _, mode in objectives]
    run_config = RunConfig(
        name="study",
        storage_path=str(study_dir / "tune"),
        failure_config=FailureConfig(max_failures=0),  # a failed trial is recorded, not retried
        verbose=1,
    )
    if search.mode == "grid":
        trials = _unique_trials(cfg)
        space = {"overrides": tune.grid_search([list(t) for t in trials])}
        tune_config = TuneConfig(max_concurrent_trials=search.max_concurrent)
        return Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)

    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    space = {name: tune.choice(values) for name, values in search.space().items()}
    if not space:
        raise SystemExit("error: search.mode=optuna needs search.sweeps to define the axes")
    single = len(metrics) == 1
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'optuna.db'}")
    searcher = OptunaSearch(
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        storage=storage,
        study_name=cfg.name,
        seed=search.seed,
    )
    scheduler = None
    if search.asha and single:
        scheduler = ASHAScheduler(
            metric=metrics[0],
            mode=modes[0],
            grace_period=search.asha_grace_period,
            max_t=10**6,
        )
    tune_config = TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=search.num_samples,
        max_concurrent_trials=search.max_concurrent,
    )
    return Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


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


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, with the fix, when a study cannot run here (a paper preset on a laptop)."""
    import ray

    from vitok.platform.sources import parse_source

    for src in cfg.data.sources:
        kind, path = parse_source(src)
        if path and not Path(path).expanduser().exists():
            raise SystemExit(
                f"error: data source {src!r} does not exist here; pass --data /path/to/dataset "
                "(a folder of videos or images reachable from every node)"
            )
    for stage, train in (
        ("train", cfg.train),
        ("stage2", cfg.stage2),
        ("generator_train", cfg.generator_train),
    ):
        if train is None or not train.use_gpu:
            continue
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < train.num_workers:
            raise SystemExit(
                f"error: {stage} asks for {train.num_workers} GPU workers but this Ray cluster "
                f"has {gpus:g} GPUs; run on a GPU cluster (see README, 'Run on a cluster') or "
                f"--set {stage}.use_gpu=false --set {stage}.num_workers=1"
            )


def run_study(cfg: ExperimentConfig, *, resume: bool = False, preset_name: str = "") -> StudyResult:
    from ray import tune

    from vitok.platform.data import ensure_ray, prepare

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    ensure_ray()
    preflight(cfg)
    study_dir = _study_dir(cfg, resume)
    study_dir.mkdir(parents=True, exist_ok=True)
    # Trials run in other directories (and on other nodes): ship absolute paths only.
    cfg = dataclasses.replace(
        cfg,
        tracking=dataclasses.replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)),
        data=dataclasses.replace(
            cfg.data, output_root=str(Path(cfg.data.output_root).expanduser().resolve())
        ),
        results_dir=str(cfg.results_path),
    )
    (study_dir / "config.yaml").write_text(dump_config(cfg))
    prepared = prepare(cfg.data)
    parent = start_run(
        cfg.tracking,
        study_dir.name,
        resume_file=study_dir / "mlflow_run_id",
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
            }
        )
        logger.log_text(dump_config(cfg), "config.yaml")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, study_dir=str(study_dir), parent_run_id=parent),
        {"CPU": cfg.search.trial_cpus},
    )
    tuner = _tuner(cfg, study_dir, trainable, resume)
    try:
        grid = tuner.fit()
    except BaseException:
        if logger:
            logger.finish("FAILED")
        raise
    rows, failed = _collect(grid)
    fits = write_report(cfg, study_dir, rows, failed, logger)
    if logger:
        logger.log_metrics({f"r2/{k}": v for k, v in fits.items()})
        logger.finish("FINISHED" if rows else "FAILED")
    return StudyResult(study_dir, rows, failed, fits, parent)


def _collect(grid: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, failed = [], []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = metrics.get("config") or {}
        if result.error is not None or "trial" not in metrics:
            overrides = config.get("overrides") or [f"{k}={v}" for k, v in config.items()]
            failed.append(
                {
                    "trial": trial_name(tuple(overrides)) if overrides else "?",
                    "error": str(result.error).splitlines()[0][:300]
                    if result.error
                    else "stopped early (ASHA) or no final report",
                }
            )
            continue
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        rows.append(row)
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
    ("gen/frechet_tokenizer_latent", "Frechet (tokenizer-latent space)"),
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
    "gen/frechet_tokenizer_latent",
    "gen/gfid",
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
    study_dir: Path,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
) -> dict[str, float]:
    """Plots, tables and the paper comparison into ``study_dir/report`` and the parent run."""
    import matplotlib.pyplot as plt

    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
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
    lines = [f"# Scaling study `{study_dir.name}`", ""]
    for file_name, subset, x_key, label, log2, tag in plots:
        if len(subset) < 2:
            continue
        fig, panel_fits = scaling_figure(
            subset,
            x_key,
            PLOT_METRICS,
            x_label=label,
            log2_x=log2,
            title=f"{study_dir.name}: metrics against {label} ({len(subset)} trials)",
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
    paper = []
    for row in rows:
        ref = paper_row(str(row.get("variant")), int(row.get("c", 0)), cfg.tokenizer.input_size)
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
    return fits


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
        "gen/frechet_tokenizer_latent",
    ]
    columns = [c for c in columns if any(c in r for r in result.rows)]
    print()
    print(
        f"[vitok] study {result.study_dir.name}: {len(result.rows)} trials finished, "
        f"{len(result.failed)} failed or stopped, {minutes:.1f} min"
    )
    if result.rows:
        print(console_table(result.rows, columns))
    for trial in result.failed:
        print(f"  failed: {trial['trial']}: {trial['error']}")
    for key, r2 in sorted(result.fits.items()):
        print(f"  R^2 {key}: {r2:.3f}")
    print(f"  report:      {result.study_dir / 'report' / 'report.md'}")
    uri = resolve_uri(cfg.tracking.uri)
    print(
        f"  mlflow:      mlflow ui --backend-store-uri {uri}   (parent run {result.parent_run_id})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, sorted(PRESETS))
    parser.add_argument("--data", default=None, help="a folder of videos or images")
    parser.add_argument("--resume", action="store_true", help="continue a stopped study")
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
    result = run_study(cfg, resume=args.resume, preset_name=args.preset or "")
    print_summary(cfg, result, (time.perf_counter() - t0) / 60)
    return 0 if result.rows else 1


if __name__ == "__main__":
    sys.exit(main())
