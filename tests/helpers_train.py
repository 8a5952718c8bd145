"""The worker loop's optimisation without Ray or DeepSpeed, for seeded CPU tests.

It mirrors ``vitok.platform.training.train.train_loop_per_worker`` for one worker in fp32 at ZeRO 0
with no gradient accumulation: the same per-step seeds, the same task calls, the same
optimizer parts, AdamW and LR schedules (``optimizer_parts`` / ``make_optimizer``), every
backward before any update, and gradient clipping by the formula DeepSpeed uses
(``torch.nn.utils.clip_grad_norm_``: scale by ``max_norm / (norm + 1e-6)`` when below 1).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from vitok.platform.training.config import TrainConfig
from vitok.platform.training.engines import (
    make_optimizer,
    named_losses,
    optimizer_parts,
    step_seed,
)

BatchFn = Callable[[dict[str, torch.Tensor], bool, torch.Generator], dict[str, torch.Tensor]]


def train_locally(
    task: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    batch_fn: BatchFn | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``task`` on ``batches`` (one per optimizer step) for ``cfg.steps`` steps.

    Returns the model and, per step, ``{"loss/<part>": value, **the task's logs}``.
    """
    if cfg.grad_accum != 1 or cfg.num_workers != 1 or cfg.precision != "fp32":
        raise ValueError("train_locally mirrors one fp32 worker without accumulation")
    torch.manual_seed(cfg.seed)  # as the loop: identical initial weights
    model = task.build_model()
    parts = optimizer_parts(task, model, cfg, cfg.peak_lr())
    optimizers = [make_optimizer(part, cfg) for part in parts]
    model.train()
    history: list[dict[str, float]] = []
    for step, raw in enumerate(batches):
        if step >= cfg.steps:
            break
        torch.manual_seed(step_seed(cfg.seed, 0, step))
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, 0, step))
        batch = batch_fn(raw, True, gen) if batch_fn is not None else raw
        if hasattr(batch_fn, "on_device"):  # as the loop does, on the CPU in fp32
            batch = batch_fn.on_device(batch, torch.float32)
        loss, logs = task.training_step(model, batch, step)
        losses = named_losses(loss, parts)
        for part in parts:
            losses[part.name].backward()
        for part, (optimizer, scheduler) in zip(parts, optimizers):
            if part.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(part.module.parameters(), part.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        task.on_optimizer_step(model, step + 1)
        history.append({**{f"loss/{k}": float(v.detach()) for k, v in losses.items()}, **logs})
    return model, history


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A one-process gloo group, as a Ray Train worker has (DeepSpeed engines need one).

    The group lives for the rest of the session: DeepSpeed caches the groups it derives, so a
    second default group would leave it holding dead ones. The rank environment
    (``deepspeed.initialize`` asserts LOCAL_RANK) is set only while the context is open.
    """
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            mp.setenv(key, value)
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
            )
        yield
