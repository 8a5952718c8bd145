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


DEFAULT_SAMPLES = 8  # Optuna trials when search.num_samples is unset
DEFAULT_GRACE_PERIOD = 1  # evaluations before ASHA may stop a trial
OPTUNA_ONLY = ("num_samples", "seed", "asha", "asha_grace_period")


@dataclass(frozen=True)
class SearchConfig:
    """How trials are chosen, scheduled and sized.

    ``num_samples``, ``seed``, ``asha`` and ``asha_grace_period`` act in Optuna mode only: a
    grid refuses them (None, the default, means "Optuna's default": 8 samples, seed 0, ASHA
    when it can act, a grace period of 1 evaluation). ASHA can act on a single objective
    with evaluations during training (``train.eval_every > 0``; ``ExperimentConfig`` checks
    that): set to true where it cannot, it is refused; left unset, it is off and the study
    says why.
    """

    mode: Literal["grid", "optuna"] = "grid"
    sweeps: tuple[str, ...] = ()
    # Objectives as "metric:max" / "metric:min": Optuna's (two or more = multi-objective),
    # and in both modes the first one picks the best trial (registered in MLflow).
    objectives: tuple[str, ...] = ("psnr:max",)
    num_samples: int | None = None  # optuna trials (default 8)
    asha: bool | None = None  # early stopping (single-objective optuna only)
    asha_grace_period: int | None = None  # evaluations before ASHA may stop a trial
    max_concurrent: int = 1
    trial_cpus: float = 0.01  # the trial's own driver; its Train workers ask for theirs
    # Retries of a trial whose driver died (a node lost): it resumes from its checkpoints.
    max_failures: int = 2
    # Extra Ray resources for the trial's driver, "name=amount" (pins trials to a node type).
    trial_resources: tuple[str, ...] = ()
    seed: int | None = None  # the Optuna sampler's seed (default 0)

    def __post_init__(self) -> None:
        check_choice("search.mode", self.mode, ("grid", "optuna"))
        if self.num_samples is not None:
            check_positive("search.num_samples", self.num_samples)
        if self.asha_grace_period is not None:
            check_positive("search.asha_grace_period", self.asha_grace_period)
        check_positive("search.max_concurrent", self.max_concurrent)
        check_positive("search.trial_cpus", self.trial_cpus)
        check_positive("search.max_failures", self.max_failures, allow_zero=True)
        for sweep in self.sweeps:
            parse_sweep(sweep)
        if not self.objectives:
            raise ValueError("search.objectives=() needs at least one 'metric:max|min'")
        for objective in self.objectives:
            parse_objective(objective)
        self.trial_resources_dict()
        self._check_settings_act()

    def _check_settings_act(self) -> None:
        """Refuse a setting that cannot act in this mode, naming it and why."""
        if self.mode == "grid":
            unused = [
                f"search.{f}={getattr(self, f)!r}"
                for f in OPTUNA_ONLY
                if getattr(self, f) is not None
            ]
            if unused:
                verb = "does" if len(unused) == 1 else "do"
                raise ValueError(
                    f"{', '.join(unused)} {verb} nothing with search.mode='grid' (a grid runs "
                    "each trial of search.sweeps once, in order); drop it, or set "
                    "search.mode=optuna"
                )
            return
        if not self.sweeps:
            raise ValueError(
                "search.mode='optuna' needs search.sweeps to define its axes (for example "
                "'c=4,8,16 decoder=S,B'): with none there is nothing to search"
            )
        if self.asha is True and len(self.objectives) > 1:
            raise ValueError(
                f"search.asha=True does nothing with {len(self.objectives)} "
                f"search.objectives={list(self.objectives)} (ASHA stops trials on one metric); "
                "drop search.asha, or keep one objective"
            )
        if self.asha_grace_period is not None and (self.asha is False or len(self.objectives) > 1):
            raise ValueError(
                f"search.asha_grace_period={self.asha_grace_period} does nothing with "
                f"search.asha={self.asha} and {len(self.objectives)} objective(s) (no ASHA)"
            )

    @property
    def samples(self) -> int:
        """Optuna trials: ``num_samples`` or the default."""
        return DEFAULT_SAMPLES if self.num_samples is None else self.num_samples

    @property
    def sampler_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    @property
    def grace_period(self) -> int:
        return DEFAULT_GRACE_PERIOD if self.asha_grace_period is None else self.asha_grace_period

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
