"""The worker loop's random draws, without Ray: ``Loop.train_step`` on a stand-in worker."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from vitok.platform.train import OptimizerPart, TrainConfig
from vitok.platform.train_loop import Loop
from vitok.platform.train_metrics import MetricWindow


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


def _loop(cfg: TrainConfig, draws: list[list[int]]) -> SimpleNamespace:
    """A stand-in ``Loop`` whose batch function records the crop generator's first draws."""

    def batch_fn(batch, training, gen):
        draws.append(torch.randint(0, 2**30, (4,), generator=gen).tolist())
        return {"x": batch["x"].float()}

    model = nn.Linear(1, 1)
    part = OptimizerPart("model", model, [], lambda s: 1.0, 0.0)
    engine = _Engine()
    worker = SimpleNamespace(
        model=model, parts=[part], pairs=[(part, engine)], engines=[engine], device="cpu"
    )
    worker.dtype = torch.float32
    job = SimpleNamespace(task=_Task(), batch_fn=batch_fn, columns=("x",))
    state = {"step": 0, "samples": 0, "train_s": 0.0}
    return SimpleNamespace(
        job=job,
        cfg=cfg,
        worker=worker,
        state=state,
        rank=0,
        world=1,
        micro=0,
        window=MetricWindow(),
        first_step_at=0.0,
    )


def test_each_micro_step_of_an_accumulated_step_draws_its_own_crops():
    """With grad_accum > 1 each micro batch gets its own crops and flips: the crop generator
    is seeded by the micro step, not by the optimizer step (which all micro steps share)."""
    cfg = TrainConfig(grad_accum=2, batch_size=2, seed=5)
    draws: list[list[int]] = []
    loop = _loop(cfg, draws)
    batch = {"x": torch.zeros(2, 1)}
    completed = [Loop.train_step(loop, batch) for _ in range(4)]  # two optimizer steps
    assert completed == [False, True, False, True] and loop.state["step"] == 2
    assert len({tuple(d) for d in draws}) == 4, draws  # four micro steps, four draws
    # The draws are a function of (seed, rank, micro step) alone: a rerun repeats them.
    again: list[list[int]] = []
    rerun = _loop(cfg, again)
    for _ in range(4):
        Loop.train_step(rerun, batch)
    assert again == draws
    # Without accumulation the micro step is the step: its draws are what they always were.
    single: list[list[int]] = []
    plain = _loop(TrainConfig(grad_accum=1, batch_size=2, seed=5), single)
    for _ in range(2):
        Loop.train_step(plain, batch)
    assert single == draws[:2]
