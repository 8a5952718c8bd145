"""Exponential moving average of a model's parameters, with warm-up.

One class for both networks that keep an average for evaluation: the tokenizer's decoder in
stage 2 and the generator (DiT). ``load_average`` puts a saved average into a fresh model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- d * shadow + (1 - d) * param over every parameter, kept in float32.

    The decay warms up as d = min(decay, (1 + n) / (10 + n)) after n updates, so the average
    follows a short run instead of staying at the initial weights: with a fixed 0.9999, 300
    updates would leave 97% of the average at the weights the run started from. After about
    10 / (1 - decay) updates the warm-up no longer matters.

    ``copy_to(model)`` writes the average into a model (for evaluation); ``state_dict()`` /
    ``load_state_dict()`` checkpoint it (the shadow on the CPU).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} must lie in [0, 1)")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current parameters into the average."""
        decay = self.current_decay()
        for name, p in model.named_parameters():
            shadow = self.shadow[name]
            if shadow.device != p.device:
                self.shadow[name] = shadow = shadow.to(p.device)
            shadow.lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        shadow = {k: v.cpu() for k, v in self.shadow.items()}
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise ValueError(f"EMA state lacks parameters {sorted(missing)[:4]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: shadow[k].float().clone() for k in self.shadow}


def load_average(model: nn.Module, ema_state: Mapping[str, Any] | None) -> bool:
    """Copy a saved ``EMA.state_dict()`` into ``model``'s parameters, in place.

    The average holds a subset of the parameters (its names relative to ``model``). Returns
    False, leaving the model as it is, when there is no state or the average was never
    updated (it would only repeat the initial weights).
    """
    if not ema_state or int(ema_state.get("num_updates", 0)) == 0:
        return False
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ema_state["shadow"].items():
            own[name].copy_(value)
    return True
