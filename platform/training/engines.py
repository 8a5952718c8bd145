"""The optimizers of a stage (``OptimizerPart``: one per network a task trains with its own
AdamW, LR schedule and clipping), their DeepSpeed engines, and the seed of each worker's
micro step. Used by the worker loop (``train_loop``) and by tests that build engines alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitok.platform.config import check_positive
from vitok.platform.training.config import TrainConfig, deepspeed_config, lr_multiplier

# ----------------------------------------------------------------------------- optimizer parts
SINGLE_PART = "model"
PART_KEYS = ("module", "params", "lr", "lr_schedule", "grad_clip")


@dataclass
class OptimizerPart:
    """One optimizer of a stage: the module its DeepSpeed engine wraps, its parameter
    groups (each with its peak ``lr``), its LR schedule (a multiplier of the peak, by
    optimizer step) and its gradient clipping (0 = none)."""

    name: str
    module: nn.Module
    groups: list[dict[str, Any]]
    lr_schedule: Callable[[int], float]
    grad_clip: float


def optimizer_parts(
    task: Any, model: nn.Module, cfg: TrainConfig, peak_lr: float
) -> list[OptimizerPart]:
    """The task's optimizers: one over ``task.param_groups(model)`` unless the task's
    ``optimizer_parts(model)`` returns ``{name: spec}``. A spec holds ``module`` (a
    submodule of ``model``; its engine moves and casts it) and optionally ``params`` (default:
    the module's trainable parameters), ``lr`` (peak; default the stage's), ``lr_schedule``
    (``step -> multiplier``; default the stage's warm-up + cosine) and ``grad_clip`` (default
    ``train.grad_clip``). Every parameter of ``model`` must lie in exactly one part's module.
    """
    spec = task.optimizer_parts(model) if hasattr(task, "optimizer_parts") else None
    if spec is None:
        groups = task.param_groups(model)
        for group in groups:  # a group's own "lr" is its peak; the schedule scales every group
            group.setdefault("lr", peak_lr)
        return [OptimizerPart(SINGLE_PART, model, groups, lr_multiplier(cfg), cfg.grad_clip)]
    if not spec:
        raise ValueError("optimizer_parts returned no parts")
    parts = []
    for name, part in spec.items():
        unknown = sorted(set(part) - set(PART_KEYS))
        if unknown or "module" not in part:
            raise ValueError(
                f"optimizer part {name!r}: keys {sorted(part)}; needs 'module', allows {PART_KEYS}"
            )
        module = part["module"]
        params = list(part.get("params") or [p for p in module.parameters() if p.requires_grad])
        own = {id(p) for p in module.parameters()}
        if not params or any(id(p) not in own for p in params):
            raise ValueError(f"optimizer part {name!r}: its params must be its module's, >= 1")
        grad_clip = float(part.get("grad_clip", cfg.grad_clip))
        check_positive(f"optimizer part {name!r} grad_clip", grad_clip, allow_zero=True)
        group = {"params": params, "lr": float(part.get("lr", peak_lr))}
        schedule = part.get("lr_schedule") or lr_multiplier(cfg)
        parts.append(OptimizerPart(str(name), module, [group], schedule, grad_clip))
    covered = [id(p) for part in parts for p in part.module.parameters()]
    if len(covered) != len(set(covered)) or set(covered) != {id(p) for p in model.parameters()}:
        raise ValueError(
            "optimizer parts' modules must cover every parameter of the model exactly once"
        )
    return parts


def make_optimizer(
    part: OptimizerPart, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the part's groups (the stage's betas and weight decay) and its schedule;
    the worker loop hands both to DeepSpeed."""
    optimizer = torch.optim.AdamW(
        part.groups, lr=part.groups[0]["lr"], betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, part.lr_schedule)


def named_losses(
    loss: torch.Tensor | Mapping[str, torch.Tensor], parts: list[OptimizerPart]
) -> dict[str, torch.Tensor]:
    """``training_step``'s loss as ``{part name: loss}`` (one tensor for one part)."""
    names = [part.name for part in parts]
    if isinstance(loss, Mapping):
        if sorted(loss) != sorted(names):
            raise ValueError(f"training_step returned losses {sorted(loss)}; parts are {names}")
        return dict(loss)
    if len(names) != 1:
        raise ValueError(f"training_step returned one loss; parts {names} need one each")
    return {names[0]: loss}


def build_engines(parts: list[OptimizerPart], cfg: TrainConfig) -> list[Any]:
    """One DeepSpeed engine per part: its module, AdamW, LR schedule and clipping (needs an
    initialised process group)."""
    import deepspeed

    engines = []
    for part in parts:
        optimizer, scheduler = make_optimizer(part, cfg)
        engine, *_ = deepspeed.initialize(
            model=part.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, part.grad_clip),
            dist_init_required=False,
        )
        engines.append(engine)
    return engines


# ----------------------------------------------------------------------------- helpers
def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one (worker, micro step): crops, flips and any sampling the task draws."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1)
