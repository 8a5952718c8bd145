"""Tokenizer training end to end on a local Ray: real clips, 2 workers, DeepSpeed in bf16,
MLflow; the saved, evaluated and logged weights are the fp32 master weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vitok.pipelines.experiment import ExperimentConfig
from vitok.pipelines.presets import smoke, tokenizer_for
from vitok.platform.data.prepare import DataConfig, prepare
from vitok.platform.storage import StorageConfig
from vitok.platform.tracking.runs import TrackingConfig
from vitok.platform.training.train import TrainConfig


def real_clip_config(tmp_path: Path, mlflow_uri: str) -> ExperimentConfig:
    data = DataConfig(
        sources=("samples",),
        frames=4,
        fps=8.0,
        size=(40, 40),
        crop=(32, 32),
        clips_per_video=6,
        val_fraction=0.25,
    )
    base = smoke()
    return dataclasses.replace(
        base,
        name="real",
        data=data,
        tokenizer=tokenizer_for(data, "N-N/2x8", channels=8),
        train=TrainConfig(
            steps=40,
            batch_size=4,
            lr=2e-3,
            warmup_steps=4,
            num_workers=2,
            cpus_per_worker=0.5,
            zero_stage=2,
            precision="bf16",
            eval_every=10,
            checkpoint_every=20,
            log_every=10,
        ),
        stage2=TrainConfig(
            steps=6,
            batch_size=4,
            lr=5e-4,
            warmup_steps=1,
            num_workers=2,
            cpus_per_worker=0.5,
            checkpoint_every=0,
            log_every=3,
            precision="bf16",  # ZeRO 0: DeepSpeed's bf16 wrapper holds the fp32 masters
        ),
        tracking=TrackingConfig(uri=mlflow_uri, experiment="tokenizer-test", system_metrics=False),
        storage=StorageConfig(root=str(tmp_path / "store")),
    )


@pytest.mark.slow
def test_tokenizer_training_real_clips_two_workers(ray_local, tmp_path, mlflow_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.tokenizer_stage import run_tokenizer

    cfg = real_clip_config(tmp_path, mlflow_uri)
    prepared = prepare(cfg.data, cfg.storage.uri, progress=False)
    assert prepared.num_train >= 8 and prepared.num_val >= 2
    run = run_tokenizer(cfg, prepared)
    client = MlflowClient(mlflow_uri)

    # Stage 1 lowered the loss and raised PSNR over the whole validation split.
    losses = [m.value for m in client.get_metric_history(run.run_id, "train/loss")]
    assert losses[-1] < losses[0]
    psnr = sorted(client.get_metric_history(run.run_id, "val/psnr"), key=lambda m: m.step)
    assert psnr[-1].value > psnr[0].value + 1.0, [p.value for p in psnr]
    # Stage 2 ran on the same run (discriminator terms logged), ending at its own step count.
    assert client.get_metric_history(run.run_id, "stage2/train/disc_loss")
    assert client.get_metric_history(run.run_id, "stage2/val/psnr")
    assert run.stage2 is not None and run.stage2.metrics["step"] == 6

    data = client.get_run(run.run_id).data
    assert data.params["variant"] == "N-N/2x8" and int(data.params["E"]) == 2 * 4 * 4 * 8
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "reconstructions"} <= artifacts
    recon = {a.path for a in client.list_artifacts(run.run_id, "reconstructions")}
    assert recon == {"reconstructions/grid.png", "reconstructions/side_by_side.mp4"}

    # The logged MLflow model loads back and reconstructs uint8 clips.
    model = mlflow.pyfunc.load_model(data.tags["tokenizer_model_uri"])
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    out = model.predict(clips)
    assert out.shape == clips.shape and out.dtype == np.uint8

    check_fp32_weights(cfg, prepared, run)

    # Running the same experiment again continues the same MLflow run (no duplicate).
    from vitok.platform.tracking.runs import start_run

    again = start_run(cfg.tracking, cfg.name, resume_file=f"{cfg.run_dir(cfg.name)}/mlflow_run_id")
    assert again == run.run_id


def _val_clips(prepared, crop: tuple[int, int]) -> np.ndarray:
    """The whole validation split, centre-cropped, as uint8 (N, T, h, w, 3)."""
    from vitok.platform.data.prepare import clip_dataset, to_model_input
    from vitok.platform.metrics.evaluate import to_uint8

    batch = clip_dataset(prepared, "val").take_batch(prepared.num_val, batch_format="numpy")
    return to_uint8(to_model_input(batch["clip"], crop=crop, flip=False)).numpy()


def _mean_psnr(clips: np.ndarray, recon: np.ndarray | torch.Tensor) -> float:
    from vitok.platform.metrics.evaluate import psnr

    return float(psnr(torch.from_numpy(clips), torch.as_tensor(recon)).double().mean())


def _reconstruct(cfg: ExperimentConfig, state: dict, clips: np.ndarray) -> torch.Tensor:
    from vitok.tokenizer import ViTok

    tokenizer = ViTok(cfg.tokenizer).eval()
    tokenizer.load_state_dict(state)
    with torch.no_grad():
        recon, _ = tokenizer(torch.from_numpy(clips).float() / 127.5 - 1, sample=False)
    return recon


def _deepspeed_states(folder: Path) -> dict:
    """The model-states file DeepSpeed wrote for one engine (our own checkpoint)."""
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def check_fp32_weights(cfg: ExperimentConfig, prepared, run) -> None:
    """bf16 runs save, evaluate and export the fp32 master weights, not their bf16 rounding."""
    import mlflow
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vitok.pipelines.model_registry import log_mlflow_model
    from vitok.platform.training.train import load_model_state
    from vitok.tokenizer.task import TokenizerTask

    # Stage 1 (ZeRO-2 over two ranks): model.pt is what DeepSpeed's own consolidation reads
    # from the fp32 master partitions in the optimizer state.
    stage1 = Path(run.stage1.checkpoint_dir)
    saved = load_model_state(stage1)
    masters = get_fp32_state_dict_from_zero_checkpoint(str(stage1), tag="deepspeed")
    assert set(saved) == set(masters)
    for name, value in saved.items():
        assert value.dtype == torch.float32 and torch.equal(value, masters[name].float()), name
    # The bf16 module DeepSpeed trained holds their rounding; every saved tensor differs from it.
    module = _deepspeed_states(stage1 / "deepspeed")["module"]
    for name, value in saved.items():
        assert torch.equal(module[name], value.bfloat16()), name
        assert not torch.equal(value, value.bfloat16().float()), name

    # The logged MLflow model reconstructs exactly as the master weights (to 0.01 dB), and the
    # stage's reported val/psnr (evaluated in fp32 on the workers) is theirs too.
    clips = _val_clips(prepared, cfg.data.crop)
    uri = log_mlflow_model(cfg.tracking.uri, run.run_id, str(stage1), cfg.tokenizer)
    psnr_logged = _mean_psnr(clips, mlflow.pyfunc.load_model(uri).predict(clips))
    psnr_master = _mean_psnr(clips, _reconstruct(cfg, masters, clips))
    rounded = {k: v.bfloat16().float() for k, v in masters.items()}
    psnr_rounded = _mean_psnr(clips, _reconstruct(cfg, rounded, clips))
    print(
        f"PSNR on {len(clips)} val clips: logged model {psnr_logged:.4f} dB, fp32 masters "
        f"{psnr_master:.4f} dB, bf16-rounded {psnr_rounded:.4f} dB, "
        f"reported val/psnr {run.stage1.metrics['val/psnr']:.4f} dB"
    )
    assert abs(psnr_logged - psnr_master) <= 0.01
    assert abs(run.stage1.metrics["val/psnr"] - psnr_master) <= 0.01

    # Stage 2 (ZeRO 0, bf16): the frozen encoder keeps stage 1's fp32 weights bit for bit;
    # decoder and discriminator are the fp32 groups of each part's DeepSpeed bf16 wrapper.
    stage2 = Path(run.stage2.checkpoint_dir)
    saved2 = load_model_state(stage2)
    reference = TokenizerTask(cfg.tokenizer, cfg.loss, stage=2).build_model()
    frozen = [n for n, p in reference.named_parameters() if not p.requires_grad]
    encoder = {id(p) for p in reference.tokenizer.encoder_parameters()}
    assert frozen and all(id(reference.get_parameter(n)) in encoder for n in frozen)
    for name in frozen:
        assert torch.equal(saved2[name], saved[name.removeprefix("tokenizer.")]), name
    for part, module in (
        ("decoder", reference.tokenizer),
        ("discriminator", reference.discriminator),
    ):
        prefix = "tokenizer." if part == "decoder" else "discriminator."
        names = [prefix + n for n, p in module.named_parameters() if p.requires_grad]
        (fp32_group,) = _deepspeed_states(stage2 / f"deepspeed-{part}")["optimizer"]["fp32_groups"]
        assert len(fp32_group) == len(names)
        for name, master in zip(names, fp32_group):
            assert saved2[name].dtype == torch.float32 and torch.equal(saved2[name], master), name


def test_reconstruction_grid_names_the_split_its_clips_come_from(monkeypatch) -> None:
    """A run without a val split draws training clips: the grid's title says so."""
    from vitok.platform.metrics import artifacts

    titles: list[str] = []
    monkeypatch.setattr(artifacts, "_log_grid", lambda *args, **kw: titles.append(args[3]))
    clips = torch.zeros(2, 1, 8, 8, 3)  # one frame: no video is written
    artifacts.log_reconstruction_pairs(None, clips, clips, 8.0, split="train")
    artifacts.log_reconstruction_pairs(None, clips, clips, 8.0)
    assert titles[0].startswith("training clips") and titles[1].startswith("validation clips")
