"""Study reports: least-squares fits with R^2, scaling plots and tables.

Generic over rows of numbers (one dict per trial), so any study can use it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Fit:
    slope: float
    intercept: float
    r2: float
    n: int
    span: float = 0.0  # the range of x the fit covers (max - min)
    level: float = 0.0  # the mean of y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.slope * x + self.intercept

    @property
    def change(self) -> float:
        """The fitted change of y across the x range the fit covers."""
        return self.slope * self.span

    @property
    def direction(self) -> str:
        """``rising`` or ``falling`` by the slope's sign, ``flat`` when the fitted change
        across the sweep is under 0.1% of the mean level: an R^2 alone does not say which
        way a sweep goes (a falling decoder sweep can have R^2 = 0.99)."""
        if abs(self.change) <= 1e-3 * abs(self.level):
            return "flat"
        return "rising" if self.slope > 0 else "falling"

    def describe(self) -> str:
        """``R^2 = 0.940, rising (+1.9 across the sweep, n = 4)``"""
        return (
            f"R^2 = {self.r2:.3f}, {self.direction} ({self.change:+.3g} across the sweep, "
            f"n = {self.n})"
        )


def _label_trials(ax, x: np.ndarray, y: np.ndarray, rows: list[dict[str, Any]]) -> None:
    """Each finite point labelled with its row's trial name."""
    for xi, yi, row in zip(x, y, rows):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(
                str(row.get("trial", "")),
                (xi, yi),
                fontsize=6,
                alpha=0.7,
                xytext=(3, 3),
                textcoords="offset points",
            )


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """Ordinary least squares y = a x + b with R^2; None with < 3 points or constant x."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if xs.size < 3 or np.ptp(xs) == 0:
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (slope * xs + intercept)
    total = ys - ys.mean()
    ss_tot = float(total @ total)
    r2 = 1.0 - float(residual @ residual) / ss_tot if ss_tot > 0 else 0.0
    span, level = float(np.ptp(xs)), float(ys.mean())
    return Fit(float(slope), float(intercept), r2, int(xs.size), span, level)


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    out = []
    for row in rows:
        v = row.get(key)
        out.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan)
    return np.asarray(out)


def scaling_figure(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    metrics: Sequence[tuple[str, str]],
    *,
    x_label: str,
    title: str,
    log2_x: bool = False,
):
    """One panel per metric: trials as points, the fitted line and its R^2.

    ``metrics`` is ``[(row key, axis label), ...]``; metrics with no finite value are left
    out. Returns ``(figure, {metric key: Fit | None})``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = _values(rows, x_key)
    if log2_x:
        x = np.log2(np.where(x > 0, x, np.nan))
    present = [(k, label) for k, label in metrics if np.isfinite(_values(rows, k)).any()]
    fits: dict[str, Fit | None] = {}
    n = max(1, len(present))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        y = _values(rows, key)
        fit = fit_line(x, y)
        fits[key] = fit
        ax.scatter(x, y, color="tab:blue", zorder=3)
        _label_trials(ax, x, y, rows)
        if fit is not None:
            grid = np.linspace(np.nanmin(x), np.nanmax(x), 50)
            ax.plot(
                grid,
                fit(grid),
                color="tab:red",
                label=f"fit: R$^2$={fit.r2:.2f}, {fit.direction} (n={fit.n})",
            )
            ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(f"log2 {x_label}" if log2_x else x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if not present:
        axes[0][0].text(0.5, 0.5, "no finite values", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig, fits


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else "-"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def console_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else "-"
        return "-" if v is None else str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})


def grouped_figure(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    group_key: str,
    *,
    x_label: str,
    y_label: str,
    title: str,
    log2_x: bool = False,
):
    """One panel: each group (``group_key``'s value) in its own colour with its own fitted
    line, and one dashed line fitted through every point. Returns ``(figure, {"all": Fit |
    None, group: Fit | None, ...})``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xs_of(subset: Sequence[Mapping[str, Any]]) -> np.ndarray:
        x = _values(subset, x_key)
        return np.log2(np.where(x > 0, x, np.nan)) if log2_x else x

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    fits: dict[str, Fit | None] = {"all": fit_line(xs_of(rows), _values(rows, y_key))}
    groups = sorted({str(r.get(group_key)) for r in rows})
    for i, group in enumerate(groups):
        subset = [r for r in rows if str(r.get(group_key)) == group]
        x, y = xs_of(subset), _values(subset, y_key)
        fit = fits[group] = fit_line(x, y)
        colour = f"C{i}"
        label = f"{group}" + (f": R$^2$={fit.r2:.2f}, {fit.direction}" if fit else "")
        ax.scatter(x, y, color=colour, zorder=3, label=label)
        _label_trials(ax, x, y, subset)
        if fit is not None:
            grid = np.linspace(np.nanmin(x), np.nanmax(x), 50)
            ax.plot(grid, fit(grid), color=colour, alpha=0.7)
    every = fits["all"]
    if every is not None:
        x = xs_of(rows)
        grid = np.linspace(np.nanmin(x), np.nanmax(x), 50)
        label = f"all: R$^2$={every.r2:.2f}, {every.direction}"
        ax.plot(grid, every(grid), color="black", linestyle="--", alpha=0.6, label=label)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"log2 {x_label}" if log2_x else x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig, fits
