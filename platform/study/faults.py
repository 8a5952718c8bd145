"""The fault table: each fault a days-long study must survive, injected for real, and what
it cost (``python pipelines/benchmark.py faults [--only worker,claim,...]``).

Every figure is measured on the run it describes: whether the fault happened (a killed
pid, a reject reason, a stopped server), whether the work finished, how many finished
trials were started again, how many MLflow runs exist beyond one per trial, and how many
metric steps are missing or logged twice against the steps the config asks for.

Rows: ``worker`` (SIGKILL of a Ray Train worker from outside, mid-step), ``driver`` (SIGKILL
of the study driver, then ``--resume``), ``mlflow`` (a real ``mlflow server`` stopped for
longer than a request timeout plus back-offs), ``decode`` (a hung decoder, a segfaulting
one, a SIGKILLed decode task), ``shard`` (one flipped bit in a cached shard), ``claim``
(two drivers claiming one study at once) and ``raylet`` (not run here; see its note).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitok.platform.study.probe import LocalMlflow, ProbeTask, run_probe
from vitok.platform.tracking.runs import TrackingConfig, start_run
from vitok.platform.training.train import load_model_state

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 15.0  # longer than one request timeout (10 s) plus the first back-offs


@dataclass
class Row:
    """One fault's outcome; None where a figure does not apply (printed as "-")."""

    fault: str
    injected: bool | None
    survived: bool | None
    rerun: int | None  # finished trials (or jobs restarted from step 0) run again
    duplicated: int | None  # MLflow runs beyond one per trial or job
    lost: int | None  # metric steps missing or logged twice
    note: str = ""


def logged_steps(steps: int, log_every: int) -> list[int]:
    """The steps the worker loop logs a training window at."""
    return sorted({*range(log_every, steps + 1, log_every), steps})


def metric_gaps(client: Any, run_id: str, keys: list[str], expected: list[int]) -> int:
    """Expected steps missing, plus points logged more than once at one step, over ``keys``."""
    gaps = 0
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        gaps += len(set(expected) - set(steps)) + len(steps) - len(set(steps))
    return gaps


def count_runs(client: Any, experiment: str, name: str) -> int:
    exp = client.get_experiment_by_name(experiment)
    return len(client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'"))


def _ensure_ray() -> None:
    """The running Ray, else a local one whose workers' output stays out of the table."""
    import ray

    from vitok.platform.runtime import ray_runtime_env

    if not ray.is_initialized():
        ray.init(address="local", log_to_driver=False, runtime_env=ray_runtime_env())


# ----------------------------------------------------------------------------- train faults
def worker_kill(work: Path) -> list[Row]:
    """SIGKILL rank 0 (the worker that logs) from outside, past the checkpoint at step 20."""
    from mlflow.tracking import MlflowClient

    _ensure_ray()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracking = TrackingConfig(uri=uri, experiment="faults", system_metrics=False)
    base, _ = run_probe("uninterrupted", work, tracking, ProbeTask())
    trace, killed, done = work / "trace.txt", {}, threading.Event()

    def killer() -> None:
        while not killed and not done.wait(0.02):  # never a pid of a finished run
            lines = trace.read_text().split() if trace.exists() else []
            if len(lines) >= 2 and int(lines[-1]) >= 25:
                pid, step = int(lines[-2]), int(lines[-1])
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, step=step)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result, run_id = run_probe("worker-kill", work, tracking, ProbeTask(str(trace), 0.1))
    finally:
        done.set()
        thread.join()
    pids = [int(line.split()[0]) for line in trace.read_text().splitlines()]
    steps = [int(line.split()[1]) for line in trace.read_text().splitlines()]
    later = [s for p, s in zip(pids, steps) if p != pids[0]]
    resumed_at = later[0] if later else None
    want, got = load_model_state(base.checkpoint_dir), load_model_state(result.checkpoint_dir)
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    client = MlflowClient(uri)
    note = f"killed pid {killed.get('pid')} in step {killed.get('step')}; resumed at step "
    note += f"{resumed_at}; final weights max|diff| {diff:.1e} vs uninterrupted"
    finished = (result.metrics.get("step") or 0) >= 40
    return [
        Row(
            "Train worker SIGKILL mid-step",
            injected=bool(killed),
            survived=finished and diff <= 1e-5,
            rerun=int(resumed_at == 0),
            duplicated=count_runs(client, "faults", "worker-kill") - 1,
            lost=metric_gaps(client, run_id, ["train/loss", "train/mse"], logged_steps(40, 10)),
            note=note,
        )
    ]


def mlflow_outage(work: Path) -> list[Row]:
    """Stop the tracking server once the first window is logged; start it again after
    ``OUTAGE_S`` while the job trains on (one worker, 80 paced steps, a window every 5)."""
    from mlflow.tracking import MlflowClient

    _ensure_ray()
    server = LocalMlflow(work / "mlflow-server")
    server.start()
    try:
        tracking = TrackingConfig(uri=server.uri, experiment="faults", system_metrics=False)
        name, window = "mlflow-outage", {}
        run_id = start_run(tracking, name, resume_file=work / name / "mlflow_run_id")
        client = MlflowClient(server.uri)

        def outage() -> None:
            deadline = time.monotonic() + 600
            while not client.get_metric_history(run_id, "train/loss"):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)
            server.stop()
            window["down"] = time.time()
            time.sleep(OUTAGE_S)
            server.start()
            window["up"] = time.time()

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        task = ProbeTask(step_s=0.3)
        run_probe(name, work, tracking, task, steps=80, log_every=5, num_workers=1)
        thread.join(timeout=300)
        history = client.get_metric_history(run_id, "train/loss")
        down, up = window.get("down", 0.0) * 1000, window.get("up", 0.0) * 1000
        during = sum(down <= m.timestamp <= up for m in history)
        lost = metric_gaps(client, run_id, ["train/loss", "train/mse"], logged_steps(80, 5))
        note = f"server down {(up - down) / 1000:.0f} s; {during} windows logged meanwhile, "
        note += "sent when it was back"
        survived = max((m.step for m in history), default=0) == 80
        dup = count_runs(client, "faults", name) - 1
        return [
            Row("MLflow server down mid-run", "down" in window, survived, None, dup, lost, note)
        ]
    finally:
        server.stop()


# ----------------------------------------------------------------------------- study faults
def study_args(work: Path) -> list[str]:
    """The smoke study over c = 2, 4, 8 (tokenizers only), stored under ``work``."""
    study = [sys.executable, str(REPO / "pipelines" / "scaling_study.py"), "--preset"]
    sets = ["generator_train=null", "search.sweeps=['c=2,4,8']", "tracking.system_metrics=false"]
    sets += [f"storage.root={work / 'store'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    return study + ["smoke-study"] + [arg for s in sets for arg in ("--set", s)]


def driver_kill(work: Path) -> list[Row]:
    """SIGKILL the study driver's process group while its second trial trains; --resume."""
    import yaml
    from mlflow.tracking import MlflowClient

    from vitok.platform.study.store import StudyStore

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    folder = work / "store" / "studies" / "smoke-study"

    def events() -> list[dict[str, Any]]:
        return StudyStore(str(folder)).events() if folder.exists() else []

    with open(work / "driver.log", "w") as log:
        proc = subprocess.Popen(
            study_args(work), cwd=work, env=env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if sum(e["event"] == "started" for e in events()) >= 2:
                break
            time.sleep(1)
        injected = proc.poll() is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {e["trial"] for e in events() if e["event"] == "finished"}
    resumed = subprocess.run(
        [*study_args(work), "--resume"], cwd=work, env=env, capture_output=True, timeout=1800
    )
    after = events()
    finished = {e["trial"] for e in after if e["event"] == "finished"}
    rerun = sum(e["event"] == "started" and e["trial"] in before for e in after) - len(before)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())["train"]
    expected = logged_steps(cfg["steps"], cfg["log_every"])
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vitok")
    runs = client.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'tokenizer'")
    names = [r.info.run_name for r in runs]
    lost = sum(metric_gaps(client, r.info.run_id, ["train/loss"], expected) for r in runs)
    note = f"killed with {len(before)} of 3 trials finished; resume exit {resumed.returncode}"
    return [
        Row(
            "study driver SIGKILL, then --resume",
            injected=injected and len(before) < 3,
            survived=resumed.returncode == 0 and finished == {"c2", "c4", "c8"},
            rerun=rerun,
            duplicated=len(names) - len(set(names)),
            lost=lost + len({"c2", "c4", "c8"} - set(names)) * len(expected),
            note=note,
        )
    ]


def concurrent_claim(work: Path) -> list[Row]:
    """Two drivers claim one study folder at the same moment (the lease every driver takes)."""
    code = (
        "import sys, time\nfrom vitok.platform.study.store import StudyStore\n"
        "s = StudyStore(sys.argv[1]); s.acquire(settle_s=2.0)\n"
        "print('WON', flush=True); time.sleep(4); s.release()\n"
    )
    uri = str(work / "studies" / "claimed")
    pipe = subprocess.PIPE
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=pipe, stderr=pipe, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    won = sum("WON" in out for out, _ in outs)
    refused = sum(p.returncode == 1 and "error: " in err for p, (_, err) in zip(procs, outs))
    note = f"{won} driver got the study, {refused} refused with a message"
    survived = won == 1 and refused == 1
    return [Row("two drivers claim one study", True, survived, None, won - 1, None, note)]


def raylet_kill(work: Path) -> list[Row]:
    note = "not run here (root + unshare -m); covered by tests/test_multinode_study.py"
    return [Row("worker node's raylet killed, restarted", None, None, None, None, None, note)]


# ----------------------------------------------------------------------------- data faults
def _rejects(path: str) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}


def decode_faults(work: Path) -> list[Row]:
    """One ``prepare`` over 7 rendered videos, 3 of them broken by ``VITOK_INJECT_FAULTS``:
    a decoder hung in native code, one that segfaults, a decode task SIGKILLed (as by OOM)."""
    from vitok.platform.data.prepare import FAULTS_ENV, DataConfig, clip_dataset, prepare
    from vitok.platform.data.synthetic import make_synthetic

    _ensure_ray()
    folder = work / "videos"
    files = make_synthetic(
        str(folder), classes=2, videos=7, n_frames=30, height=32, width=32, fps=8.0, seed=0
    )
    names = [Path(f).name for f in files]
    victims = {"hang": names[4], "crash": names[5], "die": names[6]}
    cfg = DataConfig(
        sources=(f"videos:{folder}",),
        frames=8,
        size=(32, 32),
        clips_per_video=1,
        val_fraction=0.0,
        decode_timeout_s=3.0,
    )
    previous = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = ",".join(f"{a}={n}" for a, n in victims.items())
    try:
        prepared = prepare(cfg, str(work / "store"), progress=False)
    finally:
        os.environ.pop(FAULTS_ENV)
        if previous is not None:
            os.environ[FAULTS_ENV] = previous
    reasons = _rejects(prepared.rejects_path)
    rows = clip_dataset(prepared, "train", columns=("path",)).take_all()
    kept = {Path(r["path"]).name for r in rows}
    unaccounted = len(set(names) - kept - set(reasons))  # neither trained on nor rejected
    good_kept = kept == set(names) - set(victims.values())
    out = []
    for action, label, prefix in (
        ("hang", "decoder hangs (native code)", "timeout"),
        ("crash", "decoder segfaults", "crashed: the decoder process died"),
        ("die", "decode task SIGKILLed", "crashed: the decode task died"),
    ):
        reason = reasons.get(victims[action], "")
        note = f"{victims[action]} rejected: {reason[:44]}" if reason else "not rejected"
        note += f"; {len(kept)} good files kept, {unaccounted} unaccounted"
        ok = reason.startswith(prefix) and good_kept and unaccounted == 0
        out.append(Row(label, bool(reason), ok, None, None, None, note))
    return out


def corrupted_shard(work: Path) -> list[Row]:
    """Flip one bit of a committed shard in place; the next ``prepare`` must notice."""
    from vitok.platform.data.prepare import clip_dataset, prepare, tiny_synthetic_data

    _ensure_ray()
    cfg = tiny_synthetic_data()
    root = str(work / "store")
    first = prepare(cfg, root, progress=False)
    victim = Path(first.root) / first.manifest["files"]["train"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fixed = prepare(cfg, root, progress=False)
    detected = "fails its checksum" in printed.getvalue()
    clips = clip_dataset(fixed, "train").count()
    rebuilt = not fixed.reused and fixed.manifest["attempt"] != first.manifest["attempt"]
    note = f"checksum mismatch reported: {detected}; rebuilt: {rebuilt}; {clips} clips"
    survived = detected and rebuilt and clips == first.num_train
    return [Row("cached shard corrupted (1 bit)", True, survived, None, None, None, note)]


# ----------------------------------------------------------------------------- table
FAULTS: dict[str, Callable[[Path], list[Row]]] = {  # name -> runner, in the table's order
    "worker": worker_kill,
    "driver": driver_kill,
    "mlflow": mlflow_outage,
    "decode": decode_faults,
    "shard": corrupted_shard,
    "claim": concurrent_claim,
    "raylet": raylet_kill,
}
COLUMNS = ("fault", "injected", "survived", "trials rerun", "runs dup", "metrics lost", "note")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return ("yes" if value else "NO") if isinstance(value, bool) else str(value)


def format_row(row: Row) -> str:
    figures = (row.injected, row.survived, row.rerun, row.duplicated, row.lost)
    cells = [_cell(v) for v in figures]
    return (
        f"{row.fault:<38} "
        + " ".join(f"{c:>{len(h)}}" for c, h in zip(cells, COLUMNS[1:6]))
        + (f"  {row.note}")
    )


def print_table(rows: list[Row]) -> None:
    print(f"{COLUMNS[0]:<38} " + " ".join(COLUMNS[1:6]) + "  note", flush=True)
    for row in rows:
        print(format_row(row), flush=True)


def run_faults(names: list[str], workdir: Path) -> list[Row]:
    """Run the named faults (``FAULTS`` order), each in its own folder under ``workdir``;
    prints the table row by row as results come in and returns the rows."""
    unknown = sorted(set(names) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown faults {unknown}; choose from {list(FAULTS)}")
    print_table([])
    rows = []
    for name in (n for n in FAULTS if n in names):
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            found = FAULTS[name](folder)
        except Exception as err:  # a fault that broke the runner is a row too, not a crash
            found = [Row(name, None, False, None, None, None, f"{type(err).__name__}: {err}")]
        for row in found:
            row.note += f" [{time.monotonic() - started:.0f} s]"
            print(format_row(row), flush=True)
        rows += found
    return rows
