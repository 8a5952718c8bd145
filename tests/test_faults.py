"""The fault table (``python pipelines/benchmark.py faults``): its cheapest rows run here; the
others have their own tests (test_train, test_scaling_study, test_tracking, test_data_ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vitok.platform.study.faults import FAULTS, Row, format_row, metric_gaps, run_faults


class _History:
    def __init__(self, steps: dict[str, list[int]]) -> None:
        self.steps = steps

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s) for s in self.steps.get(key, [])]


def test_metric_gaps_count_missing_and_repeated_steps():
    client = _History({"loss": [10, 20, 20, 40], "mse": [10, 20, 30, 40]})
    assert metric_gaps(client, "run", ["mse"], [10, 20, 30, 40]) == 0
    assert metric_gaps(client, "run", ["loss"], [10, 20, 30, 40]) == 2  # 30 lost, 20 twice
    assert metric_gaps(client, "run", ["loss", "mse", "lr"], [10]) == 1 + 1  # lr never logged


def test_unknown_fault_is_refused_before_running_anything(tmp_path):
    from vitok.pipelines.benchmark import main

    with pytest.raises(ValueError, match="unknown faults \\['nope'\\]"):
        main(["faults", "--only", "claim,nope", "--workdir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    assert "-" in format_row(Row("x", None, True, None, 0, None))


@pytest.mark.slow
def test_fault_table_cheapest_rows(ray_local, tmp_path, capsys):
    """Two drivers claiming one study, and a bit flipped in a cached shard: measured, printed."""
    rows = run_faults(["claim", "shard"], tmp_path)  # run and printed in the table's order
    assert [r.fault for r in rows] == [
        "cached shard corrupted (1 bit)",
        "two drivers claim one study",
    ]
    shard, claim = rows
    assert shard.injected and shard.survived, shard.note
    assert claim.injected and claim.survived and claim.duplicated == 0, claim.note
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fault ") and "trials rerun" in line for line in printed)
    (line,) = [line for line in printed if line.startswith("two drivers claim one study")]
    assert line.split()[5:10] == ["yes", "yes", "-", "0", "-"]  # as measured above
    assert list(FAULTS)[-1] == "raylet"
