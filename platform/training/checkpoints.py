"""What a vitok training checkpoint holds besides DeepSpeed's own state, and how to read it
from a local folder or a URI under the storage root (fetched on whatever node asks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitok.platform import storage

CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "vitok_state.json"
MODEL_FILE = "model.pt"
TASK_STATE_FILE = "task_state.pt"


def _checkpoint_file(checkpoint: str | Path, file_name: str) -> Path:
    """A local copy of one file of a checkpoint (a local folder or a URI under storage)."""
    uri = storage.join(str(checkpoint), file_name)
    if not storage.is_file(uri):
        raise FileNotFoundError(f"{uri} is missing: not a vitok training checkpoint")
    return storage.local_copy(uri)


def load_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The plain model weights saved beside the DeepSpeed state (safe load)."""
    path = _checkpoint_file(checkpoint, MODEL_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_task_state(checkpoint: str | Path) -> dict[str, Any]:
    """The task's extra state (e.g. EMA weights) of a checkpoint; {} when it has none."""
    if not storage.is_file(storage.join(str(checkpoint), TASK_STATE_FILE)):
        return {}
    path = _checkpoint_file(checkpoint, TASK_STATE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads(_checkpoint_file(checkpoint, STATE_FILE).read_text())


@dataclass(frozen=True)
class CheckpointWeights:
    """A picklable ``() -> state dict`` of a checkpoint's model weights: a task calls it on
    whatever node it runs, and the file is fetched from storage there."""

    checkpoint: str

    def __call__(self) -> dict[str, torch.Tensor]:
        return load_model_state(self.checkpoint)


__all__ = [
    "CHECKPOINT_TAG",
    "MODEL_FILE",
    "STATE_FILE",
    "TASK_STATE_FILE",
    "CheckpointWeights",
    "load_checkpoint_state",
    "load_model_state",
    "load_task_state",
]
