"""The study's report and console: the trial table, scaling plots with fits and R^2, the
paper's numbers beside ours, the time shares, and the best tokenizer registered in MLflow."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from vitok.pipelines.cli import (
    ExperimentConfig,
)
from vitok.pipelines.paper import FINDINGS, paper_row
from vitok.pipelines.search import parse_objective
from vitok.pipelines.study_trial import objective_key, time_shares
from vitok.platform import storage
from vitok.platform.config import apply_overrides
from vitok.platform.report import (
    console_table,
    markdown_table,
    scaling_figure,
    write_csv,
)
from vitok.platform.study import (
    StudyStore,
)
from vitok.platform.tracking import RunLogger, resolve_uri
from vitok.tokenizer.config import TokenizerConfig


@dataclasses.dataclass
class StudyResult:
    store: StudyStore
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    fits: dict[str, float]
    parent_run_id: str | None
    best: dict[str, Any] | None = None  # the registered best tokenizer: trial, uri


def trial_line(result: dict[str, Any]) -> str:
    """``E=1024, PSNR 21.3 dB, SSIM 0.61, platform 12%`` for a finished trial's console line."""
    shown = [f"E={result['E']}"] if "E" in result else []
    for key, label, unit in (("val/psnr", "PSNR", " dB"), ("val/ssim", "SSIM", "")):
        if key in result:
            shown.append(f"{label} {result[key]:.3g}{unit}")
    if "time/platform_share" in result:
        shown.append(f"platform {result['time/platform_share']:.0%}")
    return ", ".join(shown) or "no metrics"


def register_best(
    cfg: ExperimentConfig, store: StudyStore, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Register the best trial's tokenizer (first objective) as an MLflow model version,
    once per best trial (a resumed study with the same best registers nothing new)."""
    from vitok.pipelines.model_registry import register_tokenizer

    name = cfg.tracking.registered_model
    metric, mode = parse_objective(cfg.search.objectives[0])
    key = objective_key(metric)
    scored = [r for r in rows if isinstance(r.get(key), int | float) and r.get("tokenizer_run_id")]
    if not name or not cfg.tracking.enabled:
        return None
    if not scored:
        if rows:  # the preflight checks the objective; a metric can still be skipped
            print(
                f"[vitok] warning: no finished trial has {key} (search.objectives' first, "
                f"{cfg.search.objectives[0]!r}): no best tokenizer registered as {name!r}"
            )
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
    tokenizer: TokenizerConfig,
    store: StudyStore,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
) -> dict[str, float]:
    """Plots, tables and the paper comparison into the study's ``report/`` and the parent
    run (built in local scratch, then copied under the storage root). ``tokenizer``: the
    study's base tokenizer (its input size picks the paper's rows)."""
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as tmp:
        out = Path(tmp)
        fits = _write_report_files(tokenizer, store.name, out, rows, failed, logger)
        storage.upload(out, store.path("report"))
    return fits


def _write_report_files(
    tokenizer: TokenizerConfig,
    study_name: str,
    out: Path,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
) -> dict[str, float]:
    fits: dict[str, float] = {}
    present = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    write_csv(rows, present, out / "trials.csv")
    lines = [f"# Scaling study `{study_name}`", ""]
    for sweep in _sweeps(rows):
        lines += _plot_sweep(sweep, study_name, out, fits, logger)
    lines += ["## All trials", "", markdown_table(rows, present), ""]
    if failed:
        lines += ["## Failed or stopped trials", "", markdown_table(failed, ["trial", "error"]), ""]
    paper = _beside_paper(rows, tokenizer.input_size)
    lines += ["## The paper's findings", ""] + [f"- {k}: {v}" for k, v in FINDINGS.items()]
    if paper:
        lines += ["", "### Our numbers beside the paper's", ""]
        lines += [markdown_table(paper, list(paper[0])), ""]
    _publish("\n".join(lines) + "\n", fits, out, logger)
    return fits


def _sweeps(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict], str, str, bool, str]]:
    """(file, rows, x key, x label, log2 x, fit tag) of the E, encoder and decoder sweeps."""
    # E sweep: all trials that share encoder and decoder sizes (the paper's finding 1).
    e_rows = _sweep_rows(rows, "E", ("encoder_size", "decoder_size")) or rows
    enc_rows = _sweep_rows(rows, "encoder_params_M", ("E", "p", "decoder_size"))
    dec_rows = _sweep_rows(rows, "decoder_params_M", ("E", "p", "encoder_size"))
    return [
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


def _plot_sweep(
    sweep: tuple[str, list[dict], str, str, bool, str],
    study_name: str,
    out: Path,
    fits: dict[str, float],
    logger: RunLogger | None,
) -> list[str]:
    """Plot one sweep (metrics against its axis, with fitted lines), add its R^2 values to
    ``fits``, and return its report section (nothing for fewer than two trials)."""
    import matplotlib.pyplot as plt

    file_name, subset, x_key, label, log2, tag = sweep
    if len(subset) < 2:
        return []
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
    lines = [f"## Against {label}", f"![{tag}]({file_name})"]
    for metric, fit in panel_fits.items():
        if fit is not None:
            fits[f"{tag}/{metric}"] = fit.r2
            lines.append(
                f"- {metric}: slope {fit.slope:.4g} per unit, R^2 = {fit.r2:.3f} (n = {fit.n})"
            )
    return [*lines, ""]


def _publish(text: str, fits: dict[str, float], out: Path, logger: RunLogger | None) -> None:
    """report.md and fits.json in the study folder; on the parent run, the same files and
    the report as the run's description."""
    (out / "report.md").write_text(text)
    (out / "fits.json").write_text(json.dumps(fits, indent=2))
    if logger:
        logger.log_artifact(out / "trials.csv", "report")
        logger.log_text(text, "report/report.md")
        # The parent run's description (a tag: MLflow keeps at most 8000 characters).
        note = text if len(text) < 7500 else text[:7500] + "\n\n(cut: see report/report.md)"
        logger.set_tags({"mlflow.note.content": note})


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
    share = time_shares(wall, work)["time/platform_share"]
    print(
        f"  time:        {work / 60:.1f} of {wall / 60:.1f} trial-minutes training and "
        f"evaluating; platform overhead {share:.0%} "
        f"(worst {worst['trial']} {worst['time/platform_share']:.0%})"
    )
    starts = sorted(r["time/to_first_step_s"] for r in timed if r.get("time/to_first_step_s"))
    if starts:  # where the overhead goes: mostly before the first step
        median = starts[len(starts) // 2]
        rest = (wall - work) / len(timed) - sum(starts) / len(starts)
        print(
            f"               per trial: {median:.0f} s to its first training step (median; "
            f"imports, MLflow, Ray Train and DeepSpeed start-up, data), {max(rest, 0):.0f} s "
            "after it (checkpoints, logging, shut-down)"
        )
