"""Golden loss curves: seeded CPU training of the tiny tokenizer (stage 1 and stage 2) and the
tiny DiT, compared at fixed steps with numbers stored here.

Any change to a model, a loss, the optimizer or its schedule, the augmentation or the data
order moves these numbers and fails the test with the new curve printed. If the change is
intended, paste the printed values over the stored ones in the same commit.

The loop is ``tests/helpers_train.py``: the worker loop's seeds, task calls, optimizer parts,
AdamW and schedules, without Ray or DeepSpeed (one fp32 worker). Torch runs on one thread
here so the float reductions, and hence the numbers, do not depend on the core count.
Tolerance: relative 1e-4 on every stored value. On this machine the numbers repeat exactly
run to run, and two threads instead of one move them by less than 1e-6 relative; the
smallest deliberate change tried (Adam's beta2 0.95 -> 0.96) moves every curve by more than
1e-3 relative at some checked step (the stage-2 EMA error by 1.4e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_train import train_locally

from vitok.generator import GeneratorConfig
from vitok.generator.task import DiffusionLoss, GeneratorTask
from vitok.platform.data.clips import ClipBatch
from vitok.platform.data.synthetic import render_clip
from vitok.platform.metrics.evaluate import MeanEvaluator
from vitok.platform.training.train import TrainConfig
from vitok.tokenizer import LossConfig, TokenizerConfig, ViTok
from vitok.tokenizer.task import TokenizerTask

RTOL = 1e-4
TOKENIZER = TokenizerConfig(
    encoder_size="N", decoder_size="N", patch=4, tubelet=2, channels=4, input_size=(4, 16, 16)
)
STAGE1 = TrainConfig(steps=30, batch_size=4, lr=2e-3, warmup_steps=5, seed=0)
STAGE2 = TrainConfig(steps=20, batch_size=4, lr=5e-4, warmup_steps=2, seed=0)
STAGE2_LOSS = LossConfig(
    lpips_weight=0.0,
    disc_lr=2e-3,
    disc_warmup_steps=5,
    disc_channels=8,
    disc_max_channels=16,
    ema_decay=0.999,
)
GENERATOR = GeneratorConfig(size="N", num_classes=4, diffusion_steps=100, sampling_steps=5)
GENERATOR_TRAIN = TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=5, seed=0)
CHECK_STEPS = (0, 4, 9, 19, 29)  # optimizer steps (0-based) whose losses are compared
STAGE2_CHECK_STEPS = (0, 4, 9, 14, 19)

# ---- the stored curves (values at CHECK_STEPS; see the module docstring to update them)
GOLDEN_STAGE1 = {"loss/model": [0.8641298, 0.5242705, 0.2705654, 0.1584889, 0.1641885]}
GOLDEN_STAGE2 = {
    "loss/decoder": [0.8443879, 0.7259332, 0.663752, 0.6071271, 0.626274],
    "loss/discriminator": [1.998198, 1.977404, 1.818703, 1.234794, 0.1374659],
    "ema_recon_mse": [0.5620982],
}
GOLDEN_GENERATOR = {
    "loss/model": [1.006628, 0.9623410, 0.7489648, 0.9124674, 0.8251414],
    "ema_diffusion_loss": [0.8304418],
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clips(count: int = 12) -> torch.Tensor:
    """Synthetic labelled clips, (count, 4, 20, 20, 3) uint8 (cropped to 16 x 16 in training)."""
    clips = [render_clip(i % 4, 4, 20, 20, seed=i) for i in range(count)]
    return torch.from_numpy(np.stack(clips))


def _clip_batches(clips: torch.Tensor, steps: int, batch: int, seed: int) -> list[dict]:
    """``steps`` batches in a seeded per-epoch order (the data order is part of the curve)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(len(clips), generator=g).tolist()
    return [
        {"clip": clips[order[i * batch : (i + 1) * batch]], "label": torch.zeros(batch)}
        for i in range(steps)
    ]


def _at(history: list[dict[str, float]], key: str, steps=CHECK_STEPS) -> list[float]:
    return [history[s][key] for s in steps]


def _compare(name: str, got: dict[str, list[float]], golden: dict[str, list[float]]) -> None:
    shown = {k: [float(f"{v:.7g}") for v in vs] for k, vs in got.items()}
    message = f"{name} curve changed; now {shown}"
    assert set(got) == set(golden), message
    for key, values in golden.items():
        assert got[key] == pytest.approx(values, rel=RTOL), message


def _stage1_curve() -> dict[str, list[float]]:
    task = TokenizerTask(TOKENIZER, LossConfig(lpips_weight=0.0), stage=1)
    batches = _clip_batches(_clips(), STAGE1.steps, STAGE1.batch_size, seed=1)
    _, history = train_locally(task, batches, STAGE1, batch_fn=ClipBatch((16, 16)))
    return {"loss/model": _at(history, "loss/model")}


def _stage2_curve(tmp_path) -> dict[str, list[float]]:
    torch.manual_seed(3)
    init = tmp_path / "stage1.pt"
    torch.save(ViTok(TOKENIZER).state_dict(), init)
    task = TokenizerTask(
        TOKENIZER, STAGE2_LOSS, stage=2, init_weights=lambda: torch.load(init, weights_only=True)
    )
    batches = _clip_batches(_clips(), STAGE2.steps, STAGE2.batch_size, seed=2)
    model, history = train_locally(task, batches, STAGE2, batch_fn=ClipBatch((16, 16)))
    # The evaluated decoder is the EMA's (with warm-up): its reconstruction error shows it.
    batch_fn = ClipBatch((16, 16))
    eval_batch = batch_fn({"clip": _clips()[:4], "label": torch.zeros(4)}, False, None)
    x = batch_fn.on_device(eval_batch, torch.float32)["x"]
    with torch.no_grad():
        recon, _ = task.eval_module(model)(x, sample=False)
    curve = {k: _at(history, k, STAGE2_CHECK_STEPS) for k in ("loss/decoder", "loss/discriminator")}
    curve["ema_recon_mse"] = [float((recon - x).square().mean())]
    return curve


def _generator_curve() -> dict[str, list[float]]:
    task = GeneratorTask(GENERATOR, latent_channels=4, ema_decay=0.999)
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 2, 4, 4, 4, generator=g)  # one latent "look" per class
    labels = torch.arange(16) % 4
    latents = centres[labels] + 0.5 * torch.randn(16, 2, 4, 4, 4, generator=g)
    batches = []
    for _ in range(GENERATOR_TRAIN.steps):
        pick = torch.randperm(16, generator=g)[: GENERATOR_TRAIN.batch_size]
        batches.append({"z": latents[pick], "label": labels[pick]})
    model, history = train_locally(task, batches, GENERATOR_TRAIN)
    evaluator = MeanEvaluator(DiffusionLoss(GENERATOR, repeats=4))
    with torch.no_grad():
        evaluator.update(task.eval_module(model), {"z": latents, "label": labels})
    return {
        "loss/model": _at(history, "loss/model"),
        "ema_diffusion_loss": [evaluator.compute()["diffusion_loss"]],
    }


def test_golden_curve_tokenizer_stage1():
    _compare("tokenizer stage 1", _stage1_curve(), GOLDEN_STAGE1)


def test_golden_curve_tokenizer_stage2(tmp_path):
    _compare("tokenizer stage 2", _stage2_curve(tmp_path), GOLDEN_STAGE2)


def test_golden_curve_generator():
    _compare("generator", _generator_curve(), GOLDEN_GENERATOR)
