"""The study's report and console: the trial table, scaling plots with fits and R^2 (each
with its direction), the Pareto front of a multi-objective study (``study_front.py``), the
pixels-per-float transfer and equal-E checks (``study_transfer.py``), the paper's numbers
beside ours, the time shares, the best tokenizer(s) registered in MLflow
(``study_best.py``), and the links that open the study in MLflow's UI."""

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
from vitok.pipelines.study_best import FRONT_RULE, print_best, study_objectives
from vitok.pipelines.study_front import front_section, mark_front
from vitok.pipelines.study_mlflow import description, mlflow_links
from vitok.pipelines.study_transfer import transfer_console, transfer_sections
from vitok.pipelines.study_trial import time_shares
from vitok.platform import storage
from vitok.platform.study.report import (
    Fit,
    console_table,
    markdown_table,
    scaling_figure,
    write_csv,
)
from vitok.platform.study.store import (
    StudyStore,
)
from vitok.platform.tracking.runs import RunLogger, resolve_uri
from vitok.tokenizer.config import TokenizerConfig


@dataclasses.dataclass
class StudyResult:
    store: StudyStore
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    fits: dict[str, Fit]  # "E/val/psnr" -> the fit (R^2, slope, direction)
    parent_run_id: str | None
    # The registered best tokenizer ({trial, uri}), or the Pareto front of a multi-objective
    # study ({rule: "pareto front", front: [{trial, uri, objective values}]}).
    best: dict[str, Any] | None = None


def trial_line(result: dict[str, Any]) -> str:
    """``E=1024, PSNR 21.3 dB, SSIM 0.61, platform 12%`` for a finished trial's console line."""
    shown = [f"E={result['E']}"] if "E" in result else []
    for key, label, unit in (("val/psnr", "PSNR", " dB"), ("val/ssim", "SSIM", "")):
        if key in result:
            shown.append(f"{label} {result[key]:.3g}{unit}")
    if "time/platform_share" in result:
        shown.append(f"platform {result['time/platform_share']:.0%}")
    return ", ".join(shown) or "no metrics"


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
    "input",  # the clip size, T x H x W
    "seed",  # train.seed
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
    "pareto_front",  # multi-objective studies: yes / no
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
    objectives: tuple[str, ...] = ("psnr:max",),
) -> dict[str, Fit]:
    """Plots, tables and the paper comparison into the study's ``report/`` and the parent
    run (built in local scratch, then copied under the storage root). ``tokenizer``: the
    study's base tokenizer (its input size picks the paper's rows); ``objectives``: the
    search's (two or more: the Pareto front section)."""
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as tmp:
        out = Path(tmp)
        fits = _write_report_files(
            tokenizer, store.name, out, rows, failed, logger, study_objectives(objectives)
        )
        storage.upload(out, store.path("report"))
    return fits


def _write_report_files(
    tokenizer: TokenizerConfig,
    study_name: str,
    out: Path,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    logger: RunLogger | None,
    objectives: list[tuple[str, str]],
) -> dict[str, Fit]:
    fits: dict[str, Fit] = {}
    if len(objectives) > 1:
        mark_front(rows, objectives)  # the tables' pareto_front column
    present = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    write_csv(rows, present, out / "trials.csv")
    lines = [f"# Scaling study `{study_name}`", ""]
    lines += front_section(rows, objectives, study_name, out, logger)
    for sweep in _sweeps(rows):
        lines += _plot_sweep(sweep, study_name, out, fits, logger)
    lines += transfer_sections(rows, study_name, out, fits, logger)
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
    # E sweep: the trials that share encoder and decoder sizes, clip size and seed (the
    # paper's finding 1, at one resolution; across clip sizes see the transfer section).
    e_rows = _sweep_rows(rows, "E", ("encoder_size", "decoder_size", "input", "seed")) or rows
    # Encoder / decoder sweeps: the same latent (E, p, q, c: c alone changes the
    # bottleneck's parameters), clip size and seed.
    latent = ("E", "p", "q", "c", "input", "seed")
    enc_rows = _sweep_rows(rows, "encoder_params_M", (*latent, "decoder_size"))
    dec_rows = _sweep_rows(rows, "decoder_params_M", (*latent, "encoder_size"))
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
    fits: dict[str, Fit],
    logger: RunLogger | None,
) -> list[str]:
    """Plot one sweep (metrics against its axis, with fitted lines), add its fits to
    ``fits``, and return its report section (nothing for fewer than two trials)."""
    import matplotlib.pyplot as plt

    file_name, subset, x_key, label, log2, tag = sweep
    if len(subset) < 2:
        return []
    sizes = {r.get("input") for r in subset}
    at = f" at {sizes.pop()}" if len(sizes) == 1 and None not in sizes else ""
    fig, panel_fits = scaling_figure(
        subset,
        x_key,
        PLOT_METRICS,
        x_label=label,
        log2_x=log2,
        title=f"{study_name}: metrics against {label} ({len(subset)} trials{at})",
    )
    fig.savefig(out / file_name, dpi=120)
    if logger:
        logger.log_figure(fig, f"report/{file_name}")
    plt.close(fig)
    lines = [f"## Against {label}{at}", f"![{tag}]({file_name})"]
    unit = f"doubling of {x_key}" if log2 else "unit"
    for metric, fit in panel_fits.items():
        if fit is not None:
            fits[f"{tag}/{metric}"] = fit
            lines.append(f"- {metric}: {fit.describe()}; slope {fit.slope:.4g} per {unit}")
    return [*lines, ""]


def _publish(text: str, fits: dict[str, Fit], out: Path, logger: RunLogger | None) -> None:
    """report.md and fits.json in the study folder; on the parent run, the same files and
    the report as the run's description."""
    (out / "report.md").write_text(text)
    (out / "fits.json").write_text(
        json.dumps({k: fit_record(f) for k, f in fits.items()}, indent=2)
    )
    if logger:
        logger.log_artifact(out / "trials.csv", "report")
        logger.log_text(text, "report/report.md")
        # The parent run's description (a tag: MLflow keeps at most 8000 characters).
        note = description(text, logger.run_id)
        note = note if len(note) < 7500 else note[:7500] + "\n\n(cut: see report/report.md)"
        logger.set_tags({"mlflow.note.content": note})


def fit_record(fit: Fit) -> dict[str, Any]:
    """A fit as fits.json keeps it: R^2 with its direction, slope and change."""
    return {
        "r2": fit.r2,
        "direction": fit.direction,
        "slope": fit.slope,
        "change": fit.change,
        "n": fit.n,
    }


def log_outcome(logger: RunLogger, fits: dict[str, Fit], best: dict[str, Any] | None) -> None:
    """On the parent run: each fit's R^2 and slope as metrics, the best model(s) as tags."""
    logger.log_metrics({f"r2/{k}": f.r2 for k, f in fits.items()})
    logger.log_metrics({f"slope/{k}": f.slope for k, f in fits.items()})
    if best and best.get("rule") == FRONT_RULE:
        front = best["front"]
        logger.set_tags(
            {
                "vitok.best_rule": FRONT_RULE,
                "vitok.best_trial": ",".join(f["trial"] for f in front),
                "vitok.best_model": ",".join(f["uri"] for f in front if f["uri"]),
            }
        )
    elif best:
        logger.set_tags({"vitok.best_trial": best["trial"], "vitok.best_model": best["uri"]})


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
    objectives = study_objectives(cfg.search.objectives)
    if len(objectives) > 1:
        columns += [k for k, _ in objectives if k not in columns] + ["pareto_front"]
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
    for key, fit in sorted(result.fits.items()):
        print(f"  R^2 {key}: {fit.describe().removeprefix('R^2 = ')}")
    for line in transfer_console(result.rows):
        print(f"  {line}")
    print_time_shares(result.rows)
    print_best(result.best)
    print(f"  report:      {result.store.path('report', 'report.md')}")
    if result.parent_run_id:
        for line in mlflow_links(resolve_uri(cfg.tracking.uri), result.parent_run_id, result.best):
            print(f"  {line}")


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
