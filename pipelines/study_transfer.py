"""The report's pixels-per-float sections (the paper: at a fixed pixels-per-float,
T*H*W*3 / E, results transfer across resolutions and frame counts; at equal E, different
(p, c) pairs score nearly the same).

- Transfer: trials of one recipe (p, q, encoder, decoder) at two or more clip sizes. PSNR
  against log2 pixels-per-float, one colour per size, a line fitted through all points and
  one per size, and the mean |dPSNR| between sizes at equal pixels-per-float. For contrast,
  the same points fitted against log2 E.
- Equal E: trials at one clip size and E with different (p, c); their PSNR difference.
- Seeds: trials that differ only in ``train.seed`` give the seed-to-seed |dPSNR|, the
  noise the two differences above are read against.

Every section is left out when its trials are not in the study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vitok.platform.study.report import Fit, fit_line, grouped_figure, markdown_table
from vitok.platform.tracking.run_logger import RunLogger

METRIC = "val/psnr"
SIZE = "input"  # "8x32x32": the clip size a trial's tokenizer takes (model_stats)
RECIPE = ("p", "q", "encoder_size", "decoder_size")
TRANSFER_FILE = "transfer_ppf.png"


def _scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if isinstance(r.get(METRIC), int | float) and SIZE in r]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def transfer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest group of one recipe seen at two or more clip sizes (else none)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in _scored(rows):
        groups.setdefault(tuple(row.get(k) for k in RECIPE), []).append(row)
    multi = [g for g in groups.values() if len({r[SIZE] for r in g}) >= 2]
    return max(multi, key=len, default=[])


def matched(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pixels-per-float seen at two or more sizes: each size's PSNR (mean over seeds)
    and the spread between sizes (max - min; for two sizes |dPSNR|)."""
    sizes = sorted({r[SIZE] for r in rows}, key=_pixels)
    out = []
    for ppf in sorted({r["pixels_per_float"] for r in rows}):
        at = {
            s: [r[METRIC] for r in rows if r["pixels_per_float"] == ppf and r[SIZE] == s]
            for s in sizes
        }
        present = {s: _mean(v) for s, v in at.items() if v}
        if len(present) >= 2:
            row = {"pixels_per_float": ppf, **{f"psnr {s}": present.get(s) for s in sizes}}
            row["abs dPSNR"] = max(present.values()) - min(present.values())
            out.append(row)
    return out


def equal_e(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of trials at one clip size, E, encoder, decoder and seed with different
    (p, c): one row per group, its trials and their PSNR spread (max - min)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in _scored(rows):
        key = (row[SIZE], row.get("E"), row.get("encoder_size"), row.get("decoder_size"))
        groups.setdefault((*key, row.get("seed")), []).append(row)
    out = []
    for (size, e, *_), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len({(r.get("p"), r.get("q"), r.get("c")) for r in group}) < 2:
            continue
        trials = ", ".join(
            f"{r['trial']} (p={r.get('p')}, c={r.get('c')}, L={r.get('L')}): {r[METRIC]:.2f} dB"
            for r in sorted(group, key=lambda r: r.get("p", 0))
        )
        spread = max(r[METRIC] for r in group) - min(r[METRIC] for r in group)
        out.append({"size": size, "E": e, "trials": trials, "abs dPSNR": spread})
    return out


def seed_differences(rows: list[dict[str, Any]]) -> list[float]:
    """|dPSNR| of each group of trials that differ only in their seed (max - min)."""
    groups: dict[tuple, list[float]] = {}
    for row in _scored(rows):
        key = (row[SIZE], row.get("E"), *(row.get(k) for k in (*RECIPE, "c")))
        groups.setdefault(key, []).append((row.get("seed"), row[METRIC]))
    spreads = []
    for values in groups.values():
        if len({seed for seed, _ in values}) >= 2:
            psnrs = [v for _, v in values]
            spreads.append(max(psnrs) - min(psnrs))
    return spreads


def verdict(difference: float, seeds: list[float]) -> str:
    """A difference read against the seed-to-seed one: within it, or larger."""
    if not seeds:
        return "no two trials differ only in their seed, so the noise is unknown"
    if difference <= max(seeds):
        return (
            f"within the seed-to-seed difference (max {max(seeds):.2f} dB): consistent with "
            "the paper"
        )
    return (
        f"larger than the seed-to-seed difference (max {max(seeds):.2f} dB): the paper's "
        "claim does not hold at this scale"
    )


def transfer_sections(
    rows: list[dict[str, Any]],
    study_name: str,
    out: Path,
    fits: dict[str, Fit],
    logger: RunLogger | None,
) -> list[str]:
    """The report's sections (the transfer plot into ``out`` and onto the parent run; its
    fits into ``fits`` as ``ppf/<all|size>/val/psnr``)."""
    seeds = seed_differences(rows)
    lines = _transfer_section(transfer_rows(rows), study_name, out, fits, logger, seeds)
    pairs = equal_e(rows)
    if pairs:
        lines += [
            "## Equal E, different (p, c)",
            "",
            "The paper: at equal E, different (p, c) pairs score nearly the same. Here:",
            "",
            *(f"- {p['size']}, E = {p['E']}: {_equal_e_text(p, seeds)}" for p in pairs),
            "",
            markdown_table(pairs, ["size", "E", "trials", "abs dPSNR"]),
            "",
        ]
    if seeds and lines:
        lines += [
            f"Seed-to-seed |dPSNR| (trials that differ only in `train.seed`): mean "
            f"{_mean(seeds):.2f} dB, max {max(seeds):.2f} dB over {len(seeds)} pair(s): the "
            "noise the differences above are read against.",
            "",
        ]
    return lines


def _equal_e_text(pair: dict[str, Any], seeds: list[float]) -> str:
    return f"|dPSNR| {pair['abs dPSNR']:.2f} dB, {verdict(pair['abs dPSNR'], seeds)}"


def _transfer_section(
    rows: list[dict[str, Any]],
    study_name: str,
    out: Path,
    fits: dict[str, Fit],
    logger: RunLogger | None,
    seeds: list[float],
) -> list[str]:
    import matplotlib.pyplot as plt

    if not rows:
        return []
    fig, panel = grouped_figure(
        rows,
        "pixels_per_float",
        METRIC,
        SIZE,
        x_label="pixels per float (T*H*W*3 / E)",
        y_label="PSNR (dB)",
        title=f"{study_name}: PSNR against pixels per float, by clip size ({len(rows)} trials)",
        log2_x=True,
    )
    fig.savefig(out / TRANSFER_FILE, dpi=120)
    if logger:
        logger.log_figure(fig, f"report/{TRANSFER_FILE}")
    plt.close(fig)
    lines = ["## Transfer at equal pixels per float", f"![transfer]({TRANSFER_FILE})", ""]
    for group, fit in panel.items():
        if fit is not None:
            fits[f"ppf/{group}/{METRIC}"] = fit
            lines.append(f"- {group}: {fit.describe()}; slope {fit.slope:.3g} dB per doubling")
    lines += ["", *_transfer_findings(rows, panel.get("all"), seeds)]
    table = matched(rows)
    if table:
        lines += ["", markdown_table(table, list(table[0]))]
    return [*lines, ""]


def _transfer_findings(rows: list[dict[str, Any]], every: Fit | None, seeds: list[float]):
    """The mean |dPSNR| at equal pixels per float against the seed noise, which size scores
    higher, and whether E or pixels per float predicts PSNR better across sizes."""
    out = []
    table = matched(rows)
    if table:
        diffs = [r["abs dPSNR"] for r in table]
        out.append(
            f"Mean |dPSNR| between clip sizes at equal pixels per float: {_mean(diffs):.2f} dB "
            f"(max {max(diffs):.2f} dB, {len(diffs)} points): {verdict(_mean(diffs), seeds)}."
        )
        sizes = sorted({r[SIZE] for r in rows}, key=_pixels)
        small, large = f"psnr {sizes[0]}", f"psnr {sizes[-1]}"
        signs = {np.sign(r[large] - r[small]) for r in table if r.get(large) and r.get(small)}
        if len(signs) == 1 and signs != {0}:
            higher = sizes[-1] if signs == {1} else sizes[0]
            out.append(f"{higher} scores higher at every pixels per float seen at both sizes.")
    by_e = fit_line(np.log2([r["E"] for r in rows]), [r[METRIC] for r in rows])
    if every is not None and by_e is not None:
        better = (
            "pixels per float, as the paper says"
            if every.r2 >= by_e.r2
            else "E, not pixels per float"
        )
        out.append(
            f"Through all points, log2 pixels per float gives R^2 = {every.r2:.3f} "
            f"({every.direction}) and log2 E gives R^2 = {by_e.r2:.3f} ({by_e.direction}): "
            f"across clip sizes, {better}, predicts PSNR better here."
        )
    return out


def transfer_console(rows: list[dict[str, Any]]) -> list[str]:
    """The transfer, equal-E and seed figures in a line each, for the study's summary."""
    lines = []
    seeds = seed_differences(rows)
    table = matched(transfer_rows(rows))
    if table:
        diffs = [r["abs dPSNR"] for r in table]
        lines.append(
            f"transfer:    mean |dPSNR| between clip sizes at equal pixels per float "
            f"{_mean(diffs):.2f} dB (max {max(diffs):.2f}, {len(diffs)} points), "
            f"{verdict(_mean(diffs), seeds)}"
        )
    for pair in equal_e(rows):
        lines.append(
            f"equal E:     {pair['size']} E={pair['E']}: {_equal_e_text(pair, seeds)} "
            f"({pair['trials']})"
        )
    if seeds and lines:
        lines.append(
            f"seeds:       |dPSNR| between seeds {_mean(seeds):.2f} dB mean, "
            f"{max(seeds):.2f} max ({len(seeds)} pairs)"
        )
    return lines


def _pixels(size: str) -> int:
    return int(np.prod([int(v) for v in str(size).split("x")]))
