"""The trained tokenizer as an MLflow pyfunc model: uint8 clips in, reconstructions out.

Logged as code (MLflow's models-from-code: this file is the model's definition, its last
line names the model), so nothing is pickled; the weights load with
``torch.load(..., weights_only=True)`` from the logged artifacts. ``predict`` takes
``(B, T, H, W, 3)`` uint8 (numpy) at the tokenizer's input size and returns the
reconstructions in the same layout and dtype.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch


class TokenizerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from vitok.platform.config import from_yaml
        from vitok.tokenizer.config import TokenizerConfig
        from vitok.tokenizer.model import ViTok

        with open(context.artifacts["config"]) as f:
            config = from_yaml(TokenizerConfig, f.read())
        self.tokenizer = ViTok(config).eval()
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.tokenizer.load_state_dict(state)

    # model_input: np.ndarray, a hint MLflow accepts without inferring a schema from it (the
    # logged signature, ``signature`` below, gives the tensor shapes).
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 clips (B, T, H, W, 3), got {clips.dtype} {clips.shape}"
            )
        from vitok.platform.metrics.pixel_metrics import to_uint8, to_unit_float

        x = to_unit_float(torch.from_numpy(np.ascontiguousarray(clips)))
        with torch.no_grad():
            recon, _ = self.tokenizer(x, sample=False)
        return to_uint8(recon).numpy()


def signature(input_size: tuple[int, int, int]) -> mlflow.models.ModelSignature:
    """uint8 clips ``(B, T, H, W, 3)`` in and out, at the tokenizer's input size."""
    from mlflow.types import Schema, TensorSpec

    clips = Schema([TensorSpec(np.dtype(np.uint8), (-1, *input_size, 3))])
    return mlflow.models.ModelSignature(inputs=clips, outputs=clips)


mlflow.models.set_model(TokenizerModel())
