"""The fp32 weights of a bf16 DeepSpeed run at every ZeRO stage, in one process: the loop's own
engine building and export (``vitok.platform.training.weights``), checked against DeepSpeed's own
record of its fp32 masters in the checkpoint it writes. (Two ranks, through Ray: the
tokenizer integration test.)"""

from __future__ import annotations

import pytest
import torch
from helpers_train import one_process_group
from torch import nn

from vitok.platform.training.train import TrainConfig, build_engines, optimizer_parts
from vitok.platform.training.weights import export_state, fp32_copy, snapshot_frozen

TRAINABLE = ("2.weight", "2.bias")


@pytest.fixture(scope="module")
def process_group():
    with one_process_group():
        yield


class _Task:
    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _masters_in_checkpoint(engine, folder, zero_stage: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 masters as its checkpoint records them."""
    engine.save_checkpoint(str(folder), tag="t")
    if zero_stage > 0:  # its own consolidation of the partitioned optimizer state
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="t")
    states = torch.load(folder / "t" / "mp_rank_00_model_states.pt", weights_only=False)
    (group,) = states["optimizer"]["fp32_groups"]  # the bf16 wrapper's fp32 copy, in order
    return dict(zip(TRAINABLE, group))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_bf16_export_is_the_fp32_master_copy(process_group, tmp_path, zero_stage):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    model[0].requires_grad_(False)  # frozen: DeepSpeed keeps no master copy of it
    cfg = TrainConfig(
        steps=3, batch_size=2, lr=1e-2, warmup_steps=0, precision="bf16", zero_stage=zero_stage
    )
    parts = optimizer_parts(_Task(), model, cfg, cfg.lr)
    frozen = snapshot_frozen(model)
    (engine,) = build_engines(parts, cfg)
    assert next(model.parameters()).dtype == torch.bfloat16  # DeepSpeed cast the module
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 8, generator=g).bfloat16()
        engine.backward((engine(x).float() - x.float()).square().mean())
        engine.step()

    state = export_state(model, [engine], frozen)
    assert all(v.dtype == torch.float32 for v in state.values())
    masters = _masters_in_checkpoint(engine, tmp_path, zero_stage)
    for name in TRAINABLE:
        assert torch.equal(state[name], masters[name].float()), name
    for name in ("0.weight", "0.bias"):  # the values from before the cast to bf16
        assert torch.equal(state[name], frozen[name]) and frozen[name].dtype == torch.float32
    for name, value in state.items():  # none of them is the bf16 rounding
        assert not torch.equal(value, value.bfloat16().float()), name

    # Evaluation's copy: a plain fp32 module computing exactly as a fresh one with the state.
    plain = fp32_copy(model, state, "cpu", zero3=zero_stage == 3)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    fresh.load_state_dict(state)
    x = torch.randn(4, 8, generator=g)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert torch.equal(plain(x), fresh(x))
