"""Stage 2 through the worker loop's own pieces (optimizer parts -> one DeepSpeed engine each),
in this process: each network is stepped with its own GAN gradient, its own clipping and its
own LR schedule. The expectation is computed independently: plain autograd on copies of the
networks and a hand-written AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_train import one_process_group

from vitok.platform.training.train import TrainConfig, build_engines, named_losses, optimizer_parts
from vitok.tokenizer import LossConfig, TokenizerConfig, ViTok
from vitok.tokenizer.task import Stage2Module, TokenizerTask, load_tokenizer, tokenizer_weights

TOKENIZER = TokenizerConfig(
    encoder_size="N", decoder_size="N", patch=4, tubelet=1, channels=4, input_size=(2, 16, 16)
)
# Strong GAN weight and tight clips, so a gradient leaking between the networks, or one
# clip over both, changes the updates by far more than the tolerance.
LOSS = LossConfig(
    lpips_weight=0.0,
    gan_weight=0.5,
    disc_lr=3e-3,
    disc_warmup_steps=4,
    disc_grad_clip=0.05,
    disc_channels=8,
    disc_max_channels=16,
)
TRAIN = TrainConfig(
    steps=10, batch_size=2, lr=1e-3, warmup_steps=3, grad_clip=0.02, weight_decay=0.05
)


@pytest.fixture(scope="module")
def process_group():
    with one_process_group():
        yield


def _task(tmp_path) -> TokenizerTask:
    torch.manual_seed(0)
    init = tmp_path / "stage1.pt"
    torch.save(ViTok(TOKENIZER).state_dict(), init)
    return TokenizerTask(
        TOKENIZER, LOSS, stage=2, init_weights=lambda: torch.load(init, weights_only=True)
    )


def test_load_tokenizer_takes_a_stage2_state_and_its_decoder_ema(tmp_path):
    task = _task(tmp_path)
    model = task.build_model()  # Stage2Module: tokenizer.* and discriminator.* weights
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"tokenizer", "discriminator"}
    own = tokenizer_weights(state)
    assert set(own) == set(model.tokenizer.state_dict())
    assert tokenizer_weights(own) == own  # a stage-1 state passes as it is
    with torch.no_grad():
        model.tokenizer.tubelet_unembed.weight.add_(1.0)
    task.on_optimizer_step(model, 0)  # the decoder's EMA moves towards the new weights
    loaded = load_tokenizer(model.state_dict(), TOKENIZER, task.extra_state())
    averaged = task.eval_module(model)
    assert not loaded.training
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    live = load_tokenizer(model.state_dict(), TOKENIZER)  # no EMA given: the live weights
    torch.testing.assert_close(live.tubelet_unembed.weight, model.tokenizer.tubelet_unembed.weight)


def _adamw(param, grad, state, lr, cfg: TrainConfig, eps: float = 1e-8) -> torch.Tensor:
    """One decoupled-weight-decay Adam step, written out (torch.optim.AdamW's defaults)."""
    b1, b2 = cfg.betas
    state["t"] = t = state.get("t", 0) + 1
    state["m"] = m = b1 * state.get("m", torch.zeros_like(param)) + (1 - b1) * grad
    state["v"] = v = b2 * state.get("v", torch.zeros_like(param)) + (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return param * (1 - lr * cfg.weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)


def _named(name: str):
    return lambda message: f"{name}: {message}"


def _norm(grads: tuple[torch.Tensor, ...]) -> float:
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _clipped(grads: tuple[torch.Tensor, ...], max_norm: float) -> list[torch.Tensor]:
    """DeepSpeed's (and torch's) clip: scale by max_norm / (norm + 1e-6) when below 1."""
    scale = min(1.0, max_norm / (_norm(grads) + 1e-6))
    return [g * scale for g in grads]


def test_stage2_parts_are_the_decoder_and_the_discriminator_with_their_own_settings(tmp_path):
    task = _task(tmp_path)
    model = task.build_model()
    assert isinstance(model, Stage2Module)
    parts = optimizer_parts(task, model, TRAIN, peak_lr=TRAIN.lr)
    assert [p.name for p in parts] == ["decoder", "discriminator"]
    decoder, disc = parts
    assert decoder.module is model.tokenizer and disc.module is model.discriminator
    trainable = {id(p) for p in model.tokenizer.parameters() if p.requires_grad}
    assert {id(p) for p in decoder.groups[0]["params"]} == trainable
    assert trainable == {id(p) for p in model.tokenizer.decoder_parameters()}  # encoder frozen
    assert (decoder.grad_clip, disc.grad_clip) == (TRAIN.grad_clip, LOSS.disc_grad_clip)
    assert (decoder.groups[0]["lr"], disc.groups[0]["lr"]) == (TRAIN.lr, LOSS.disc_lr)
    # The discriminator: linear warm-up over disc_warmup_steps, then constant (the paper);
    # the decoder: the stage's warm-up then cosine.
    assert [disc.lr_schedule(s) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert decoder.lr_schedule(0) == pytest.approx(1 / 3) and decoder.lr_schedule(9) < 0.2
    loss, _ = task.training_step(model, {"x": torch.zeros(2, 2, 16, 16, 3)}, 0)
    with pytest.raises(ValueError, match="one loss"):
        named_losses(loss["decoder"], parts)
    with pytest.raises(ValueError, match="parts are"):
        named_losses({"decoder": loss["decoder"]}, parts)


def test_stage2_steps_each_network_with_its_own_gradient_clip_and_lr(tmp_path, process_group):
    task = _task(tmp_path)
    torch.manual_seed(1)
    model = task.build_model()
    reference = copy.deepcopy(model)  # the independent computation's own copy
    encoder_before = {k: v.clone() for k, v in model.tokenizer.encoder.state_dict().items()}
    parts = optimizer_parts(task, model, TRAIN, peak_lr=TRAIN.lr)
    engines = build_engines(parts, TRAIN)
    g = torch.Generator().manual_seed(2)
    batches = [torch.rand(2, 2, 16, 16, 3, generator=g) * 2 - 1 for _ in range(2)]

    # -- the loop's way: one loss per part, every backward, then each engine steps its part
    actual_grads = []
    for step, x in enumerate(batches):
        torch.manual_seed(100 + step)  # the posterior sample
        losses = named_losses(task.training_step(model, {"x": x}, step)[0], parts)
        for part, engine in zip(parts, engines):
            engine.backward(losses[part.name])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        actual_grads.append(grads)
        for engine in engines:
            engine.step()

    # -- independently: autograd per network on the reference copy, clip, hand-written AdamW
    tok, disc = reference.tokenizer, reference.discriminator
    dec_params = [p for p in tok.parameters() if p.requires_grad]
    dec_names = [f"tokenizer.{n}" for n, p in tok.named_parameters() if p.requires_grad]
    disc_params = list(disc.parameters())
    disc_names = [f"discriminator.{n}" for n, _ in disc.named_parameters()]
    dec_state = [{} for _ in dec_params]
    disc_state = [{} for _ in disc_params]
    for step, x in enumerate(batches):
        torch.manual_seed(100 + step)
        with torch.no_grad():
            posterior = tok.encode(x)
        recon = tok.decode(posterior.sample())
        judge = copy.deepcopy(disc).requires_grad_(False)  # G side: no path to the D weights
        g_loss = F.mse_loss(recon, x) + LOSS.kl_weight * posterior.kl().mean()
        g_loss = g_loss + LOSS.gan_weight * -judge(recon).mean()
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
        dec_grads = torch.autograd.grad(g_loss, dec_params)
        disc_grads = torch.autograd.grad(d_loss, disc_params)
        # The gradients each network received are exactly its own loss's.
        got = actual_grads[step]
        assert set(got) == set(dec_names) | set(disc_names)  # nothing for the frozen encoder
        for name, grad in zip(dec_names + disc_names, dec_grads + disc_grads):
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=_named(name))
        # Both clips bind, so clipping both networks by one joint norm would move the weights.
        assert _norm(dec_grads) > TRAIN.grad_clip and _norm(disc_grads) > LOSS.disc_grad_clip
        dec_lr = TRAIN.lr * (step + 1) / TRAIN.warmup_steps
        disc_lr = LOSS.disc_lr * (step + 1) / LOSS.disc_warmup_steps
        with torch.no_grad():
            clipped = _clipped(dec_grads, TRAIN.grad_clip)
            for p, grad, st in zip(dec_params, clipped, dec_state):
                p.copy_(_adamw(p, grad, st, dec_lr, TRAIN))
            clipped = _clipped(disc_grads, LOSS.disc_grad_clip)
            for p, grad, st in zip(disc_params, clipped, disc_state):
                p.copy_(_adamw(p, grad, st, disc_lr, TRAIN))

    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # atol: a step moves a weight by about lr = 1e-3; Adam turns the round-off of the
        # (mathematically zero) key-bias gradients into differences of ~1e-7.
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=_named(name))
    for name, value in model.tokenizer.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name  # the encoder stayed frozen
    learning_rates = [e.lr_scheduler.get_last_lr()[0] for e in engines]
    assert learning_rates == pytest.approx([TRAIN.lr * 1.0, LOSS.disc_lr * 0.75])
