"""Parameter and forward-FLOP counts for a ViTok variant, without allocating its weights.

The model is built on the meta device and run under `torch.utils.flop_counter.FlopCounterMode`
on a meta input, so even L-sized models cost no memory. torch counts a multiply-add as 2
FLOPs; `macs` = flops / 2 is the convention of fvcore-style tables (and of the paper's
"GFLOPs" column, see pipelines/model_stats.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitok.tokenizer.config import TokenizerConfig
from vitok.tokenizer.model import ViTok


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def meta_model(config: TokenizerConfig) -> ViTok:
    """The variant built on the meta device: shapes only, no memory (build once, then pass it
    to ``param_counts`` and ``forward_flops``)."""
    with torch.device("meta"):
        return ViTok(config)


def param_counts(config: TokenizerConfig, model: ViTok | None = None) -> dict[str, int]:
    """{'encoder', 'decoder', 'total'} parameter counts of a variant (meta device, free)."""
    model = model if model is not None else meta_model(config)
    encoder = sum(p.numel() for p in model.encoder_parameters())
    decoder = sum(p.numel() for p in model.decoder_parameters())
    return {"encoder": encoder, "decoder": decoder, "total": count_params(model)}


def forward_flops(
    config: TokenizerConfig, batch_size: int = 1, model: ViTok | None = None
) -> dict[str, float]:
    """Forward FLOPs of encode + decode for one batch at `config.input_size` (of ``model``,
    its meta-device build, when given).

    Returns {'flops', 'macs', 'gflops', 'gmacs', 'encoder_flops', 'decoder_flops'}
    (flops = 2 * macs; matmuls and attention only, as torch's flop counter counts).
    """
    t, h, w = config.input_size
    model = model if model is not None else meta_model(config)
    with torch.device("meta"):
        x = torch.empty(batch_size, t, h, w, 3)
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc_counter:
            posterior = model.encode(x)
        with FlopCounterMode(display=False) as dec_counter:
            model.decode(posterior.mode())
    enc, dec = enc_counter.get_total_flops(), dec_counter.get_total_flops()
    flops = enc + dec
    return {
        "flops": float(flops),
        "macs": flops / 2,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "encoder_flops": float(enc),
        "decoder_flops": float(dec),
    }
