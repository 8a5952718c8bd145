"""The root config of one experiment (data -> tokenizer -> generator).

Functions take the sub-config they need; this root exists to nest, validate across
components, round-trip to YAML and take ``--set a.b=value`` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vitok.generator.config import GeneratorConfig
from vitok.pipelines.search import SearchConfig
from vitok.platform import storage
from vitok.platform.config import to_yaml
from vitok.platform.data import DataConfig
from vitok.platform.metrics import MetricsConfig
from vitok.platform.storage import StorageConfig
from vitok.platform.tracking import TrackingConfig
from vitok.platform.train import TrainConfig
from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.losses import LossConfig


@dataclass(frozen=True)
class ExperimentConfig:
    """One tokenizer (stage 1, optional stage 2) and its generator, on one dataset.

    ``tokenizer.input_size`` always follows the data: (frames, crop or stored size).
    ``stage2=None`` skips the GAN decoder fine-tune; ``generator_train=None`` skips the
    generator.
    """

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
        frames = self.data.frames
        height, width = self.data.crop or self.data.size
        wanted = (frames, height, width)
        if tuple(self.tokenizer.input_size) != wanted:
            # Derived, not duplicated: re-validated by TokenizerConfig (divisibility errors).
            object.__setattr__(
                self, "tokenizer", dataclasses.replace(self.tokenizer, input_size=wanted)
            )

    @classmethod
    def normalize_dict(cls, data: dict) -> dict:
        """Before validation: the tokenizer's input_size follows the data section."""
        data_sec = dict(data.get("data") or {})
        defaults = DataConfig()
        frames = data_sec.get("frames", defaults.frames)
        crop = data_sec.get("crop", defaults.crop) if "crop" in data_sec else defaults.crop
        size = crop or data_sec.get("size", defaults.size)
        tok = dict(data.get("tokenizer") or {})
        tok["input_size"] = [frames, *list(size)]
        return {**data, "tokenizer": tok}

    def run_dir(self, name: str) -> str:
        """The storage folder of a standalone run (its MLflow run id, Ray Train storage)."""
        return storage.join(self.storage.uri, "runs", name)


def dump_config(cfg: ExperimentConfig) -> str:
    return to_yaml(cfg)
