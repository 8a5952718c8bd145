"""Train a latent generator (DiT) on a trained, frozen tokenizer; tracked in MLflow.

    python pipelines/train_generator.py --tokenizer-run RUN_ID
    python pipelines/train_generator.py --tokenizer-checkpoint DIR --preset tokenizer-demo \\
        --set generator_train.steps=300

With ``--tokenizer-run`` and no ``--preset``/``--config``, the tokenizer run's own
``config.yaml`` is the base config (so data and tokenizer match the checkpoint). Without a
``generator_train`` section, the tokenizer's ``train`` settings are used. Rerunning the same
command resumes the generator's training and its MLflow run. The generation metrics draw
``metrics.gen_samples`` samples (``--set metrics.gen_samples=50000`` for the paper's count).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from vitok.pipelines.cli import (
    ExperimentConfig,
    config_from_args,
    config_parser,
    preset,
    print_run_summary,
    resolve_config,
    show_config,
    with_data,
)
from vitok.pipelines.generator_stage import run_generator
from vitok.platform.config import apply_overrides, from_yaml
from vitok.platform.data.prepare import ensure_ray, prepare
from vitok.platform.tracking.runs import resolve_uri


def tokenizer_from_run(uri: str, run_id: str) -> tuple[str, ExperimentConfig | None]:
    """The ``checkpoint`` tag of a tokenizer run and its logged config (None if absent)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    checkpoint = run.data.tags.get("checkpoint")
    if not checkpoint:
        raise SystemExit(f"error: MLflow run {run_id} has no 'checkpoint' tag (unfinished run?)")
    config = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
            config = from_yaml(ExperimentConfig, Path(path).read_text())
    except Exception as err:  # an older run without config.yaml: the caller's config is used
        print(f"[vitok] run {run_id}: no usable config.yaml ({err}); using the given config")
    return checkpoint, config


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer-checkpoint", type=Path, help="a tokenizer checkpoint folder")
    source.add_argument("--tokenizer-run", help="an MLflow tokenizer run id (its checkpoint tag)")
    parser.add_argument("--name", default=None, help="the generator run's name")
    parser.add_argument("--parent-run", default=None, help="an MLflow parent run id")
    args = parser.parse_args(argv)

    tokenizer_run_id = args.tokenizer_run
    if tokenizer_run_id:
        base = resolve_config(args, preset("tokenizer-demo"), preset)
        checkpoint, run_cfg = tokenizer_from_run(resolve_uri(base.tracking.uri), tokenizer_run_id)
        if run_cfg is not None and args.preset is None and args.config is None:
            cfg = with_data(apply_overrides(run_cfg, args.overrides), args.data)
        else:
            cfg = with_data(base, args.data)
    else:
        cfg = config_from_args(parser, args, "tokenizer-demo")
        checkpoint = str(args.tokenizer_checkpoint)
    if cfg.generator_train is None:
        print("[vitok] no generator_train section: using the tokenizer's train settings")
        cfg = dataclasses.replace(cfg, generator_train=cfg.train)
    if show_config(args, cfg):
        return 0

    t0 = time.perf_counter()
    ensure_ray()
    prepared = prepare(cfg.data, cfg.storage.uri)
    run = run_generator(
        cfg,
        prepared,
        checkpoint,
        parent_run_id=args.parent_run,
        run_name=args.name,
        tokenizer_run_id=tokenizer_run_id,
    )
    what = (
        f"DiT-{cfg.generator.size} on {cfg.tokenizer.variant} latents "
        f"{tuple(run.latents.latent_shape)}"
    )
    print_run_summary(what, run, cfg.tracking.uri, started=t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
