"""The trained tokenizer as an MLflow pyfunc model: uint8 clips in, reconstructions out.

Loads its weights with ``torch.load(..., weights_only=True)`` from the logged artifacts;
no pickled module objects. ``predict`` takes ``(B, T, H, W, 3)`` uint8 (numpy) at the
tokenizer's input size and returns the reconstructions in the same layout and dtype.
"""

from __future__ import annotations

from typing import Any

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

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> np.ndarray:
        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 clips (B, T, H, W, 3), got {clips.dtype} {clips.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(clips)).float() / 127.5 - 1.0
        with torch.no_grad():
            recon, _ = self.tokenizer(x, sample=False)
        return ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
