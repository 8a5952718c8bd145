"""Preprocess media into Parquet clip shards with Ray Data (reused when inputs are unchanged).

    python pipelines/preprocess.py                                # synthetic clips
    python pipelines/preprocess.py --source samples --source synthetic --set frames=8
    python pipelines/preprocess.py --source videos:/data/UCF-101 --set size=[128,128]
    python pipelines/preprocess.py --source images:/data/imagenet --set frames=1 \
        --tracking-uri sqlite:///mlflow.db

Prints the shard folders, clip counts and the rejects table; with ``--tracking-uri`` (or
MLFLOW_TRACKING_URI) logs the counts, config and rejects table to an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vitok.pipelines.cli import add_overrides_argument
from vitok.platform import storage
from vitok.platform.config import apply_overrides, flatten
from vitok.platform.data import (
    DataConfig,
    PreparedData,
    RejectedSourceError,
    ensure_ray,
    prepare,
)


def build_config(args: argparse.Namespace) -> DataConfig:
    """``--source`` and ``--set`` applied together, then validated once (order never matters)."""
    sources = [f"sources={json.dumps(list(args.source))}"] if args.source else []
    return apply_overrides(DataConfig(), sources + list(args.overrides))


def log_to_mlflow(prepared: PreparedData, uri: str, experiment: str) -> str:
    """Log counts, config and rejects table to a new run; returns the run id."""
    import mlflow

    from vitok.platform.tracking import resolve_uri

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        action="append",
        help="synthetic | samples | videos:PATH | images:PATH | PATH (repeatable)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="storage root: a folder, s3://bucket/prefix or a shared mount "
        "(default $VITOK_STORAGE or ./results); shards go to <root>/data/<hash>",
    )
    add_overrides_argument(parser, example="frames=8")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--experiment", default="vitok-preprocess")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as err:
        parser.error(str(err))

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
        prepared = prepare(cfg, storage.resolve_root(args.storage), progress=not args.no_progress)
    except RejectedSourceError as err:  # a wrong path or codec: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = prepared.manifest["counts"]
    print(
        f"files: {counts['files_total']} total, {counts['files_ok']} ok, "
        f"{counts['files_rejected']} rejected; clips: {prepared.num_train} train, "
        f"{prepared.num_val} val; labels: {len(prepared.label_map)}"
    )
    print(f"shards:       {prepared.root} ({len(prepared.files('train'))} train files, ")
    print(f"              {len(prepared.files('val'))} val files; listed in manifest.json)")
    print(f"rejects:      {prepared.rejects_path} ({prepared.num_rejects})")
    if args.tracking_uri:
        run_id = log_to_mlflow(prepared, args.tracking_uri, args.experiment)
        print(f"mlflow run:   {run_id} ({args.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
