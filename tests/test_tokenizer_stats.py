"""pipelines/model_stats.py: the compute table studies log."""

from __future__ import annotations

import pytest

from vitok.pipelines.model_stats import main, parse_input, variant_stats


def test_variant_stats_rows():
    row = variant_stats("S-B/16")
    assert row["variant"] == "S-B/16" and row["input"] == "1x256x256"
    assert row["L"] == 256 and row["E"] == 4096 and row["px/float"] == 48.0
    assert row["total_M"] == pytest.approx(129.0, rel=0.01)
    assert row["GFLOPs"] == pytest.approx(2 * row["GMACs"])
    video = variant_stats("N-T/2x4", channels=4, input_size=(4, 16, 16))
    assert video["L"] == 2 * 4 * 4 and video["E"] == 128


def test_cli_prints_table_and_rejects_bad_input(capsys):
    assert main(["N-N/16", "N-T/2x4@4x16x16", "--channels", "8"]) == 0
    out = capsys.readouterr().out
    assert "N-N/16" in out and "N-T/2x4" in out and "4x16x16" in out and "GMACs" in out
    assert main(["S-B/x8"]) == 2
    assert "form" in capsys.readouterr().err
    assert parse_input("256x256") == (1, 256, 256)
    with pytest.raises(ValueError, match="HxW or TxHxW"):
        parse_input("16x")


def test_tokenizer_params_build_the_model_once_per_config(monkeypatch):
    """One meta-device build gives the counts and the FLOPs, and a trial's second call for
    the same config builds nothing; the numbers are the separate computations'."""
    from vitok.pipelines import model_stats
    from vitok.tokenizer import TokenizerConfig
    from vitok.tokenizer.flops import forward_flops, param_counts

    builds, build = [], model_stats.meta_model

    def counted(config):
        builds.append(config)
        return build(config)

    monkeypatch.setattr(model_stats, "meta_model", counted)
    model_stats._tokenizer_params.cache_clear()
    cfg = TokenizerConfig.from_variant("N-T/2x4", channels=4, input_size=(4, 16, 16))
    first = model_stats.tokenizer_params(cfg)
    first["E"] = -1  # a caller's edit does not reach the next caller
    again = model_stats.tokenizer_params(cfg)
    assert builds == [cfg]
    assert again["E"] == 128
    assert again["params_M"] == pytest.approx(param_counts(cfg)["total"] / 1e6)
    assert again["gflops"] == pytest.approx(forward_flops(cfg)["gflops"])
