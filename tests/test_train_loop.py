"""The worker loop's random draws, without Ray: ``Loop.epoch`` on a stand-in worker (its
DeepSpeed engines replaced by no-ops) over an in-memory split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from vitok.platform.training.train import OptimizerPart, TrainConfig
from vitok.platform.training.train_data import WorkerData, split_from_arrays
from vitok.platform.training.train_loop import Loop
from vitok.platform.training.train_metrics import MetricWindow


class _Engine:
    """What ``train_step`` calls on a DeepSpeed engine; the gradient itself is not needed."""

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def step(self) -> None:
        pass


class _Task:
    def training_step(self, model, batch, step):
        return batch["x"].sum() * 0, {}

    def on_optimizer_step(self, model, step):
        pass


def _loop(cfg: TrainConfig, draws: list[list[int]]) -> Loop:
    """A ``Loop`` of one worker whose batch function records the crop generator's draws."""

    def batch_fn(batch, training, gen):
        draws.append(torch.randint(0, 2**30, (4,), generator=gen).tolist())
        return {"x": batch["x"].float()}

    model = nn.Linear(1, 1)
    part = OptimizerPart("model", model, [], lambda s: 1.0, 0.0)
    engine = _Engine()
    loop = Loop.__new__(Loop)  # the pieces epoch() uses, without Ray or DeepSpeed
    loop.job = SimpleNamespace(task=_Task(), batch_fn=batch_fn, columns=("x",))
    loop.cfg, loop.rank, loop.world, loop.micro = cfg, 0, 1, 0
    loop.worker = SimpleNamespace(
        model=model, parts=[part], pairs=[(part, engine)], engines=[engine], device="cpu"
    )
    loop.worker.dtype = torch.float32
    loop.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "train_s": 0.0}
    loop.state["segments"] = []
    loop.window, loop.first_step_at = MetricWindow(), 0.0
    data = split_from_arrays({"x": np.zeros((16, 1), np.float32)})
    loop.data = WorkerData({"train": data}, cfg, 0, 1)
    return loop


def test_each_micro_step_of_an_accumulated_step_draws_its_own_crops():
    """With grad_accum > 1 each micro batch gets its own crops and flips: the crop generator
    is seeded by the micro step, not by the optimizer step (which all micro steps share)."""
    cfg = TrainConfig(grad_accum=2, batch_size=2, seed=5, steps=1000, log_every=1000)
    draws: list[list[int]] = []
    loop = _loop(cfg, draws)
    loop.epoch()  # 16 rows: 8 micro batches, 4 optimizer steps
    assert loop.state["step"] == 4 and loop.state["epoch"] == 1
    assert len({tuple(d) for d in draws}) == 8, draws  # eight micro steps, eight draws
    # The draws are a function of (seed, rank, micro step) alone: a rerun repeats them.
    again: list[list[int]] = []
    _loop(cfg, again).epoch()
    assert again == draws
    # Without accumulation the micro step is the step: its draws are what they always were.
    single: list[list[int]] = []
    _loop(TrainConfig(batch_size=2, seed=5, steps=1000, log_every=1000), single).epoch()
    assert single == draws
