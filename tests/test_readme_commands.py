"""Every `python pipelines/...` command README.md tells users to type is run here: the quick
ones as written, the long ones (a study, a training run) up to their resolved config
(`--print-config`: the options parse, the preset exists, every override is valid)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Commands that finish in seconds on a CPU, run as written.
RUN_AS_WRITTEN = {"model_stats.py"}
# Commands that run for minutes or need a cluster or a dataset: resolved, not run.
PRINT_CONFIG = {"scaling_study.py", "train_tokenizer.py", "train_generator.py", "preprocess.py"}
# Checked by their own tests (each is named).
# Not checkable here, and why (each is exercised by the test named).
ELSEWHERE = {
    "benchmark.py": "a benchmark that prints figures, minutes long",
    "cluster_check.py": "tests/test_cluster.py (it needs a cluster to check)",
}


def readme_commands() -> list[str]:
    found = []
    for line in README.read_text().splitlines():
        match = re.search(r"(?:^|-- )python (pipelines/\S+\.py.*?)(?:\s+#.*)?$", line.strip())
        if match:
            found.append(match.group(1).strip())
    return found


def test_the_readme_lists_commands_and_each_kind_is_known():
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        script = Path(shlex.split(command)[0]).name
        assert script in RUN_AS_WRITTEN | PRINT_CONFIG | set(ELSEWHERE), command


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, capsys, tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    if "<mlflow run id>" in command:  # a finished tokenizer run, as a user would pass one
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri)
        run = client.create_run(client.create_experiment("readme"))
        client.set_tag(run.info.run_id, "checkpoint", str(tmp_path / "checkpoint"))
        command = command.replace("<mlflow run id>", run.info.run_id)
    argv = shlex.split(command)
    script = Path(argv[0]).name
    if script not in RUN_AS_WRITTEN | PRINT_CONFIG:
        pytest.skip(f"{script}: {ELSEWHERE[script]}")
    module = importlib.import_module(f"vitok.pipelines.{script[:-3]}")
    args = argv[1:] if script in RUN_AS_WRITTEN else [*argv[1:], "--print-config"]
    try:
        code = module.main(args)
    except SystemExit as exit:  # argparse's exit on --print-config paths
        code = exit.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    if script in PRINT_CONFIG:
        assert "name: " in out and "\ntokenizer:\n" in out
    else:
        assert "S-B/16" in out and "E" in out
