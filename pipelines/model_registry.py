"""The trained tokenizer into MLflow: logged as a pyfunc model in its run (the model's code
is ``mlflow_model.py``, logged as code: nothing pickled) and registered as a version."""

from __future__ import annotations

from typing import Any

import numpy as np

from vitok.pipelines import mlflow_model
from vitok.pipelines.checkpoint_models import tokenizer_from_checkpoint
from vitok.platform.config import to_yaml
from vitok.platform.tracking.runs import log_pyfunc_model, register_model
from vitok.tokenizer.config import TokenizerConfig

PIP_REQUIREMENTS = ("torch", "einops", "pyyaml", "vitok")


def log_mlflow_model(uri: str, run_id: str, checkpoint_dir: str, model: TokenizerConfig) -> str:
    """Log the trained tokenizer as an MLflow pyfunc model (uint8 clips in, out)."""
    return log_pyfunc_model(
        uri,
        run_id,
        "tokenizer",
        mlflow_model.__file__,  # models-from-code: nothing pickled
        tokenizer_from_checkpoint(checkpoint_dir, model),
        to_yaml(model),
        PIP_REQUIREMENTS,
        signature=mlflow_model.signature(model.input_size),
        input_example=np.zeros((1, *model.input_size, 3), np.uint8),
    )


def register_tokenizer(
    uri: str,
    run_id: str,
    checkpoint_dir: str,
    model: TokenizerConfig,
    name: str,
    tags: dict[str, Any],
) -> str:
    """Log the tokenizer as an MLflow model in ``run_id`` and register it as a new version
    of ``name``; returns ``models:/<name>/<version>`` (loadable with
    ``mlflow.pyfunc.load_model``)."""
    return register_model(log_mlflow_model(uri, run_id, checkpoint_dir, model), name, tags)
