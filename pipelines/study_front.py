"""The report's Pareto-front section for a study with two or more objectives: which trials
no other trial beats on every objective, the front plotted for the first two objectives,
and the front as a table. What "best" then means (every front trial registered) is in
``study_best.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitok.pipelines.study_best import FRONT_TAG
from vitok.platform.study.pareto import objective_values, pareto_figure, pareto_front
from vitok.platform.study.report import markdown_table
from vitok.platform.tracking.run_logger import RunLogger

FRONT_FILE = "pareto_front.png"
# Shown beside the objectives in the front's table: what a trial is.
FRONT_CONTEXT = ("variant", "p", "q", "c", "E", "pixels_per_float")


def mark_front(rows: list[dict[str, Any]], objectives: list[tuple[str, str]]) -> list[bool]:
    """Flags per row, and each row's ``pareto_front`` column (``yes``/``no``) for the tables."""
    flags = pareto_front(rows, objectives)
    for row, on_front in zip(rows, flags):
        row["pareto_front"] = "yes" if on_front else "no"
    return flags


def front_section(
    rows: list[dict[str, Any]],
    objectives: list[tuple[str, str]],
    study_name: str,
    out: Path,
    logger: RunLogger | None,
) -> list[str]:
    """The section (nothing for one objective or no rows): the plot, written to ``out``
    and logged to the parent run, the rule, and the front's table."""
    import matplotlib.pyplot as plt

    if len(objectives) < 2 or not rows:
        return []
    flags = mark_front(rows, objectives)
    front = [r for r, f in zip(rows, flags) if f]
    names = ", ".join(f"{k} ({'max' if m == 'max' else 'min'})" for k, m in objectives)
    shown = [k for k, _ in objectives[:2]]
    fig = pareto_figure(
        rows,
        objectives,
        flags,
        labels=[str(r.get("trial", "")) for r in rows],
        title=(
            f"{study_name}: Pareto front over {len(objectives)} objectives, "
            f"{len(front)} of {len(rows)} trials"
        ),
    )
    fig.savefig(out / FRONT_FILE, dpi=120)
    if logger:
        logger.log_figure(fig, f"report/{FRONT_FILE}")
    plt.close(fig)
    unscored = sum(objective_values(r, objectives) is None for r in rows)
    lines = [
        "## Pareto front",
        f"![pareto]({FRONT_FILE})",
        "",
        f"Objectives: {names}. A trial is on the front when no other trial is at least as "
        f"good on every objective and better on one: {len(front)} of {len(rows)} trials"
        + (f" ({unscored} without every objective's value, not compared)" if unscored else "")
        + f". The plot shows {shown[0]} against {shown[1]}; dominated trials are faded.",
        "",
        "The best model of a multi-objective study is the whole front: each front trial's "
        "tokenizer is registered as a model version (tag `pareto_front=true`), and its runs "
        f"carry the tag `{FRONT_TAG}=true` (runs table filter: "
        f"`tags.{FRONT_TAG} = 'true'`). Pick the one that fits your budget.",
        "",
    ]
    columns = ["trial", *[k for k, _ in objectives]]
    columns += [c for c in FRONT_CONTEXT if c not in columns and any(c in r for r in front)]
    best_first = sorted(front, key=lambda r: -r[objectives[0][0]] * _sign(objectives[0][1]))
    return [*lines, markdown_table(best_first, columns), ""]


def _sign(mode: str) -> float:
    return 1.0 if mode == "max" else -1.0
