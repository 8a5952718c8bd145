"""The study's report on known numbers: the Pareto front, the pixels-per-float transfer and
equal-E checks, every R^2 with its direction, the MLflow links and the description's plots,
and the console line of a trial whose configuration already ran."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitok.pipelines.presets import preset
from vitok.platform.storage import StorageConfig
from vitok.platform.study.pareto import pareto_front
from vitok.platform.study.report import fit_line
from vitok.platform.study.store import REUSED, StudyStore, study_progress
from vitok.platform.tracking.runs import TrackingConfig

# (trial, psnr, gflops): c1 is beaten by c2 on both; c4 ties c2's gflops with a higher
# psnr, so c2 is beaten too; c16 is beaten by c8 (same psnr, more gflops); "nan" has no psnr.
KNOWN = [
    ("c1", 17.0, 1.0),
    ("c2", 18.0, 1.0),
    ("c4", 19.0, 1.0),
    ("c8", 20.0, 2.0),
    ("c16", 20.0, 3.0),
    ("c32", 21.0, 4.0),
    ("c64", 16.0, 0.5),
    ("nan", float("nan"), 0.1),
]
FRONT = {"c4", "c8", "c32", "c64"}
OBJECTIVES = [("val/psnr", "max"), ("gflops", "min")]


def _rows() -> list[dict]:
    return [{"trial": t, "val/psnr": p, "gflops": g, "E": 64} for t, p, g in KNOWN]


def test_pareto_front_of_known_values_follows_each_objectives_direction():
    rows = _rows()
    flags = pareto_front(rows, OBJECTIVES)
    assert {r["trial"] for r, f in zip(rows, flags) if f} == FRONT
    # Both maximised: more gflops is now better, so c32 (21 dB, 4 GFLOPs) beats everything
    # but the rows it does not beat on gflops at equal or higher psnr: none.
    flags = pareto_front(rows, [("val/psnr", "max"), ("gflops", "max")])
    assert {r["trial"] for r, f in zip(rows, flags) if f} == {"c32"}
    # Equal values on every objective: neither dominates, both stay.
    twins = [{"trial": "a", "x": 1.0, "y": 2.0}, {"trial": "b", "x": 1.0, "y": 2.0}]
    assert pareto_front(twins, [("x", "max"), ("y", "min")]) == [True, True]
    with pytest.raises(ValueError, match="mode='up'"):
        pareto_front(twins, [("x", "up")])


def test_report_of_a_two_objective_study_shows_and_tables_the_front(tmp_path):
    from vitok.pipelines.study_report import write_report

    store = StudyStore(str(tmp_path / "study"))
    rows = _rows()
    tokenizer = preset("smoke").tokenizer
    write_report(tokenizer, store, rows, [], None, ("psnr:max", "gflops:min"))
    report = Path(store.path("report"))
    assert (report / "pareto_front.png").stat().st_size > 1000
    text = (report / "report.md").read_text()
    section = text.split("## Pareto front", 1)[1].split("\n## ", 1)[0]
    assert "![pareto](pareto_front.png)" in section
    assert "4 of 8 trials (1 without every objective's value, not compared)" in section
    table = [line for line in section.splitlines() if line.startswith("| c")]
    # The front's table, best first by the first objective (psnr, max).
    assert [line.split("|")[1].strip() for line in table] == ["c32", "c8", "c4", "c64"]
    with open(report / "trials.csv") as f:
        marked = {r["trial"]: r["pareto_front"] for r in csv.DictReader(f)}
    assert {t for t, v in marked.items() if v == "yes"} == FRONT
    # One objective: no front section, no column.
    single = StudyStore(str(tmp_path / "single"))
    write_report(tokenizer, single, _rows()[:3], [], None, ("psnr:max",))
    assert "Pareto" not in Path(single.path("report", "report.md")).read_text()


def test_front_trials_are_tagged_and_are_the_best_models(tmp_path, mlflow_uri, capsys):
    """The front's runs carry vitok.pareto_front=true, the others false (the runs table
    filters on it); the summary names the front as the best models, with the rule."""
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.study_best import print_best, register_best

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("front")
    rows = _rows()
    for row in rows:
        row["tokenizer_run_id"] = client.create_run(exp, run_name=row["trial"]).info.run_id
    cfg = preset("smoke-study")
    cfg = dataclasses.replace(
        cfg,
        tracking=TrackingConfig(uri=mlflow_uri, registered_model=""),  # no checkpoints here
        search=dataclasses.replace(cfg.search, objectives=("psnr:max", "gflops:min")),
        storage=StorageConfig(root=str(tmp_path)),
    )
    store = StudyStore(str(tmp_path / "study"))
    best = register_best(cfg, store, rows)
    assert best["rule"] == "pareto front"
    assert {f["trial"] for f in best["front"]} == FRONT
    for row in rows:
        tag = client.get_run(row["tokenizer_run_id"]).data.tags["vitok.pareto_front"]
        assert tag == ("true" if row["trial"] in FRONT else "false"), row["trial"]
    tagged = client.search_runs([exp], "tags.`vitok.pareto_front` = 'true'")
    assert {r.info.run_name for r in tagged} == FRONT
    print_best(best)
    out = capsys.readouterr().out
    assert "the Pareto front of val/psnr:max, gflops:min: 4 trials, 0 registered" in out
    assert "c64: val/psnr 16, gflops 0.5  (not registered)" in out


def test_every_r2_says_its_direction_in_report_and_console(tmp_path, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.study_report import StudyResult, print_summary, write_report

    falling = fit_line([1, 2, 3], [20.02, 19.99, 19.83])  # the demo's decoder sweep
    assert falling.r2 > 0.8 and falling.direction == "falling"
    assert fit_line([1, 2, 3], [1.0, 2.0, 3.0]).direction == "rising"
    assert fit_line([1, 2, 3], [20.0, 20.001, 20.0]).direction == "flat"
    assert "falling (-0.19 across the sweep, n = 3)" in falling.describe()

    store = StudyStore(str(tmp_path / "study"))
    rows = [
        {"trial": f"c{c}", "E": 64 * c, "encoder_size": "M", "decoder_size": "M", "val/psnr": p}
        for c, p in ((1, 20.0), (2, 19.5), (4, 19.4))
    ]
    fits = write_report(preset("smoke").tokenizer, store, rows, [], None)
    text = Path(store.path("report", "report.md")).read_text()
    assert "- val/psnr: R^2 = " in text and ", falling (" in text
    assert fits["E/val/psnr"].direction == "falling"

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("vitok")
    parent = client.create_run(exp, run_name="study").info.run_id
    cfg = dataclasses.replace(preset("smoke-study"), tracking=TrackingConfig(uri=mlflow_uri))
    print_summary(cfg, StudyResult(store, rows, [], fits, parent), 1.0)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "R^2 E/val/psnr" in x)
    assert "falling" in line
    # Direct links: the runs table and the parent run, in MLflow's model-training view.
    runs = f"http://127.0.0.1:5000/#/experiments/{exp}/runs"
    assert f"{runs}?workflowType=machine_learning" in out
    assert f"{runs}/{parent}?workflowType=machine_learning" in out
    assert "'Model training'" in out


def test_description_points_plots_at_the_runs_artifacts():
    from vitok.pipelines.study_mlflow import description

    text = "## Against E\n![E](scaling_E.png)\n- psnr\n![pareto](pareto_front.png)\n"
    note = description(text, "abc123")
    assert "![E](get-artifact?path=report%2Fscaling_E.png&run_uuid=abc123)" in note
    assert "![pareto](get-artifact?path=report%2Fpareto_front.png&run_uuid=abc123)" in note
    assert "](scaling_E.png)" not in note


def _transfer_rows() -> list[dict]:
    """Two clip sizes at the same pixels per float (p=4, q=2), an equal-E pair at each size,
    and a second seed of one point."""
    rows = []
    base = {"q": 2, "encoder_size": "M", "decoder_size": "M", "seed": 0}
    for size, pixels, shift in (
        ("8x16x16", 8 * 16 * 16 * 3, 0.0),
        ("8x32x32", 8 * 32 * 32 * 3, 0.4),
    ):
        for c, psnr in ((1, 18.0), (2, 19.0), (4, 20.0), (8, 21.0)):
            e = pixels * c // 96
            rows.append(
                {
                    **base,
                    "trial": f"{size}-c{c}",
                    "input": size,
                    "p": 4,
                    "c": c,
                    "E": e,
                    "L": e // c,
                    "pixels_per_float": 96 / c,
                    "val/psnr": psnr + shift,
                }
            )
    rows.append(
        {
            **base,
            "trial": "16-p2",
            "input": "8x16x16",
            "p": 2,
            "c": 1,
            "E": 256,
            "L": 256,
            "pixels_per_float": 24.0,
            "val/psnr": 19.7,
        }
    )
    rows.append(
        {
            **base,
            "trial": "32-p8",
            "input": "8x32x32",
            "p": 8,
            "c": 16,
            "E": 1024,
            "L": 64,
            "pixels_per_float": 24.0,
            "val/psnr": 18.4,
        }
    )
    rows.append({**rows[2], "trial": "16-c4-seed1", "seed": 1, "val/psnr": 20.1})
    return rows


def test_transfer_and_equal_e_sections_on_known_values(tmp_path):
    from vitok.pipelines.study_transfer import (
        equal_e,
        matched,
        seed_differences,
        transfer_console,
        transfer_rows,
        transfer_sections,
        verdict,
    )

    rows = _transfer_rows()
    group = transfer_rows(rows)
    assert {r["trial"] for r in group} == {r["trial"] for r in rows if r["p"] == 4}
    table = matched(group)
    assert [r["pixels_per_float"] for r in table] == [12.0, 24.0, 48.0, 96.0]
    # 0.4 dB apart everywhere, except at 24 where the 16x16 point is the mean of two seeds.
    assert [round(r["abs dPSNR"], 3) for r in table] == [0.4, 0.35, 0.4, 0.4]
    pairs = equal_e(rows)
    assert [(p["size"], p["E"], round(p["abs dPSNR"], 3)) for p in pairs] == [
        ("8x16x16", 256, 0.3),
        ("8x32x32", 1024, 2.0),
    ]
    assert seed_differences(rows) == [pytest.approx(0.1)]

    fits = {}
    lines = transfer_sections(rows, "transfer", tmp_path, fits, None)
    text = "\n".join(lines)
    assert (tmp_path / "transfer_ppf.png").stat().st_size > 1000
    assert (
        "Mean |dPSNR| between clip sizes at equal pixels per float: 0.39 dB (max 0.40 dB, "
        "4 points): larger than the seed-to-seed difference (max 0.10 dB): the paper's claim "
        "does not hold at this scale." in text
    )
    assert "8x32x32 scores higher at every pixels per float seen at both sizes." in text
    assert "across clip sizes, pixels per float, as the paper says, predicts PSNR better" in text
    assert "- 8x32x32, E = 1024: |dPSNR| 2.00 dB, larger than the seed-to-seed" in text
    assert "mean 0.10 dB, max 0.10 dB over 1 pair(s)" in text
    # PSNR falls as pixels per float grows, at each size and through all points.
    assert {k: f.direction for k, f in fits.items()} == {
        "ppf/all/val/psnr": "falling",
        "ppf/8x16x16/val/psnr": "falling",
        "ppf/8x32x32/val/psnr": "falling",
    }
    assert fits["ppf/8x32x32/val/psnr"].r2 == pytest.approx(1.0)
    console = "\n".join(transfer_console(rows))
    assert "mean |dPSNR| between clip sizes at equal pixels per float 0.39 dB" in console
    assert "8x32x32 E=1024: |dPSNR| 2.00 dB" in console
    assert verdict(0.1, [0.1, 0.05]).startswith("within the seed-to-seed difference")
    assert "noise is unknown" in verdict(0.1, [])
    # A study with one clip size and no equal-E pair has none of these sections.
    assert (
        transfer_sections(
            [r for r in rows if r["input"] == "8x32x32" and r["p"] == 4], "one", tmp_path, {}, None
        )
        == []
    )


def test_transfer_preset_pairs_every_point_across_sizes():
    from vitok.pipelines.study_tune import unique_trials
    from vitok.platform.config import apply_overrides

    cfg = preset("transfer")
    resolved = [apply_overrides(cfg, list(t)).tokenizer for t in unique_trials(cfg)]
    by_size: dict[tuple, set] = {}
    for tok in resolved:
        if tok.patch == 4 and tok.channels <= 8:
            by_size.setdefault(tok.input_size, set()).add(tok.pixels_per_float)
    assert by_size == {(8, 16, 16): {96.0, 48.0, 24.0, 12.0}, (8, 32, 32): {96.0, 48.0, 24.0, 12.0}}
    equal = {}
    for tok in resolved:
        equal.setdefault((tok.input_size, tok.latent_floats), set()).add(tok.patch)
    assert equal[((8, 16, 16), 256)] == {2, 4} and equal[((8, 32, 32), 1024)] == {4, 8}


def test_a_trial_whose_configuration_already_ran_says_its_result_was_reused(tmp_path, capsys):
    store = StudyStore(str(tmp_path / "study"))
    store.commit("c8", {"E": 512, "val/psnr": 20.5})
    callback = study_progress(store, lambda config: f"c{config['c']}", lambda r: "E=512", ["E"])
    trial = SimpleNamespace(
        config={"c": 8}, last_result={**store.result("c8"), REUSED: 1, "time_total_s": 0.1}
    )
    callback.on_trial_complete(0, [trial], trial)
    fresh = SimpleNamespace(config={"c": 8}, last_result={"E": 512, "time_total_s": 60.0})
    callback.on_trial_complete(0, [fresh], fresh)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[vitok] trial c8 reused: this configuration already ran")
    assert lines[1] == "[vitok] trial c8 finished: E=512, 1.0 min"
