"""What the fault table (``vitok.platform.study.faults``) runs and watches: a probe training job
(a linear auto-encoder ``Task``, paced so a fault lands mid-run, tracing rank 0's pid and
step) and an ``mlflow server`` on 127.0.0.1 that can be stopped and started again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitok.platform.tracking.runs import TrackingConfig, start_run
from vitok.platform.training.train import TrainConfig, TrainJob, run_training
from vitok.platform.training.train_data import split_from_arrays


class ProbeTask:
    """A linear auto-encoder on 16-d vectors (the platform's ``Task``), slowed by ``step_s``
    per step so a fault lands mid-run; rank 0 appends ``<pid> <step>`` to ``trace``."""

    def __init__(self, trace: str | None = None, step_s: float = 0.0) -> None:
        self.trace, self.step_s = trace, step_s

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 16))

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": list(model.parameters())}]

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        if self.trace and torch.distributed.get_rank() == 0:
            with open(self.trace, "a") as fh:
                fh.write(f"{os.getpid()} {step}\n")
        time.sleep(self.step_s)
        x = batch["x"]  # (B, 16)
        loss = ((model(x) - x) ** 2).mean()
        return loss, {"mse": loss.detach()}

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def eval_module(self, model: nn.Module) -> nn.Module:
        return model


def probe_batch(batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator) -> dict:
    return {"x": batch["x"].float()}


def probe_datasets() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 16)).astype("float32")
    rows = (rng.normal(size=(256, 4)).astype("float32") @ basis) / 4  # rank-4 vectors
    return {"train": split_from_arrays({"x": rows})}


def run_probe(name: str, work: Path, tracking: TrackingConfig, task: ProbeTask, **train: Any):
    """Train the probe under ``work/ray`` into its own MLflow run; (result, run id)."""
    run_id = start_run(tracking, name, resume_file=work / name / "mlflow_run_id")
    defaults = dict(steps=40, batch_size=8, lr=3e-2, warmup_steps=2, num_workers=2)
    defaults.update(checkpoint_every=20, log_every=10, cpus_per_worker=0.5, max_failures=2)
    cfg = TrainConfig(**{**defaults, **train})
    job = TrainJob(name, task, cfg, probe_batch, columns=("x",), tracking=tracking, run_id=run_id)
    return run_training(job, probe_datasets(), storage_path=work / "ray"), run_id


class LocalMlflow:
    """``mlflow server`` on 127.0.0.1 (SQLite store, served artifacts) that ``stop()`` and
    ``start()`` bring down and back on the same port and database."""

    def __init__(self, workdir: Path) -> None:
        import socket

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.workdir / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.workdir / 'server.log'}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).read() == b"OK":
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not up after {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGKILL the server's process group (its pid is the group id: ours alone)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
