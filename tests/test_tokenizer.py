"""ViTok model, config and layers: shapes, round trips, RoPE, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch

from vitok.layers import (
    Attention,
    Block,
    apply_rope,
    axial_rope,
    grid_positions,
    rope_from_positions,
)
from vitok.pipelines.paper import SIZE_PARAMS_M, paper_row
from vitok.tokenizer import (
    SIZES,
    DiagonalGaussian,
    TokenizerConfig,
    ViTok,
    forward_flops,
    param_counts,
    parse_variant,
    patchify,
    unpatchify,
)


def _tiny(q: int, p: int, c: int, size: tuple[int, int, int]) -> ViTok:
    cfg = TokenizerConfig(
        encoder_size="N", decoder_size="N", patch=p, tubelet=q, channels=c, input_size=size
    )
    return ViTok(cfg)


@pytest.mark.parametrize(
    ("size", "q", "p", "c"),
    [
        ((1, 16, 16), 1, 4, 4),  # image
        ((1, 32, 24), 1, 8, 16),  # non-square image
        ((4, 16, 16), 2, 4, 8),  # video
        ((8, 16, 32), 4, 8, 2),  # video, non-square
        ((3, 8, 8), 1, 2, 1),  # per-frame video
    ],
)
def test_shapes_image_and_video(size, q, p, c):
    torch.manual_seed(0)
    model = _tiny(q, p, c, size)
    t, h, w = size
    x = torch.rand(2, t, h, w, 3) * 2 - 1
    posterior = model.encode(x)
    grid = (t // q, h // p, w // p)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == (2, *grid, c)
    assert posterior.sample().shape == (2, *grid, c)
    assert posterior.kl().shape == (2,)
    recon, post2 = model(x)
    assert recon.shape == x.shape
    assert model.decode(posterior.mode()).shape == x.shape
    cfg = model.config
    assert cfg.grid == grid
    assert cfg.num_tokens == grid[0] * grid[1] * grid[2]
    assert cfg.latent_floats == cfg.num_tokens * c
    assert cfg.pixels_per_float == pytest.approx(t * h * w * 3 / cfg.latent_floats)


def test_kl_is_the_closed_form_against_the_standard_normal_per_latent_dim():
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over (t, h, w, c), checked against
    torch.distributions at known values; 0 exactly at the prior."""
    mean = torch.tensor([0.0, 1.0, -2.0, 0.5]).reshape(1, 1, 2, 1, 2).repeat(2, 1, 1, 1, 1)
    logvar = torch.tensor([0.0, 0.0, 1.0, -3.0]).reshape(1, 1, 2, 1, 2).repeat(2, 1, 1, 1, 1)
    mean[1] *= 3  # the second clip further from the prior
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).mean(dim=1)  # (2,)
    kl = DiagonalGaussian(mean, logvar).kl()
    assert torch.allclose(kl, expected, rtol=1e-6, atol=0)
    assert kl[1] > kl[0] > 0
    zero = torch.zeros(3, 1, 2, 2, 4)
    assert torch.equal(DiagonalGaussian(zero, zero).kl(), torch.zeros(3))


def test_mode_is_deterministic_and_sample_is_not():
    torch.manual_seed(0)
    model = _tiny(1, 4, 4, (1, 16, 16)).eval()
    x = torch.rand(1, 1, 16, 16, 3) * 2 - 1
    a, _ = model(x, sample=False)
    b, _ = model(x, sample=False)
    c, _ = model(x, sample=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_model_accepts_other_sizes_than_config():
    model = _tiny(2, 4, 4, (4, 16, 16))
    x = torch.zeros(1, 6, 8, 12, 3)
    assert model(x)[0].shape == x.shape


@pytest.mark.parametrize(("q", "p"), [(1, 1), (1, 4), (2, 4), (4, 8)])
def test_patchify_unpatchify_exact_inverse(q, p):
    x = torch.randn(2, 8, 16, 24, 3)
    tokens = patchify(x, q, p)
    assert tokens.shape == (2, 8 // q, 16 // p, 24 // p, q * p * p * 3)
    assert torch.equal(unpatchify(tokens, q, p), x)
    # One tubelet holds exactly the pixels of its q x p x p box.
    assert torch.equal(tokens[0, 1, 1, 0].view(q, p, p, 3), x[0, q : 2 * q, p : 2 * p, :p])


def test_rope_is_relative():
    """Attention scores are invariant when every position shifts by the same offset."""
    torch.manual_seed(0)
    head_dim = 64  # 32 pairs split 11/11/10 across (t, h, w): uneven on purpose
    q = torch.randn(1, 2, 24, head_dim)
    k = torch.randn(1, 2, 24, head_dim)
    pos = grid_positions((2, 3, 4))
    base = rope_from_positions(pos, head_dim)
    shifted = rope_from_positions(pos + torch.tensor([5.0, -3.0, 7.0]), head_dim)
    scores = apply_rope(q, base) @ apply_rope(k, base).transpose(-1, -2)
    scores_shifted = apply_rope(q, shifted) @ apply_rope(k, shifted).transpose(-1, -2)
    torch.testing.assert_close(scores, scores_shifted, atol=1e-4, rtol=1e-4)
    # ... but not invariant to a change of relative positions (RoPE does something).
    moved = rope_from_positions(pos * torch.tensor([1.0, 2.0, 1.0]), head_dim)
    scores_moved = apply_rope(q, moved) @ apply_rope(k, moved).transpose(-1, -2)
    assert not torch.allclose(scores, scores_moved, atol=1e-3)


def test_rope_preserves_norm_and_handles_2d_and_3d_grids():
    x = torch.randn(2, 3, 12, 72)
    for grid in [(3, 4), (1, 3, 4)]:
        rope = axial_rope(grid, 72)
        assert rope[0].shape == (12, 36)
        torch.testing.assert_close(apply_rope(x, rope).norm(dim=-1), x.norm(dim=-1))


def test_block_and_attention_shapes():
    block = Block(48, 3)
    assert {"norm1", "attn", "norm2", "mlp"} <= {n for n, _ in block.named_children()}
    x = torch.randn(2, 12, 48)
    rope = axial_rope((3, 4), 16)
    assert block(x, rope).shape == x.shape
    assert Attention(48, 3)(x, None).shape == x.shape
    with pytest.raises(ValueError, match="heads"):
        Attention(48, 5)


@pytest.mark.parametrize("name", ["S", "B", "L"])
def test_param_counts_match_paper(name):
    counts = param_counts(TokenizerConfig(encoder_size=name, decoder_size=name))
    for part in ("encoder", "decoder"):
        millions = counts[part] / 1e6
        assert millions == pytest.approx(SIZE_PARAMS_M[name], rel=0.01), (part, millions)


@pytest.mark.parametrize("variant", ["S-B/16", "S-L/16"])
def test_paper_totals_and_flops(variant):
    # The paper's "GFLOPs" are multiply-adds (our GMACs).
    cfg = TokenizerConfig.from_variant(variant)
    paper = paper_row(cfg.variant, cfg.channels, cfg.input_size)
    assert param_counts(cfg)["total"] / 1e6 == pytest.approx(paper["params_M"], rel=0.01)
    assert forward_flops(cfg)["gmacs"] == pytest.approx(paper["gmacs"], rel=0.02)


def test_variant_parsing_and_naming():
    assert parse_variant("S-B/4x8") == ("S", "B", 4, 8)
    assert parse_variant("S-L/16") == ("S", "L", 1, 16)
    video = TokenizerConfig.from_variant("S-B/4x8", channels=16, input_size=(16, 128, 128))
    assert video.variant == "S-B/4x8"
    assert video.grid == (4, 16, 16)
    assert video.num_tokens == 1024  # the paper's token count for S-B/4x8
    assert video.latent_floats == 16384
    image = TokenizerConfig.from_variant("S-B/16")
    assert image.variant == "S-B/16" and image.input_size == (1, 256, 256)
    assert image.latent_floats == 4096
    assert TokenizerConfig.from_variant("N-T/1x4", input_size=(4, 8, 8)).variant == "N-T/1x4"
    assert set(SIZES) >= {"S", "B", "L", "N", "M", "T"}


@pytest.mark.parametrize("bad", ["SB/16", "S-B/4x", "S-B", "S-B/x8", "", "S-B/4x8x2"])
def test_bad_variant_string(bad):
    with pytest.raises(ValueError, match="form"):
        TokenizerConfig.from_variant(bad)


def test_unknown_size_in_variant():
    with pytest.raises(ValueError, match="unknown size 'Q'"):
        parse_variant("S-Q/16")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_size": (5, 16, 16), "tubelet": 2}, "tubelet=2"),
        ({"input_size": (1, 30, 32), "patch": 16}, "patch=16"),
        ({"input_size": (1, 32)}, "input_size"),
        ({"channels": 0}, "channels=0"),
        ({"encoder_size": "XL"}, "encoder_size='XL'"),
        ({"decoder_size": "q"}, "decoder_size='q'"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        TokenizerConfig(**kwargs)


def test_input_not_divisible_by_tubelet():
    model = _tiny(2, 4, 4, (4, 16, 16))
    with pytest.raises(ValueError, match=r"5 x 16 x 16 is not divisible by the tubelet"):
        model.encode(torch.zeros(1, 5, 16, 16, 3))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="z of shape"):
        model.decode(torch.zeros(1, 2, 4, 4, 3))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = _tiny(2, 4, 4, (4, 16, 16))
    recon, posterior = model(torch.rand(1, 4, 16, 16, 3) * 2 - 1)
    (recon.pow(2).mean() + posterior.kl().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    enc = {id(p) for p in model.encoder_parameters()}
    dec = {id(p) for p in model.decoder_parameters()}
    assert enc.isdisjoint(dec) and enc | dec == {id(p) for p in model.parameters()}
