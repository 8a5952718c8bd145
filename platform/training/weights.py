"""The fp32 weights of a model trained by DeepSpeed engines (bf16 or fp32, ZeRO 0-3).

Under bf16, DeepSpeed casts the module to bf16 and keeps the fp32 master weights in its
optimizer wrapper: the wrapper's fp32 groups at ZeRO 0, partitions spread over the ranks at
ZeRO 1-3. Saving ``module.state_dict()`` would round every weight to bf16 (8 significant
bits), so checkpoints, stage-2 initialisation, latent extraction, evaluation and the logged
MLflow model would all start from rounded weights. ``export_state`` assembles the fp32
state dict instead:

- trainable parameters: the optimizer's fp32 master copy (``safe_get_full_fp32_param`` for
  ZeRO 1-3 and DeepSpeed's BF16 optimizer; the FP16/BF16 optimizer wrapper's fp32 groups at
  ZeRO 0; the parameter itself when training in fp32);
- frozen parameters (no master copy exists): their values from before DeepSpeed cast them,
  taken by ``snapshot_frozen`` (they never change);
- buffers: their live values, in the dtype they were built with.

``export_state`` and ``fp32_masters`` are collective under ZeRO 1-3: call them on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def snapshot_frozen(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the frozen parameters and the buffers, taken before DeepSpeed casts them."""
    out = {
        name: p.detach().cpu().clone()
        for name, p in model.named_parameters(remove_duplicate=False)
        if not p.requires_grad
    }
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = b.detach().cpu().clone()
    return out


def _wrapper_masters(optimizer: Any) -> dict[int, Tensor]:
    """id(low-precision param) -> its fp32 master in DeepSpeed's ZeRO-0 FP16/BF16 wrappers."""
    lp_groups = getattr(optimizer, "fp16_groups", None)
    if lp_groups is None:
        return {}
    out: dict[int, Tensor] = {}
    if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 tensor per param
        for lp_group, hp_group in zip(lp_groups, optimizer.fp32_groups):
            out.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
    elif hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 tensor
        from torch._utils import _unflatten_dense_tensors

        for lp_group, flat in zip(lp_groups, optimizer.fp32_groups_flat):
            hp_group = _unflatten_dense_tensors(flat, lp_group)
            out.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
    return out


def fp32_masters(engine: Any) -> dict[int, Tensor]:
    """id(param) -> full fp32 master weights (CPU) for every trainable param of an engine.

    Collective under ZeRO 1-3 (every rank gets every full tensor). Raises if a
    low-precision parameter has no master copy: it would be saved rounded.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    wrapper = _wrapper_masters(engine.optimizer)
    out: dict[int, Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)  # None outside ZeRO / DeepSpeed's BF16 optimizer
        if full is None:
            full = wrapper.get(id(p))
        if full is None:
            if p.dtype != torch.float32 or hasattr(p, "ds_id"):
                raise RuntimeError(
                    f"parameter {name!r} ({p.dtype}) has no fp32 master copy in "
                    f"{type(engine.optimizer).__name__}; it would be saved rounded"
                )
            full = p  # fp32 training without a wrapper: the live weights are the master
        out[id(p)] = full.detach().float().cpu().clone()
    return out


def export_state(
    model: nn.Module, engines: Iterable[Any], frozen: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The fp32 state dict of ``model`` (keys as ``model.state_dict()``), on every rank.

    ``engines`` are the DeepSpeed engines whose modules cover the model's trainable
    parameters; ``frozen`` is ``snapshot_frozen(model)`` from before they were built.
    """
    masters: dict[int, Tensor] = {}
    for engine in engines:
        masters.update(fp32_masters(engine))
    state: dict[str, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in masters:
            state[name] = masters[id(p)]
        elif name in frozen:
            state[name] = frozen[name]
        else:
            raise RuntimeError(f"parameter {name!r} is trainable but in no optimizer")
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            dtype = frozen[name].dtype if name in frozen else b.dtype
            state[name] = b.detach().to("cpu", dtype).clone()
    return state


def fp32_copy(
    model: nn.Module, state: Mapping[str, Tensor], device: torch.device | str, *, zero3: bool
) -> nn.Module:
    """A plain copy of ``model`` holding ``state`` (fp32), for evaluation.

    The copy shares nothing with DeepSpeed's parameters (no master mappings are copied);
    under ZeRO-3 its modules' hooks (DeepSpeed's parameter gathering) are dropped.
    """
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(state[name].to(device), requires_grad=False))
    for name, b in model.named_buffers(remove_duplicate=False):
        value = state[name] if name in state else b.detach().float()
        memo.setdefault(id(b), value.to(device).clone())
    plain = copy.deepcopy(model, memo)
    if zero3:
        for module in plain.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._backward_hooks.clear()
    return plain
