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
        check_printed_config(script, argv[1:], out)
    else:
        check_model_stats(argv[1:], out)


def check_printed_config(script: str, args: list[str], out: str) -> None:
    """The printed YAML is the preset the command names with each ``--set`` and ``--data``
    applied: every override's value at its path, everything else the preset's (the lines
    the command prints before it, ``[vitok] ...``, say what it filled in)."""
    import yaml

    from vitok.pipelines.presets import preset
    from vitok.platform.config import to_dict

    notes = [line for line in out.splitlines() if line.startswith("[vitok] ")]
    printed = yaml.safe_load("\n".join(line for line in out.splitlines() if line not in notes))
    # preprocess.py without --preset starts from the demo preset, as every entry point does
    name = args[args.index("--preset") + 1] if "--preset" in args else "demo"
    expected = to_dict(preset(name))
    sources = [value for flag, value in zip(args, args[1:]) if flag == "--source"]
    if sources:  # preprocess.py's older option: the sources, in the order given
        expected["data"]["sources"] = sources
    if script == "train_generator.py" and expected["generator_train"] is None:
        assert "[vitok] no generator_train section: using the tokenizer's train settings" in notes
        expected["generator_train"] = expected["train"]
    for flag, value in zip(args, args[1:]):
        if flag == "--set":
            key, _, raw = value.partition("=")
            *parents, leaf = key.split(".")
            section = expected
            for name in parents:
                section = section[name]
            section[leaf] = yaml.safe_load(raw)
        elif flag == "--data":
            expected["data"]["sources"] = [value]
        elif flag == "--storage":  # preprocess.py's older spelling of storage.root
            expected["storage"]["root"] = value
    assert printed == expected


def check_model_stats(args: list[str], out: str) -> None:
    """One row per variant in the order given, with L and E from the variant's patch and
    tubelet at the paper's input sizes (256x256 images, 16x128x128 video), c = 16, and the
    paper's encoder and decoder sizes in millions of parameters."""
    from vitok.pipelines.paper import SIZE_PARAMS_M

    lines = out.splitlines()
    header = lines[0].split()
    rows = [dict(zip(header, line.split())) for line in lines[1 : 1 + len(args)]]
    assert [r["variant"] for r in rows] == args
    for row in rows:
        sizes, _, patching = row["variant"].partition("/")
        encoder, decoder = sizes.split("-")
        q, p = (int(v) for v in patching.split("x")) if "x" in patching else (1, int(patching))
        t, h, w = (16, 128, 128) if q > 1 else (1, 256, 256)
        tokens = (t // q) * (h // p) * (w // p)
        assert row["input"] == f"{t}x{h}x{w}" and row["c"] == "16"
        assert (int(row["L"]), int(row["E"])) == (tokens, tokens * 16), row
        assert float(row["enc_M"]) == pytest.approx(SIZE_PARAMS_M[encoder], abs=0.3), row
        assert float(row["dec_M"]) == pytest.approx(SIZE_PARAMS_M[decoder], abs=0.3), row
        assert float(row["total_M"]) == pytest.approx(
            float(row["enc_M"]) + float(row["dec_M"]), abs=0.11
        )
