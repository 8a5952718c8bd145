"""One trial of the scaling study: a Tune function trainable that runs one tokenizer's whole
path (stage 1, optional stage 2, evaluation, optional generator) and commits its result
under the study folder, so a rerun or a retried trial costs nothing."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from vitok.pipelines.cli import (
    ExperimentConfig,
)
from vitok.pipelines.search import parse_objective, trial_name
from vitok.platform import storage
from vitok.platform.config import apply_overrides
from vitok.platform.study.leases import TrialLease
from vitok.platform.study.store import (
    REUSED,
    StudyStore,
    report_to_tune_callback,
)

RECON_METRICS = ("psnr", "ssim", "lpips", "fid", "fvd")


def objective_key(metric: str) -> str:
    """'psnr' -> 'val/psnr' (a reconstruction metric); 'gflops', 'gen/...' stay as given."""
    return f"val/{metric}" if metric in RECON_METRICS else metric


def trial_overrides(config: dict[str, Any]) -> tuple[str, ...]:
    """A Tune trial's config (grid: its override list; Optuna: axis -> value) as overrides."""
    if "overrides" in config:
        return tuple(config["overrides"])
    return tuple(f"{k}={v}" for k, v in sorted(config.items()))


def scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, int | float | str)}


def run_trial(
    config: dict[str, Any], *, base: ExperimentConfig, study_uri: str, parent_run_id: str | None
) -> None:
    """A Tune function trainable: one tokenizer's whole path, committed, reported to Tune.

    Runs on any node: everything it reads and writes is under the storage root. A trial
    that finds its committed result reports it and returns (a rerun costs nothing); one
    whose configuration another trial is running waits for that one's result (the running
    one holds the trial's lease); one killed half-way resumes its Ray Train runs from their
    checkpoints, into its MLflow runs.
    """
    started, started_at = time.perf_counter(), time.time()  # includes this process's imports
    from ray import tune

    overrides = trial_overrides(config)
    name = trial_name(overrides)
    store = StudyStore(study_uri)
    # One running copy per configuration: a search may propose it again while it still
    # runs (two trials at a time); the second waits for the first one's result.
    lease = TrialLease(store.trial_dir(name), tune.get_context().get_trial_id() or name)
    committed = lease.acquire_or_wait(lambda: store.result(name))
    if committed is not None:  # the search proposed a configuration that already ran
        tune.report({**scalars(committed), REUSED: 1})
        return
    try:
        result = _run_held_trial(config, base, store, name, parent_run_id, started, started_at)
    finally:
        lease.release()
    tune.report(scalars(result))


def _run_held_trial(
    config: dict[str, Any],
    base: ExperimentConfig,
    store: StudyStore,
    name: str,
    parent_run_id: str | None,
    started: float,
    started_at: float,
) -> dict[str, Any]:
    """The trial's whole path, once its lease is held; returns its committed result."""
    import ray
    import ray.data

    from vitok.pipelines.model_stats import tokenizer_params
    from vitok.pipelines.tokenizer_stage import TokenizerRun, run_tokenizer
    from vitok.platform.data.prepare import prepare

    overrides = trial_overrides(config)
    # Concurrent trials' Ray Data progress bars would interleave on the study's console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    node = ray.get_runtime_context().get_node_id()
    store.log_event(name, "started", node_id=node)
    cfg = dataclasses.replace(apply_overrides(base, list(overrides)), name=name)
    prepared = prepare(cfg.data, cfg.storage.uri, progress=False)  # committed: reused at once
    objectives = [objective_key(m) for m, _ in map(parse_objective, cfg.search.objectives)]
    # Evaluations during training reach Tune (ASHA and the status table read them). Without
    # any (eval_every=0), the trial's one report below is all Tune needs, and the forwarding
    # is not set up: Tune serves it with a queue actor per trial, a process polled every
    # fraction of a second for the whole run.
    to_tune = []
    if cfg.train.eval_every > 0:
        constants = scalars(tokenizer_params(cfg.tokenizer))
        to_tune.append(report_to_tune_callback(objectives, constants))
    result: dict[str, Any] = {"trial": name, "seed": cfg.train.seed}
    failed: list[Exception] = []  # the generator's: raised once the tokenizer's run has ended

    def finish(tok: TokenizerRun) -> dict[str, float]:
        """The rest of the trial, inside the tokenizer's run: its time/* land beside its curves.
        A generator failure fails the trial and the generator's run, not the tokenizer's."""
        gen = None
        if cfg.generator_train is not None:
            try:
                gen = _generator(cfg, prepared, store, name, parent_run_id, tok)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the run ends
                failed.append(err)
                return {}
        return _record(result, tok, gen, started, started_at)

    run_tokenizer(
        cfg,
        prepared,
        run_dir=store.trial_dir(name),
        parent_run_id=parent_run_id,
        run_name=name,
        log_model=False,
        callbacks=to_tune,
        on_finish=finish,
    )
    if failed:
        raise failed[0]
    result["node_id"] = node
    store.commit(name, {**result, "params": dict(config), "overrides": list(overrides)})
    store.log_event(name, "finished", node_id=node)
    return result


def _generator(
    cfg: ExperimentConfig, prepared: Any, store: StudyStore, name: str, parent: str | None, tok: Any
) -> Any:
    """The trial's generator on its tokenizer's latents, in a run of its own."""
    from vitok.pipelines.generator_stage import run_generator

    return run_generator(
        cfg,
        prepared,
        tok.checkpoint_dir,
        run_dir=storage.join(store.trial_dir(name), "generator"),
        parent_run_id=parent,
        run_name=f"{name}-gen",
        tokenizer_run_id=tok.run_id,
    )


def _record(
    result: dict[str, Any], tok: Any, gen: Any, started: float, started_at: float
) -> dict[str, float]:
    """The trial's row from its runs (``result``, updated) and its time/* metrics."""
    result.update({"tokenizer_run_id": tok.run_id or ""})
    result.update(scalars(tok.params))
    result.update(tok.metrics)
    result["tokenizer_checkpoint"] = tok.checkpoint_dir
    work_s = tok.work_s
    if gen is not None:
        result.update({f"gen/{k.split('/', 1)[-1]}": v for k, v in gen.metrics.items()})
        result["generator_run_id"] = gen.run_id or ""
        result["generator_checkpoint"] = gen.checkpoint_dir
        work_s += gen.work_s
    result.update(time_shares(time.perf_counter() - started, work_s))
    first_step_at = tok.stage1.metrics.get("time/first_step_at", 0.0)
    if first_step_at:  # the trial's start-up: imports, data, MLflow, Ray Train, DeepSpeed
        result["time/to_first_step_s"] = max(0.0, first_step_at - started_at)
    return {k: v for k, v in result.items() if k.startswith("time/")}


def time_shares(wall_s: float, work_s: float) -> dict[str, float]:
    """A trial's wall time split into work (training steps and evaluation) and the platform's
    share (start-up, data pipelines, checkpoints, tracking). A resumed trial's work includes
    the steps done before the restart, so its share is a lower bound (clamped at 0)."""
    share = max(0.0, 1.0 - work_s / wall_s) if wall_s > 0 else 0.0
    return {"time/trial_s": wall_s, "time/work_s": work_s, "time/platform_share": share}
