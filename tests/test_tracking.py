"""RunLogger when the tracking server goes away: training goes on, nothing is lost or doubled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vitok.platform.tracking import spool_cli, tracking_spool
from vitok.platform.tracking.runs import RunLogger, TrackingConfig, start_run


def _dead_uri() -> str:
    from helpers_cluster import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _log_then_die(uri: str, run_id: str, scratch: Path, steps: int) -> None:
    """A process that logs through a RunLogger and is SIGKILLed before any flush."""
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from vitok.platform.tracking.runs import RunLogger
        logger = RunLogger({uri!r}, {run_id!r})
        for step in range({steps}):
            logger.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
        logger.log_text("written before the kill", "notes/killed.txt")
        logger.set_tags({{"phase": "killed"}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {"VITOK_SCRATCH": str(scratch), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**_base_env(), **env}, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def test_spool_of_a_killed_logger_is_reported_and_kept(tmp_path, monkeypatch, capsys) -> None:
    """Kill-safe: a logger killed with records queued leaves them on disk; the next logger
    for that server reports them, takes them over, and says at close what is still unsent
    and where; a logger for another server only reports them."""
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("VITOK_SCRATCH", str(scratch))
    uri = _dead_uri()
    _log_then_die(uri, "run-killed", scratch, steps=20)

    (orphan,) = tracking_spool.orphans()
    pending = tracking_spool.pending_records(orphan)
    assert tracking_spool.count_items(pending) == {"metrics": 20, "artifact": 1, "tags": 1}

    other = RunLogger(_dead_uri(), "run-other", flush_timeout_s=0.5)
    assert "were never sent" in capsys.readouterr().err  # reported, left alone
    assert other.close()["pending"] == {} and orphan.exists()

    heir = RunLogger(uri, "run-heir", flush_timeout_s=1.0, max_backoff_s=0.5)
    err = capsys.readouterr().err
    assert "left unsent by process" in err and "20 metric values, 1 tag, 1 artifact" in err
    assert not orphan.exists()  # claimed: moved into the heir's own spool
    summary = heir.close()
    err = capsys.readouterr().err
    assert err.count("is unreachable") <= 1  # once per process and server, never per call
    assert summary["pending"] == {"metrics": 20, "artifact": 1, "tags": 1}
    assert summary["spool"] and summary["spool"] in err and "could not log" in err
    kept = tracking_spool.pending_records(Path(summary["spool"]))
    steps = [item[3] for r in kept if r["kind"] == "metrics" for item in r["items"]]
    assert steps == list(range(20))  # in order, each once
    (artifact,) = [r for r in kept if r["kind"] == "artifact"]
    text = (Path(summary["spool"]) / artifact["unit"] / artifact["name"]).read_text()
    assert text == "written before the kill" and artifact["artifact_path"] == "notes"
    assert tracking_spool.orphans() == []  # the heir still runs: not an orphan


def test_calls_return_at_once_while_the_server_is_down(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VITOK_SCRATCH", str(tmp_path / "scratch"))
    logger = RunLogger(_dead_uri(), "run-down", flush_timeout_s=0.2)
    started = time.monotonic()
    for step in range(200):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.log_params({"lr": 0.1})
    assert time.monotonic() - started < 2.0
    assert logger.close()["pending"] == {"metrics": 200, "params": 1}


def test_system_metrics_go_through_the_queue(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VITOK_SCRATCH", str(tmp_path / "scratch"))
    logger = RunLogger(_dead_uri(), "run-system", flush_timeout_s=0.2, request_timeout_s=1.0)
    sampler = logger.start_system_metrics(interval_s=0.2)
    assert sampler is not None
    time.sleep(1.5)
    sampler.finish()
    summary = logger.close()
    kept = tracking_spool.pending_records(Path(summary["spool"]))
    items = [item for r in kept if r["kind"] == "metrics" for item in r["items"]]
    assert any(key.startswith("system/cpu_utilization") for key, *_ in items)
    steps = sorted({step for *_, step in items})
    assert steps == list(range(len(steps))) and len(steps) >= 2


@pytest.mark.slow  # a real `mlflow server`, started twice (a minute or two)
def test_logging_survives_a_stopped_tracking_server(tmp_path, monkeypatch, capsys) -> None:
    """A RunLogger logs a curve while its server is stopped for longer than the client's
    retry window and started again on the same port and database: every step arrives
    exactly once with its original timestamp, and an artifact logged during the outage
    (its source file deleted at once) arrives too. A logger killed during the outage is
    sent by ``python -m vitok.platform.tracking replay`` afterwards."""
    from helpers_cluster import MlflowServer
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    scratch = tmp_path / "scratch"
    monkeypatch.setenv("VITOK_SCRATCH", str(scratch))
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # starts faster; not used here
    server = MlflowServer(tmp_path / "mlflow", env, str(tmp_path / "artifacts"))
    try:
        run_id = start_run(TrackingConfig(uri=server.uri, experiment="outage"), "outage")
        killed_run = start_run(TrackingConfig(uri=server.uri, experiment="outage"), "killed")
        client = MlflowClient(server.uri)
        logger = RunLogger(server.uri, run_id, max_backoff_s=2.0, flush_timeout_s=90.0)
        logger.log_params({"lr": 0.1})
        step, slowest, sent = 0, 0.0, {}

        def log_step(pause: float) -> None:
            nonlocal step, slowest
            t = time.monotonic()
            logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            slowest = max(slowest, time.monotonic() - t)
            sent[step] = 1.0 / (step + 1)
            step += 1
            time.sleep(pause)

        for _ in range(15):
            log_step(0.05)
        assert logger.flush(30.0)  # the first part reached the server
        server.stop()
        down = time.monotonic()
        # MLflow's client alone retries a refused request for minutes; the logger's calls
        # give up within a request, so an outage is noticed at once.
        with tracking_spool.fail_fast(5.0), pytest.raises(MlflowException):
            client.get_run(run_id)
        assert time.monotonic() - down < 5.0

        outage_file = tmp_path / "grid.txt"
        outage_file.write_text("logged while the server was down")
        logger.log_artifact(outage_file, "outage")
        outage_file.unlink()  # the logger holds its own copy
        logger.set_tags({"phase": "outage"})
        logger.log_dict({"during": "outage"}, "outage/state.json")
        _log_then_die(server.uri, killed_run, scratch, steps=7)
        while time.monotonic() - down < 15.0:  # longer than a request timeout + backoffs
            log_step(0.2)
        # Start it again (same port and database) while training goes on.
        restart = threading.Thread(target=server.start)
        restart.start()
        while restart.is_alive():
            log_step(0.2)
        restart.join()
        steps_while_down = step - 15
        assert steps_while_down >= 40, steps_while_down  # training went on
        assert slowest < 1.0, slowest  # no call waited on the network
        for _ in range(15):
            log_step(0.05)
        summary = logger.finish()
        assert summary == {"pending": {}, "failed": {}, "spool": None}
        assert spool_cli.main(["replay", "--timeout", "60"]) == 0  # the killed logger's

        err = capsys.readouterr().err
        assert err.count("is unreachable") == 1 and err.count("is back after") == 1
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(step))  # complete, each once
        assert {m.step: m.value for m in history} == pytest.approx(sent)
        times = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
        assert times == sorted(times)  # the time of each call, not of its delivery
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage"
        assert run.data.params == {"lr": "0.1"}
        outage = {a.path for a in client.list_artifacts(run_id, "outage")}
        assert outage == {"outage/grid.txt", "outage/state.json"}
        local = client.download_artifacts(run_id, "outage/grid.txt", str(tmp_path / "dl"))
        assert Path(local).read_text() == "logged while the server was down"
        state = client.download_artifacts(run_id, "outage/state.json", str(tmp_path / "dl"))
        assert json.loads(Path(state).read_text()) == {"during": "outage"}

        killed = client.get_run(killed_run)
        assert sorted(m.step for m in client.get_metric_history(killed_run, "loss")) == list(
            range(7)
        )
        assert killed.data.tags["phase"] == "killed"
        assert [a.path for a in client.list_artifacts(killed_run, "notes")] == ["notes/killed.txt"]
        assert tracking_spool.orphans() == []
        assert not any((scratch / tracking_spool.SPOOL_FOLDER).glob("*/records.jsonl"))
    finally:
        server.stop()
