"""The study in MLflow's UI: the report as the parent run's description with its plots
rendering, and the direct links the summary prints.

MLflow 3.17 has a GenAI / Model training switch at the top of its sidebar, kept in the
browser (not taken from the experiment's ``mlflow.experimentKind``): a fresh browser opens
``#/experiments/<id>`` on the GenAI overview. A link with ``workflowType=machine_learning``
selects Model training, where the runs table is; ``searchFilter=...`` sets its filter.
Relative images in a description resolve against the UI's page, not the run's artifacts,
so they point at the server's ``get-artifact`` route. Both checked in headless Chromium.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from vitok.pipelines.study_best import FRONT_RULE, FRONT_TAG

VIEW = "workflowType=machine_learning"


def description(text: str, run_id: str) -> str:
    """The report as the parent run's description: each ``![tag](plot.png)`` (relative to
    report.md) points at the run's artifact ``report/plot.png`` through the MLflow server's
    ``get-artifact`` route, relative to the UI's page, so the plots render inside MLflow
    (with or without a ``--static-prefix``)."""
    return re.sub(
        r"!\[([^\]]*)\]\(([\w.-]+\.png)\)",
        lambda m: f"![{m[1]}](get-artifact?path=report%2F{m[2]}&run_uuid={run_id})",
        text,
    )


def mlflow_links(uri: str, run_id: str, best: dict[str, Any] | None = None) -> list[str]:
    """How to open the study in MLflow's UI: the server command (a local store) and direct
    links, in the Model training view, to the runs table, the parent run and (a
    multi-objective study) the runs table filtered to the Pareto front."""
    from vitok.platform.tracking.tracking_client import mlflow_client

    try:
        experiment = mlflow_client(uri).get_run(run_id).info.experiment_id
    except Exception as err:  # noqa: BLE001 - the links are a convenience
        return [f"mlflow:      parent run {run_id} ({uri}; could not read it: {err})"]
    if uri.startswith(("http://", "https://")):
        base, lines = uri.rstrip("/"), []
    else:
        base = "http://127.0.0.1:5000"
        lines = [f"mlflow:      mlflow ui --backend-store-uri {uri}   then open:"]
    runs = f"{base}/#/experiments/{experiment}/runs"
    lines += [
        f"runs table:  {runs}?{VIEW}",
        f"this study:  {runs}/{run_id}?{VIEW}",
    ]
    if best and best.get("rule") == FRONT_RULE:
        front = quote(f"tags.{FRONT_TAG} = 'true'", safe="")
        lines.append(f"the front:   {runs}?{VIEW}&searchFilter={front}")
    lines.append(
        "             (a plain link opens on MLflow's GenAI views: pick 'Model training' at "
        "the top of the sidebar)"
    )
    return lines
