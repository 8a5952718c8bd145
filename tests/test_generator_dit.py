"""The DiT: config validation, shapes over image and video latent grids, adaLN-Zero, CFG."""

from __future__ import annotations

import pytest
import torch

from vitok.generator import DIT_SIZES, DiT, DiTBlock, GeneratorConfig
from vitok.layers import axial_rope
from vitok.platform import config as pconfig


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (incl. the zero-initialised ones), so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _tiny(num_classes: int = 5) -> GeneratorConfig:
    return GeneratorConfig(size="N", num_classes=num_classes)


# ----------------------------------------------------------------------------- config
def test_config_defaults_follow_the_paper():
    cfg = GeneratorConfig()
    assert (cfg.diffusion_steps, cfg.beta_start, cfg.beta_end) == (1000, 1e-4, 0.02)
    assert (cfg.objective, cfg.sampling_steps, cfg.class_dropout) == ("eps", 250, 0.1)
    assert cfg.null_class == cfg.num_classes
    assert (DIT_SIZES["L"].width, DIT_SIZES["L"].depth, DIT_SIZES["L"].heads) == (1024, 24, 16)
    assert (DIT_SIZES["XL"].width, DIT_SIZES["XL"].depth, DIT_SIZES["XL"].heads) == (1152, 28, 16)


@pytest.mark.parametrize(
    "field,value",
    [
        ("size", "XXL"),
        ("num_classes", 0),
        ("class_dropout", 1.0),
        ("class_dropout", -0.1),
        ("diffusion_steps", 1),
        ("beta_schedule", "cosine"),
        ("beta_end", 1e-5),
        ("objective", "v"),
        ("sampling_steps", 1001),
        ("sampling_steps", 0),
        ("guidance", -1.0),
        ("mlp_ratio", 0.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(**{field: value})


def test_config_round_trips_through_yaml_and_overrides():
    cfg = GeneratorConfig(size="N", num_classes=101, guidance=1.5)
    assert pconfig.from_yaml(GeneratorConfig, pconfig.to_yaml(cfg)) == cfg
    changed = pconfig.apply_overrides(cfg, ["sampling_steps=50", "size=L"])
    assert (changed.sampling_steps, changed.size) == (50, "L")


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "grid",
    [(1, 4, 4, 4), (1, 3, 5, 8), (2, 3, 4, 4), (4, 2, 2, 16)],
    ids=["image", "image-rect", "video", "video-long"],
)
def test_forward_keeps_the_latent_shape(grid):
    torch.manual_seed(0)
    t, h, w, c = grid
    model = _perturbed(DiT(_tiny(), latent_channels=c))
    z = torch.randn(3, t, h, w, c)
    out = model(z, torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


# The DiT paper's parameter counts (Peebles & Xie 2023, Table 4), for 1000 ImageNet classes
# on 4-channel SD-VAE latents. Its MLP is GELU at ratio 4 (8 D^2 per block), ours SwiGLU at
# 2/3 of that hidden width (3 x 8/3 D^2, the same); its patch embed and learned-sigma output
# are a few thousand parameters more than our token embed: within 1%.
DIT_PAPER_PARAMS_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


@pytest.mark.parametrize("size", sorted(DIT_PAPER_PARAMS_M))
def test_paper_sizes_have_the_papers_parameter_counts(size):
    with torch.device("meta"):  # shapes only: XL's 675M parameters allocate nothing
        model = DiT(GeneratorConfig(size=size, num_classes=1000), latent_channels=4)
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e6 == pytest.approx(DIT_PAPER_PARAMS_M[size], rel=0.01), (size, n)


def test_tiny_sizes_count_every_part_once():
    """N and T: the parameters are the embeddings, ``depth`` identical blocks and the final
    layer, each counted once (a block is 18 D^2 and change: qkv + proj 4 D^2, adaLN 6 D^2,
    SwiGLU 3 D x hidden)."""
    for size in ("N", "T"):
        cfg = GeneratorConfig(size=size, num_classes=10)
        model = DiT(cfg, latent_channels=8)
        d, depth = cfg.dit_size.width, cfg.dit_size.depth
        embeds = (8 * d + d) + (256 * d + d + d * d + d) + 11 * d  # tokens, timestep, labels
        final = (d * 2 * d + 2 * d) + (d * 8 + 8)
        block = sum(p.numel() for p in model.blocks[0].parameters())
        assert block > 18 * d * d
        n = sum(p.numel() for p in model.parameters())
        assert n == embeds + depth * block + final, (size, n)


# ----------------------------------------------------------------------------- adaLN-Zero
def test_fresh_block_is_the_identity():
    torch.manual_seed(0)
    model = DiT(_tiny(), latent_channels=4)
    block = model.blocks[0]
    assert isinstance(block, DiTBlock)
    x = torch.randn(2, 12, model.width)
    c = torch.randn(2, model.width)
    rope = axial_rope((1, 3, 4), model.head_dim)
    assert torch.equal(block(x, c, rope), x)
    # The identity comes from the zero gates, not from dead branches: perturbed, it is not.
    _perturbed(block)
    assert not torch.allclose(block(x, c, rope), x)


def test_fresh_model_predicts_zero():
    torch.manual_seed(0)
    model = DiT(_tiny(), latent_channels=4)
    z = torch.randn(2, 2, 3, 3, 4)
    out = model(z, torch.tensor([10, 900]), torch.tensor([1, 5]))
    assert torch.equal(out, torch.zeros_like(z))


def test_positions_matter_through_rope():
    # Without RoPE the model would be permutation-equivariant over tokens; with it, swapping
    # two tokens of the input does not just swap the corresponding outputs.
    torch.manual_seed(0)
    model = _perturbed(DiT(_tiny(), latent_channels=4))
    z = torch.randn(1, 1, 2, 2, 4)
    swapped = z.clone()
    swapped[:, :, 0, 0], swapped[:, :, 1, 1] = z[:, :, 1, 1], z[:, :, 0, 0]
    t, y = torch.tensor([100]), torch.tensor([2])
    out, out_swapped = model(z, t, y), model(swapped, t, y)
    unswapped = out_swapped.clone()
    unswapped[:, :, 0, 0], unswapped[:, :, 1, 1] = out_swapped[:, :, 1, 1], out_swapped[:, :, 0, 0]
    assert not torch.allclose(unswapped, out, atol=1e-4)


# ----------------------------------------------------------------------------- CFG
def test_guidance_interpolates_conditional_and_unconditional():
    torch.manual_seed(0)
    model = _perturbed(DiT(_tiny(num_classes=5), latent_channels=4)).eval()
    z = torch.randn(3, 2, 3, 3, 4)
    t = torch.tensor([5, 300, 800])
    y = torch.tensor([0, 2, 4])
    with torch.no_grad():
        cond = model(z, t, y)
        uncond = model(z, t, torch.full_like(y, 5))
        assert not torch.allclose(cond, uncond, atol=1e-3)  # the label is actually used
        assert torch.allclose(model.forward_with_cfg(z, t, y, 1.0), cond, atol=1e-5, rtol=0)
        assert torch.allclose(model.forward_with_cfg(z, t, y, 0.0), uncond, atol=1e-5, rtol=0)
        guided = model.forward_with_cfg(z, t, y, 3.0)
        assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=0)


def test_bf16_model_takes_float32_latents():
    # DeepSpeed bf16 casts the weights; the latents and timesteps stay float32 / int.
    torch.manual_seed(0)
    model = _perturbed(DiT(_tiny(), latent_channels=4)).to(torch.bfloat16)
    z = torch.randn(2, 1, 2, 2, 4)
    out = model(z, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and out.shape == z.shape
    assert torch.isfinite(out.float()).all()


def test_a_checkpoint_with_the_old_block_names_loads_unchanged():
    """Before the DiT blocks owned their layers, a block's attention, MLP and norms sat
    under ``blocks.N.block.``; such a checkpoint (and its EMA) loads to the same weights."""
    import re

    from vitok.generator.config import GeneratorConfig
    from vitok.generator.dit import DiT
    from vitok.generator.task import load_generator

    torch.manual_seed(0)
    cfg = GeneratorConfig(size="N", num_classes=3)
    state = DiT(cfg, 4).state_dict()
    old = {
        re.sub(r"^(blocks\.\d+\.)(?!adaLN)", r"\1block.", k): v.clone() for k, v in state.items()
    }
    assert any(".block.attn." in k for k in old) and old.keys() != state.keys()
    shadow = {k: v + 1 for k, v in old.items() if ".block.mlp." in k}
    dit = load_generator(old, cfg, 4, {"ema": {"shadow": shadow, "num_updates": 3}})
    for name, value in dit.state_dict().items():
        expected = (
            state[name] + 1 if ".mlp." in name and name.startswith("blocks.") else state[name]
        )
        assert torch.equal(value, expected), name
