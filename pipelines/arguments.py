"""The options every experiment entry point shares, and the config they resolve to.

    --preset NAME | --config FILE.yaml    the base config (one or the other; a default preset)
    --set a.b=VALUE                       overrides, applied in order (repeatable)
    --data FOLDER                         a folder of videos or images as the only source
    --print-config                        print the resolved YAML and exit

Entry points import these through ``vitok.pipelines.cli`` (see there why).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Protocol

from vitok.pipelines.experiment import ExperimentConfig, dump_config
from vitok.pipelines.presets import PRESETS, preset
from vitok.platform.config import apply_overrides, from_yaml
from vitok.platform.tracking.runs import resolve_uri


def add_overrides_argument(
    parser: argparse.ArgumentParser, example: str = "tokenizer.channels=8"
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config field, e.g. --set {example} (repeatable)",
    )


def add_config_arguments(parser: argparse.ArgumentParser, presets: list[str]) -> None:
    """``--preset``, ``--config``, ``--set`` and ``--print-config`` (no ``--data``)."""
    parser.add_argument("--preset", default=None, choices=presets, help="a named preset")
    parser.add_argument("--config", type=Path, default=None, help="a YAML config file")
    add_overrides_argument(parser)
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved YAML and exit"
    )


def config_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the five shared options; an entry point adds its own after them."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, sorted(PRESETS))
    parser.add_argument("--data", default=None, help="a folder of videos or images")
    return parser


def resolve_config(
    args: argparse.Namespace, default: ExperimentConfig, preset_fn=None
) -> ExperimentConfig:
    """Preset or YAML, then overrides; errors name the bad key or value."""
    if args.config is not None and args.preset is not None:
        raise SystemExit("error: give --preset or --config, not both")
    if args.config is not None:
        cfg = from_yaml(ExperimentConfig, args.config.read_text())
    elif args.preset is not None and preset_fn is not None:
        cfg = preset_fn(args.preset)
    else:
        cfg = default
    return apply_overrides(cfg, args.overrides)


def with_data(cfg: ExperimentConfig, folder: str | None) -> ExperimentConfig:
    """``--data FOLDER``: that folder as the only data source (None: unchanged)."""
    if not folder:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(folder,)))


def config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, default_preset: str
) -> ExperimentConfig:
    """The config of a ``config_parser`` command line: ``default_preset`` when neither
    ``--preset`` nor ``--config`` is given (``args.preset`` is set to it), then ``--set``,
    then ``--data``. A bad value exits through ``parser.error``, naming the field."""
    if args.preset is None and args.config is None:
        args.preset = default_preset
    try:
        return with_data(resolve_config(args, preset(default_preset), preset), args.data)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2


def show_config(args: argparse.Namespace, cfg: ExperimentConfig) -> bool:
    """``--print-config``: print the resolved YAML; True when the caller should stop there."""
    if args.print_config:
        print(dump_config(cfg))
    return bool(args.print_config)


class TrainedRun(Protocol):
    """What a training stage returns, as far as its summary goes."""

    metrics: dict[str, float]
    checkpoint_dir: str
    run_id: str | None


def print_run_summary(what: str, run: TrainedRun, tracking_uri: str | None, started: float) -> None:
    """The closing lines of a training entry point: what was trained and how long it took
    (since ``started``, a ``time.perf_counter()``), metrics, checkpoint, where to look."""
    minutes = (time.perf_counter() - started) / 60
    width = max([16, *(len(k) for k in run.metrics)])
    print()
    print(f"[vitok] {what} trained in {minutes:.1f} min")
    for key, value in sorted(run.metrics.items()):
        print(f"  {key:<{width}} {value:.4f}")
    print(f"  {'checkpoint':<{width}} {run.checkpoint_dir}")
    if run.run_id:
        print(f"  {'mlflow run':<{width}} {run.run_id}")
        print(
            f"  {'browse with':<{width}} mlflow ui --backend-store-uri {resolve_uri(tracking_uri)}"
        )
