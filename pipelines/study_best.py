"""The study's best tokenizer(s), registered in MLflow.

One objective: the best trial by it is registered as a version of the model.
Several objectives: there is no single best without a preference between them, so the best
models are the Pareto front (the trials no other trial beats on every objective): each
front trial is registered as a version (tagged ``pareto_front=true`` with its objective
values), a researcher picks the one that fits their budget, and every trial's runs carry
the tag ``vitok.pareto_front`` (``true``/``false``) so MLflow's runs table filters to the
front (``tags.vitok.pareto_front = 'true'``). A resumed study registers only trials not
registered before; a version whose trial has left the front is re-tagged ``false``.
"""

from __future__ import annotations

from typing import Any

from vitok.pipelines.experiment import ExperimentConfig
from vitok.pipelines.search import parse_objective
from vitok.pipelines.study_trial import objective_key
from vitok.platform import storage
from vitok.platform.config import apply_overrides
from vitok.platform.study.pareto import pareto_front
from vitok.platform.study.store import StudyStore

FRONT_TAG = "vitok.pareto_front"
FRONT_RULE = "pareto front"
RECORD = "registered_model.json"


def study_objectives(objectives: tuple[str, ...]) -> list[tuple[str, str]]:
    """``("psnr:max", "gflops:min")`` -> ``[("val/psnr", "max"), ("gflops", "min")]``."""
    return [(objective_key(m), mode) for m, mode in map(parse_objective, objectives)]


def register_best(
    cfg: ExperimentConfig, store: StudyStore, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Single objective: the best trial, registered once (a resumed study with the same best
    registers nothing new). Several: the front (``register_front``)."""
    objectives = study_objectives(cfg.search.objectives)
    if len(objectives) > 1:
        return register_front(cfg, store, rows, objectives)
    key, mode = objectives[0]
    scored = [r for r in rows if isinstance(r.get(key), int | float) and r.get("tokenizer_run_id")]
    if not cfg.tracking.registered_model or not cfg.tracking.enabled:
        return None
    if not scored:
        if rows:  # the preflight checks the objective; a metric can still be skipped
            print(
                f"[vitok] warning: no finished trial has {key} (search.objectives' first, "
                f"{cfg.search.objectives[0]!r}): no best tokenizer registered as "
                f"{cfg.tracking.registered_model!r}"
            )
        return None
    best = (max if mode == "max" else min)(scored, key=lambda r: r[key])
    record_uri = store.path(RECORD)
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("trial") == best["trial"]:
            return record
    tags = {"study": store.name, "trial": best["trial"], key: best[key], "E": best.get("E", "")}
    uri = _register(cfg, store.results(), best, tags)
    if uri is None:
        return None
    record = {"trial": best["trial"], "uri": uri, key: best[key]}
    storage.write_json(record_uri, record)
    return record


def register_front(
    cfg: ExperimentConfig,
    store: StudyStore,
    rows: list[dict[str, Any]],
    objectives: list[tuple[str, str]],
) -> dict[str, Any] | None:
    """Tag every trial's runs on or off the front; register each front trial not registered
    before. Returns ``{"rule": "pareto front", "objectives": [...], "front": [{trial, uri,
    objective values}, ...]}`` (uri "" where registration is off or failed)."""
    if not cfg.tracking.enabled:
        return None
    flags = pareto_front(rows, objectives)
    tag_front_runs(cfg.tracking.uri, rows, flags)
    record_uri = store.path(RECORD)
    old = storage.read_json(record_uri) if storage.exists(record_uri) else {}
    registered: dict[str, str] = dict(old.get("registered", {}))
    results, front = store.results(), []
    for row, on_front in zip(rows, flags):
        if not on_front:
            continue
        values = {key: row[key] for key, _ in objectives}
        trial = row["trial"]
        if (
            trial not in registered
            and cfg.tracking.registered_model
            and row.get("tokenizer_run_id")
        ):
            tags = {"study": store.name, "trial": trial, "pareto_front": "true", **values}
            uri = _register(cfg, results, row, {**tags, "E": row.get("E", "")})
            if uri:
                registered[trial] = uri
        front.append({"trial": trial, "uri": registered.get(trial, ""), **values})
    _retag_versions(cfg.tracking.uri, registered, {f["trial"] for f in front})
    record = {
        "rule": FRONT_RULE,
        "objectives": [f"{k}:{m}" for k, m in objectives],
        "front": front,
        "registered": registered,
    }
    storage.write_json(record_uri, record)
    return record


def tag_front_runs(uri: str | None, rows: list[dict[str, Any]], flags: list[bool]) -> None:
    """``vitok.pareto_front`` = ``true``/``false`` on each trial's tokenizer and generator
    runs (finished runs: tagged through the client, a failure is a warning)."""
    from vitok.platform.tracking.tracking_client import mlflow_client, resolve_uri

    client = mlflow_client(resolve_uri(uri))
    for row, on_front in zip(rows, flags):
        for key in ("tokenizer_run_id", "generator_run_id"):
            if row.get(key):
                try:
                    client.set_tag(row[key], FRONT_TAG, "true" if on_front else "false")
                except Exception as err:  # noqa: BLE001 - the report still shows the front
                    print(f"[vitok] warning: could not tag run {row[key]} with {FRONT_TAG}: {err}")


def _retag_versions(uri: str | None, registered: dict[str, str], front: set[str]) -> None:
    """A version registered as a front trial whose trial a later sample beat: ``false``."""
    from vitok.platform.tracking.tracking_client import mlflow_client, resolve_uri

    client = mlflow_client(resolve_uri(uri))
    for trial, model in registered.items():
        if trial in front or not model.startswith("models:/"):
            continue
        name, version = model[len("models:/") :].rsplit("/", 1)
        try:
            client.set_model_version_tag(name, version, "pareto_front", "false")
        except Exception as err:  # noqa: BLE001
            print(f"[vitok] warning: could not re-tag {model} (no longer on the front): {err}")


def _register(
    cfg: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    row: dict[str, Any],
    tags: dict[str, Any],
) -> str | None:
    """Log one trial's tokenizer as an MLflow model and register it as a version."""
    from vitok.pipelines.model_registry import register_tokenizer

    name = cfg.tracking.registered_model
    overrides = results[row["trial"]].get("overrides", [])
    tokenizer = apply_overrides(cfg, list(overrides)).tokenizer
    try:
        return register_tokenizer(
            cfg.tracking.uri,
            row["tokenizer_run_id"],
            row["tokenizer_checkpoint"],
            tokenizer,
            name,
            tags,
        )
    except Exception as err:  # e.g. a tracking store without a model registry
        print(f"[vitok] warning: could not register trial {row['trial']} as {name!r}: {err}")
        return None


def print_best(best: dict[str, Any] | None) -> None:
    """The registered best model, or each model of the Pareto front with its values."""
    if not best:
        return
    if best.get("rule") != FRONT_RULE:
        print(f"  best model:  {best['uri']} (trial {best['trial']})")
        return
    front = best["front"]
    registered = sum(bool(entry["uri"]) for entry in front)
    print(
        f"  best models: the Pareto front of {', '.join(best['objectives'])}: {len(front)} "
        f"trials, {registered} registered (no single best without a preference between "
        "objectives)"
    )
    for entry in front:
        keys = [objective.rpartition(":")[0] for objective in best["objectives"]]
        values = ", ".join(f"{k} {entry[k]:.4g}" for k in keys)
        print(f"               {entry['trial']}: {values}  {entry['uri'] or '(not registered)'}")
