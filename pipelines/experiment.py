"""The root config of one experiment (data -> tokenizer -> generator).

It nests the components' configs, validates across them (the tokenizer's input size
derived from the data, ASHA's need for evaluations during training), round-trips to YAML
and takes ``--set a.b=value`` overrides. The stages and the study in ``pipelines/`` take
this root, since each wires several sections together; the components they call
(``platform/``, ``tokenizer/``, ``generator/``) take only their own section (see
ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from vitok.generator.config import GeneratorConfig
from vitok.pipelines.search import SearchConfig
from vitok.platform import storage
from vitok.platform.config import from_dict, to_yaml
from vitok.platform.data.prepare import DataConfig
from vitok.platform.metrics.evaluate import MetricsConfig
from vitok.platform.storage import StorageConfig
from vitok.platform.tracking.runs import TrackingConfig
from vitok.platform.training.train import TrainConfig
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.losses import LossConfig


def derived_input_size(data: DataConfig) -> tuple[int, int, int]:
    """The tokenizer's input: (frames, crop or stored size)."""
    height, width = data.crop or data.size
    return (data.frames, height, width)


def _derived_error(got: object, wanted: tuple) -> ValueError:
    return ValueError(
        f"tokenizer.input_size={got!r} is derived from data.frames and data.crop/size "
        f"({wanted!r}); leave it unset"
    )


# TokenizerConfig's default input size: an ExperimentConfig built in Python without one.
UNSET_INPUT_SIZE = TokenizerConfig.__dataclass_fields__["input_size"].default


@dataclass(frozen=True)
class ExperimentConfig:
    """One tokenizer (stage 1, optional stage 2) and its generator, on one dataset.

    ``tokenizer.input_size`` is derived from the data: (frames, crop or stored size). Left
    unset (in Python: ``TokenizerConfig``'s default) it is filled in; set to another value
    it is an error. ``stage2=None`` skips the GAN decoder fine-tune;
    ``generator_train=None`` skips the generator.
    """

    # Fields computed from others (``apply_overrides`` derives them anew after an override).
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("tokenizer.input_size",)

    name: str = "vitok"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig | None = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generator_train: TrainConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty name without '/'")
        wanted = derived_input_size(self.data)
        got = tuple(self.tokenizer.input_size)
        if got != wanted:
            if got != UNSET_INPUT_SIZE:
                raise _derived_error(got, wanted)
            # Derived, not duplicated: re-validated by TokenizerConfig (divisibility errors).
            object.__setattr__(
                self, "tokenizer", dataclasses.replace(self.tokenizer, input_size=wanted)
            )
        _check_asha_can_act(self.search, self.train)

    @classmethod
    def normalize_dict(cls, data: dict) -> dict:
        """Before validation: the tokenizer's input_size follows the data section; a given
        one (a dumped config holds it) must equal it."""
        wanted = list(
            derived_input_size(from_dict(DataConfig, data.get("data") or {}, _path="data"))
        )
        tok = dict(data.get("tokenizer") or {})
        given = tok.get("input_size")
        if given is not None:
            given = tuple(given) if isinstance(given, list | tuple) else given
            if given != tuple(wanted):
                raise _derived_error(given, tuple(wanted))
        tok["input_size"] = wanted
        return {**data, "tokenizer": tok}

    def run_dir(self, name: str) -> str:
        """The storage folder of a standalone run (its MLflow run id, Ray Train storage)."""
        return storage.join(self.storage.uri, "runs", name)


def _check_asha_can_act(search: SearchConfig, train: TrainConfig) -> None:
    """ASHA compares trials at equal numbers of evaluations during training: without any
    (``train.eval_every=0``) each trial reports once, at its end, and nothing is stopped."""
    if search.mode != "optuna" or train.eval_every > 0:
        return
    for name, value in (("asha", search.asha), ("asha_grace_period", search.asha_grace_period)):
        if value not in (None, False):
            raise ValueError(
                f"search.{name}={value!r} does nothing with train.eval_every=0: each trial "
                "reports once, at its end, so ASHA has nothing to compare; set "
                f"train.eval_every=N (evaluations during training), or drop search.{name}"
            )


def dump_config(cfg: ExperimentConfig) -> str:
    return to_yaml(cfg)
