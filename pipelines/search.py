"""The search space of a scaling study: the paper's sweeps (grid) or Optuna TPE.

A sweep is one string of axes, each ``name=v1,v2,...``, separated by spaces; its trials are
the product of its axes. A grid study runs the union of its sweeps' trials (the paper's E
sweep over p x c, plus an encoder sweep and a decoder sweep at fixed E, ...); an Optuna
study searches the union of the sweeps' values per axis.

Axis names are dotted config fields (``train.lr``) or these aliases:
``p`` patch, ``q`` tubelet, ``c`` channels, ``encoder``/``decoder`` sizes, ``crop`` the
clip size (``HxW``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from vitok.platform.config import check_choice, check_positive, parse_resources

ALIASES: dict[str, str] = {
    "p": "tokenizer.patch",
    "q": "tokenizer.tubelet",
    "c": "tokenizer.channels",
    "encoder": "tokenizer.encoder_size",
    "decoder": "tokenizer.decoder_size",
    "crop": "data.crop",  # the clip size trained on, "HxW" (e.g. crop=16x16,32x32)
}


@dataclass(frozen=True)
class SearchConfig:
    """How trials are chosen, scheduled and sized."""

    mode: Literal["grid", "optuna"] = "grid"
    sweeps: tuple[str, ...] = ()
    # optuna: objectives as "metric:max" / "metric:min"; two or more = multi-objective.
    objectives: tuple[str, ...] = ("psnr:max",)
    num_samples: int = 8  # optuna trials
    asha: bool = True  # early stopping (single-objective optuna only)
    asha_grace_period: int = 1
    max_concurrent: int = 1
    trial_cpus: float = 0.01  # the trial's own driver; its Train workers ask for theirs
    # Retries of a trial whose driver died (a node lost): it resumes from its checkpoints.
    max_failures: int = 2
    # Extra Ray resources for the trial's driver, "name=amount" (pins trials to a node type).
    trial_resources: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("search.mode", self.mode, ("grid", "optuna"))
        check_positive("search.num_samples", self.num_samples)
        check_positive("search.max_concurrent", self.max_concurrent)
        check_positive("search.trial_cpus", self.trial_cpus)
        check_positive("search.asha_grace_period", self.asha_grace_period)
        check_positive("search.max_failures", self.max_failures, allow_zero=True)
        for sweep in self.sweeps:
            parse_sweep(sweep)
        if not self.objectives:
            raise ValueError("search.objectives=() needs at least one 'metric:max|min'")
        for objective in self.objectives:
            parse_objective(objective)
        self.trial_resources_dict()

    def trial_resources_dict(self) -> dict[str, float]:
        return parse_resources("search.trial_resources", self.trial_resources)

    def trials(self) -> list[tuple[str, ...]]:
        """Grid trials: each a tuple of overrides ("tokenizer.channels=8", ...), deduplicated."""
        seen: dict[tuple[str, ...], None] = {}
        for sweep in self.sweeps or ("",):
            axes = parse_sweep(sweep)
            names = list(axes)
            for values in itertools.product(*(axes[n] for n in names)):
                overrides = tuple(sorted(f"{ALIASES.get(n, n)}={v}" for n, v in zip(names, values)))
                seen.setdefault(overrides, None)
        return list(seen)

    def space(self) -> dict[str, list[str]]:
        """Optuna: every axis with the union of its values over all sweeps (in order)."""
        out: dict[str, list[str]] = {}
        for sweep in self.sweeps:
            for name, values in parse_sweep(sweep).items():
                bucket = out.setdefault(ALIASES.get(name, name), [])
                bucket.extend(v for v in values if v not in bucket)
        return out


def parse_sweep(sweep: str) -> dict[str, list[str]]:
    axes: dict[str, list[str]] = {}
    for part in sweep.split():
        name, sep, values = part.partition("=")
        if not sep or not name or not values:
            raise ValueError(
                f"search.sweeps entry {sweep!r}: each axis must look like name=v1,v2 "
                "(axes separated by spaces)"
            )
        if name in axes:
            raise ValueError(f"search.sweeps entry {sweep!r} names axis {name!r} twice")
        axes[name] = [v.strip() for v in values.split(",") if v.strip()]
    return axes


def parse_objective(objective: str) -> tuple[str, str]:
    metric, sep, mode = objective.partition(":")
    if not sep or mode not in ("max", "min") or not metric:
        raise ValueError(f"search.objectives entry {objective!r} must look like 'psnr:max'")
    return metric, mode


def trial_name(overrides: tuple[str, ...]) -> str:
    """A short, stable, filesystem-safe name from a trial's overrides, unique over them: an
    aliased axis is its alias (``c8``), any other field its full path (``train.steps200``)."""
    short = {v: k for k, v in ALIASES.items()}
    parts = []
    for item in sorted(overrides):
        key, _, value = item.partition("=")
        parts.append(f"{short.get(key, key)}{value}")
    name = "-".join(parts) or "base"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
