"""The Pareto front of a multi-objective study, and its figure.

Generic over rows of numbers (one dict per trial) and objectives ``[(row key, "max" |
"min"), ...]``: a row is on the front when no other row is at least as good on every
objective and strictly better on one. A row without a finite value for some objective is
not compared (it is neither on the front nor dominating anything).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Objective = tuple[str, str]  # (row key, "max" | "min")


def objective_values(row: Mapping[str, Any], objectives: Sequence[Objective]) -> list[float] | None:
    """The row's values, each turned so that larger is better; None if one is missing."""
    out = []
    for key, mode in objectives:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return None
        out.append(float(value) if mode == "max" else -float(value))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` (larger is better on every axis) is at least as good as ``b`` everywhere and
    strictly better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective]) -> list[bool]:
    """For each row, in order: is it on the front? Rows with equal values on every
    objective do not dominate each other, so both stay on it."""
    for key, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"objective {key!r}: mode={mode!r} must be 'max' or 'min'")
    values = [objective_values(row, objectives) for row in rows]
    flags = []
    for i, mine in enumerate(values):
        if mine is None:
            flags.append(False)
            continue
        beaten = any(
            other is not None and j != i and dominates(other, mine)
            for j, other in enumerate(values)
        )
        flags.append(not beaten)
    return flags


def pareto_figure(
    rows: Sequence[Mapping[str, Any]],
    objectives: Sequence[Objective],
    on_front: Sequence[bool],
    *,
    labels: Sequence[str],
    title: str,
):
    """The first two objectives as a scatter: front trials solid and joined by the front's
    staircase, dominated trials faded, every point labelled with its trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(objectives) < 2:
        raise ValueError("a Pareto figure needs two objectives")
    (x_key, x_mode), (y_key, y_mode) = objectives[:2]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    points = []
    for row, front, label in zip(rows, on_front, labels):
        x, y = row.get(x_key), row.get(y_key)
        if objective_values(row, objectives[:2]) is None:
            continue
        points.append((float(x), float(y), front))
        style = {"color": "tab:red", "alpha": 1.0} if front else {"color": "grey", "alpha": 0.3}
        ax.scatter([x], [y], s=40, zorder=3, **style)
        ax.annotate(
            label,
            (x, y),
            fontsize=7,
            alpha=style["alpha"] if front else 0.6,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front_points = sorted((x, y) for x, y, f in points if f)
    if len(front_points) > 1:
        xs, ys = zip(*front_points)
        # The edge of what the front dominates: past a front point along x, the next one
        # is reached only at its own x (x maximised) or from this one's x on (minimised).
        where = "pre" if x_mode == "max" else "post"
        ax.step(xs, ys, where=where, color="tab:red", alpha=0.5)
    ax.scatter([], [], color="tab:red", label=f"Pareto front ({len(front_points)})")
    ax.scatter([], [], color="grey", alpha=0.3, label="dominated")
    ax.legend(fontsize=8, loc="best")
    better = {"max": "higher is better", "min": "lower is better"}
    ax.set_xlabel(f"{x_key} ({better[x_mode]})")
    ax.set_ylabel(f"{y_key} ({better[y_mode]})")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
