"""Checks a study runs before any compute: weight files, data paths, objectives a trial
produces, cluster resources (asking an autoscaler for them), and that a resumed study keeps
its config."""

from __future__ import annotations

import os
from pathlib import Path

from vitok.pipelines.cli import (
    ExperimentConfig,
    dump_config,
)
from vitok.pipelines.search import parse_objective
from vitok.pipelines.study_trial import objective_key
from vitok.platform import storage
from vitok.platform.data.prepare import ensure_ray
from vitok.platform.metrics.evaluate import I3D_ENV, INCEPTION_ENV
from vitok.platform.study.store import (
    StudyStore,
)

# What a trial's row holds besides its tokenizer's numeric params (``tokenizer_params``).
TIME_METRICS = ("time/trial_s", "time/work_s", "time/platform_share", "time/to_first_step_s")
GEN_METRICS = (
    "diffusion_loss",
    "frechet_pixels",
    "frechet_tokenizer_latent",
    "gfid",
    "gfvd",
    "samples",
    "real_samples",
)


def missing_weight_files(cfg: ExperimentConfig) -> list[str]:
    """What a study would miss at its first step (or its evaluation), as fixes to apply."""
    import os

    problems = []
    loss = cfg.loss
    if loss.lpips_weight > 0 and (cfg.train is not None or cfg.stage2 is not None):
        if not loss.lpips_available:
            problems.append(
                f"loss.lpips_weight={loss.lpips_weight} needs loss.vgg_weights=<torchvision "
                "vgg16 state dict .pth> and loss.lpips_weights=<the lpips package's "
                "weights/v0.1/vgg.pth>; or --set loss.lpips_weight=0 to train without LPIPS"
            )
        else:
            for field in ("vgg_weights", "lpips_weights"):
                path = getattr(loss, field)
                if not Path(path).expanduser().is_file():
                    problems.append(f"loss.{field}={path!r} is not a file on this node")
    files = {
        "fid": (
            "inception_weights",
            "VITOK_INCEPTION_WEIGHTS",
            "pt_inception-2015-12-05-6726825d.pth",
        ),
        "fvd": ("i3d_weights", "VITOK_I3D_WEIGHTS", "i3d_torchscript.pt"),
    }
    for metric in cfg.metrics.require:
        field, env, file_name = files[metric]
        path = getattr(cfg.metrics, field) or os.environ.get(env)
        if not path:
            problems.append(
                f"metrics.require asks for {metric}: set metrics.{field}=<{file_name}> "
                f"(or {env}); or drop it from metrics.require"
            )
        elif not Path(path).expanduser().is_file():
            problems.append(f"metrics.{field}={path!r} ({metric}) is not a file on this node")
    return problems


def trial_metrics(cfg: ExperimentConfig, num_val: int | None = None) -> dict[str, str]:
    """Every number a trial's row can hold, mapped to "" when this study's trials produce it
    and otherwise to what they would need. ``num_val``: the val clips ``prepare`` gave (None
    before it ran: ``data.val_fraction`` decides)."""
    from vitok.pipelines.model_stats import tokenizer_params

    out = {k: "" for k, v in tokenizer_params(cfg.tokenizer).items() if _is_number(v)}
    out.update(dict.fromkeys(TIME_METRICS, ""))
    val = ""
    if cfg.data.val_fraction == 0:
        val = "a val split: data.val_fraction=0.0 holds none out (set it > 0)"
    elif num_val == 0:
        val = f"a val split: data.val_fraction={cfg.data.val_fraction} gave 0 val clips"
    inception = cfg.metrics.inception_weights or os.environ.get(INCEPTION_ENV)
    i3d = cfg.metrics.i3d_weights or os.environ.get(I3D_ENV)
    fid = "" if inception else f"metrics.inception_weights (or {INCEPTION_ENV})"
    fvd = "" if i3d else f"metrics.i3d_weights (or {I3D_ENV})"
    if not fvd and cfg.data.frames < cfg.metrics.fvd_num_frames:
        fvd = f"data.frames={cfg.data.frames} >= metrics.fvd_num_frames"
    lpips = "" if cfg.loss.lpips_available else "loss.vgg_weights and loss.lpips_weights"
    needs = {"psnr": "", "ssim": "", "lpips": lpips, "fid": fid, "fvd": fvd}
    out.update({f"val/{k}": val or need for k, need in needs.items()})
    gen = "" if cfg.generator_train is not None else "a generator: set generator_train.*"
    for name in GEN_METRICS:
        need = {"gfid": fid, "gfvd": fvd, "diffusion_loss": val}.get(name, "")
        out[f"gen/{name}"] = gen or need
    return out


def objective_problems(cfg: ExperimentConfig, num_val: int | None = None) -> list[str]:
    """Each of ``search.objectives`` that no trial of this study would produce, with the
    setting it needs: Tune's own check is off (results during training carry only the
    evaluations), and the best trial is picked by the first objective."""
    produced = trial_metrics(cfg, num_val)
    problems = []
    for objective in cfg.search.objectives:
        key = objective_key(parse_objective(objective)[0])
        if key not in produced:
            names = sorted(k for k, need in produced.items() if not need)
            problems.append(
                f"search.objectives: {objective!r} names {key!r}, which no trial produces; "
                f"a trial's numbers are {names}"
            )
        elif produced[key]:
            problems.append(
                f"search.objectives: {objective!r} ({key}) needs {produced[key]}; or drop it"
            )
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def resource_problems(cfg: ExperimentConfig) -> tuple[list[str], list[dict[str, float]]]:
    """What no node (type) of this cluster can ever hold, naming the setting to change; and
    the largest GPU stage's worker bundles, to ask an autoscaler for."""
    from vitok.platform.config import parse_resources
    from vitok.platform.study import cluster

    types = cluster.autoscaler_node_types()
    live = cluster.live_node_resources()
    where = "no node type of this cluster's autoscaler" if types else "no node of this cluster"
    problems, wanted = [], []
    stages = {"train": cfg.train, "stage2": cfg.stage2, "generator_train": cfg.generator_train}
    for stage, train in stages.items():
        if train is None:
            continue
        bundle = {
            "CPU": train.cpus_per_worker,
            **parse_resources(f"{stage}.resources", train.resources),
        }
        if train.use_gpu:
            bundle["GPU"] = 1.0
        what = cluster.describe_bundles([bundle])
        if not cluster.can_ever_fit(bundle, types, live):
            problems.append(
                f"{stage}: one worker needs {what[4:]} but {where} has that; set "
                f"{stage}.use_gpu / {stage}.cpus_per_worker / {stage}.resources to what exists "
                "(a laptop: --set " + f"{stage}.use_gpu=false --set {stage}.num_workers=1)"
            )
        elif cluster.max_bundles(bundle, types, live) < train.num_workers:
            problems.append(
                f"{stage}.num_workers={train.num_workers} asks for {train.num_workers} x "
                f"{what[4:]} but this cluster can hold at most "
                f"{cluster.max_bundles(bundle, types, live):g} at once; lower "
                f"{stage}.num_workers or add nodes"
            )
        elif train.use_gpu and len(wanted) < train.num_workers:
            wanted = [bundle] * train.num_workers
    trial = {"CPU": cfg.search.trial_cpus, **cfg.search.trial_resources_dict()}
    if not cluster.can_ever_fit(trial, types, live):
        problems.append(
            f"search.trial_resources={list(cfg.search.trial_resources)}: {where} holds a "
            f"trial driver of {cluster.describe_bundles([trial])[4:]}"
        )
    return problems, wanted if types is not None else []


def preflight(cfg: ExperimentConfig, wait_s: float = 1800.0) -> bool:
    """Fail fast, naming every missing piece and its fix, when a study cannot run here (a
    paper preset on a laptop): weight files, data, resources; all before any compute. On an
    autoscaling cluster, ask for the largest GPU stage's workers and wait (timed lines).
    Returns whether an autoscaler request stands (released when the study ends)."""
    from vitok.platform.data.sources import parse_source
    from vitok.platform.study import cluster

    problems = missing_weight_files(cfg) + objective_problems(cfg)
    for src in cfg.data.sources:
        kind, path = parse_source(src)
        if path and storage.is_local(path) and not Path(path).expanduser().exists():
            problems.append(
                f"data source {src!r} does not exist here; pass --data /path/to/dataset "
                "(a folder of videos or images at the same path on every node)"
            )
    ensure_ray(log_to_driver=False)  # trials' output: MLflow and `ray logs`; here the table
    more, wanted = resource_problems(cfg)
    problems += more
    if problems:
        raise SystemExit("error: this study cannot start:\n  - " + "\n  - ".join(problems))
    if not wanted:
        return False
    if not cluster.request_and_wait(wanted, timeout_s=wait_s, keep=True):
        raise SystemExit(f"error: the autoscaler did not bring up the GPUs within {wait_s:.0f} s")
    return True


def check_resumable(store: StudyStore, cfg: ExperimentConfig, *, force: bool) -> None:
    """A resumed study keeps its config: refuse a different one (listing the keys) unless
    ``force``."""
    from vitok.platform.config import flatten_dict, from_yaml, to_dict

    try:
        stored = from_yaml(ExperimentConfig, storage.read_text(store.path("config.yaml")))
    except ValueError as err:  # written by an older version that accepted it
        raise SystemExit(
            f"error: the stored config of {store.name} no longer loads ({err}); fix "
            f"{store.path('config.yaml')} to match, or start a new study"
        ) from None
    before, after = flatten_dict(to_dict(stored)), flatten_dict(to_dict(cfg))
    ignore = {"name", "storage.root", "tracking.uri"}  # where it runs, not what it computes
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    differ = [k for k in differ if k not in ignore]
    if not differ:
        return
    shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differ[:12])
    if not force:
        raise SystemExit(
            f"error: --resume of {store.name} with a config that differs from the stored one "
            f"({shown}); resume with the same settings, or add --force to go on with the new"
        )
    print(f"[vitok] --force: resuming {store.name} with changed settings: {shown}")
    storage.write_text(store.path("config.yaml"), dump_config(cfg))
