"""Preprocess media into Parquet clip shards with Ray Data: the shards a study of the same
config trains on (the same hash), so a corpus can be prepared once, before a study.

    python pipelines/preprocess.py                              # the demo preset's data
    python pipelines/preprocess.py --preset paper-video-ucf --data /data/UCF-101
    python pipelines/preprocess.py --preset paper-video-ucf --data /data/UCF-101 --print-config
    ray job submit --working-dir . -- python pipelines/preprocess.py \\
        --preset paper-video-ucf --data s3://my-bucket/UCF-101 --storage s3://my-bucket/vitok
    python pipelines/preprocess.py --source samples --source synthetic --set data.frames=8
    python pipelines/preprocess.py --set data.frames=1 --source images:/data/imagenet/train \\
        --tracking-uri sqlite:///mlflow.db

``--preset``, ``--config``, ``--set``, ``--data`` and ``--print-config`` are the options of
every entry point (the demo preset when neither a preset nor a config is given);
``--print-config`` also prints the data hash and the shards' folder. ``--source`` (repeatable)
gives several sources with their kinds; ``--storage`` is ``--set storage.root=...``; a
``--set`` key that names a data field alone (``frames=8``) means ``data.frames=8``.

A killed run continues where it stopped when the same command runs again: the files of
committed units are not decoded again. Prints the progress (files, clips/s, rejects, time
left), the shard folder, clip counts and the rejects table; with ``--tracking-uri`` (or
MLFLOW_TRACKING_URI) logs the counts, config and rejects table to an MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from vitok.pipelines.cli import ExperimentConfig, config_from_args, config_parser, show_config
from vitok.platform import storage
from vitok.platform.config import flatten
from vitok.platform.data.prepare import (
    DataConfig,
    PreparedData,
    RejectedSourceError,
    ensure_ray,
    prepare,
    shards_folder,
)

TOP_LEVEL = {f.name for f in dataclasses.fields(ExperimentConfig)}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


def data_overrides(overrides: list[str]) -> list[str]:
    """``frames=8`` (a data field alone, as this command took before) -> ``data.frames=8``;
    every other key is left for the config to check."""
    out = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        head = key.split(".", 1)[0]
        out.append(
            f"data.{item.strip()}" if head not in TOP_LEVEL and head in DATA_FIELDS else item
        )
    return out


def build_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ExperimentConfig:
    """Preset or YAML, then ``--source``/``--storage`` and ``--set`` together, then
    ``--data``: one validation, errors through ``parser.error`` naming the field."""
    if args.source and args.data:
        parser.error("give --data FOLDER or --source ... (repeatable), not both")
    args.overrides = data_overrides(args.overrides)
    if args.source:
        args.overrides.insert(0, f"data.sources={json.dumps(list(args.source))}")
    if args.storage:
        args.overrides.insert(0, f"storage.root={args.storage}")
    return config_from_args(parser, args, "demo")


def print_data_hash(cfg: ExperimentConfig) -> None:
    """The data hash and shard folder of ``cfg`` (what a study of it reuses), as YAML
    comments after ``--print-config``'s config."""
    try:
        key, folder = shards_folder(cfg.data, cfg.storage.root)
    except (OSError, ValueError) as err:  # a source not reachable from here (a path, a bucket)
        print(f"# data hash: not computed here ({err})")
        return
    print(f"# data hash: {key}")
    print(f"# shards:    {folder}")


def log_to_mlflow(prepared: PreparedData, uri: str, experiment: str) -> str:
    """Log counts, config and rejects table to a new run; returns the run id."""
    import mlflow

    from vitok.platform.tracking.runs import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(uri))  # absolute: Ray workers run elsewhere
    mlflow.set_experiment(experiment)
    counts = prepared.manifest["counts"]
    with mlflow.start_run(run_name=f"preprocess-{prepared.config_hash}") as run:
        cfg = DataConfig(**_config_kwargs(prepared.manifest["config"]))
        mlflow.log_params({f"data.{k}": str(v)[:500] for k, v in flatten(cfg).items()})
        mlflow.log_metrics({k: float(v) for k, v in counts.items() if isinstance(v, int)})
        mlflow.set_tags({"data.hash": prepared.config_hash, "data.root": str(prepared.root)})
        mlflow.log_artifact(str(storage.local_copy(prepared.rejects_path)), artifact_path="data")
        mlflow.log_dict(prepared.manifest, "data/manifest.json")
        mlflow.log_dict(prepared.label_map, "data/labels.json")
        return run.info.run_id


def _config_kwargs(data: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _parser() -> argparse.ArgumentParser:
    parser = config_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        action="append",
        help="synthetic | samples | videos:PATH | images:PATH | PATH (repeatable; a PATH "
        "may be a URI such as s3://bucket/UCF-101)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="storage root: a folder, s3://bucket/prefix or a shared mount "
        "(default: the config's storage.root, else $VITOK_STORAGE or ./results); shards go "
        "to <root>/data/<hash>",
    )
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--experiment", default="vitok-preprocess")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = build_config(parser, args)
    if show_config(args, cfg):
        print_data_hash(cfg)
        return 0
    if args.num_cpus is not None:
        import ray

        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            ray.init(
                address="local",
                num_cpus=args.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
            )
    ensure_ray()
    try:
        prepared = prepare(cfg.data, cfg.storage.uri, progress=not args.no_progress)
    except RejectedSourceError as err:  # a wrong path or codec: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = prepared.manifest["counts"]
    print(
        f"files: {counts['files_total']} total, {counts['files_ok']} ok, "
        f"{counts['files_rejected']} rejected; clips: {prepared.num_train} train, "
        f"{prepared.num_val} val; labels: {len(prepared.label_map)}"
    )
    if prepared.reused:
        print("decoded now:  none (committed before: reused)")
    else:
        print(f"decoded now:  {prepared.decoded_files} of {counts['files_total']} files")
    print(f"data hash:    {prepared.config_hash} (a study of this config reuses these shards)")
    print(f"shards:       {prepared.root} ({len(prepared.files('train'))} train files, ")
    print(f"              {len(prepared.files('val'))} val files; listed in manifest.json)")
    print(f"rejects:      {prepared.rejects_path} ({prepared.num_rejects})")
    if args.tracking_uri:
        run_id = log_to_mlflow(prepared, args.tracking_uri, args.experiment)
        print(f"mlflow run:   {run_id} ({args.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
