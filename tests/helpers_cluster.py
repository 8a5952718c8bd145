"""A real cluster on one machine for tests: S3 (moto), an MLflow server, a two-node Ray.

Import it from a test as ``from helpers_cluster import ...`` (pytest puts ``tests/`` on
``sys.path``, as for ``helpers_data``).

Every server runs as a subprocess in its own session, with a private marker variable
(``VITOK_HARNESS_TAG``) in its environment. ``stop()`` signals the process group it started
and then kills every process still carrying its marker (Ray workers, job drivers, uvicorn
workers inherit it), so nothing is matched by name and nothing else on the machine (another
test's Ray, the session's ``ray_local``) is touched. Never ``ray stop``.

S3 endpoint: every client reaches moto through environment variables alone
(``S3Server.env``), checked with pyarrow 25, boto3 1.44, Ray 2.60 and MLflow 3.17:

- pyarrow (``pyarrow.fs.FileSystem.from_uri("s3://bucket/x")``, hence Ray Train's
  ``storage_path`` and Ray Data): ``AWS_ENDPOINT_URL`` plus the credentials and
  ``AWS_DEFAULT_REGION``. No ``?endpoint_override=...&scheme=http`` in the URI is needed
  (that also works, for a pyarrow older than 15 which ignores ``AWS_ENDPOINT_URL``).
- boto3 / botocore: ``AWS_ENDPOINT_URL`` (plus credentials, region).
- MLflow: the *server* writes artifacts (``--serve-artifacts``) with boto3 and reads
  ``MLFLOW_S3_ENDPOINT_URL``; clients only need ``MLFLOW_TRACKING_URI`` (artifacts go
  through the server's ``mlflow-artifacts:/`` proxy).
- ``AWS_EC2_METADATA_DISABLED=true`` stops botocore/the AWS SDK from probing
  169.254.169.254 for credentials (seconds of timeouts otherwise).

The Ray worker node runs in its own mount namespace::

    unshare -m --propagation private -- sh -c '<mount a tmpfs on each private dir>; exec "$@"'
        sh <n> <dir>... ray start --address=127.0.0.1:<gcs> --block ...

so a file a task writes under a private dir on the worker node is invisible to the head and
to the test process (and the reverse). ``TwoNodeRay.worker_path(p)`` reads a path as the
worker node sees it (``/proc/<pid>/root/<p>``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 300.0
TAG_VAR = "VITOK_HARNESS_TAG"  # the marker every harness process carries in its environment


# ----------------------------------------------------------------------------- basics
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as err:
        return f"<{path}: {err}>"


def wait_for(
    ready: Callable[[], object], what: str, timeout: float, diag: Callable[[], str]
) -> object:
    """Poll ``ready()`` until it returns a truthy value; raise with ``diag()`` on timeout.

    ``ready`` may raise ``RuntimeError`` to stop early (a process that exited)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = ready()
            if value:
                return value
        except RuntimeError:
            raise
        except Exception as err:  # not up yet
            last = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({last!r})\n{diag()}")
        time.sleep(0.5)


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment, minus anything that would attach to another Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    for key in ("RAY_AUTH_TOKEN_PATH", "PYTEST_CURRENT_TEST", TAG_VAR):
        env.pop(key, None)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        # A job's `python` is the one with the project installed (the image's, on a cluster).
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
    )
    env.update(extra)
    return env


def popen(cmd: list[str], env: dict[str, str], log: Path, tag: str, **kw) -> subprocess.Popen:
    """``cmd`` in its own session (its group id is its pid), output to ``log``, tagged."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env={**env, TAG_VAR: tag},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )


def tagged(tag: str) -> list:
    """Live processes whose environment carries ``TAG_VAR=tag``."""
    import psutil

    found, needle = [], f"\0{TAG_VAR}={tag}\0".encode()
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in b"\0" + f.read() + b"\0":
                    found.append(p)
        except OSError:
            pass
    return found


def kill_tree(
    proc: subprocess.Popen | None, tag: str | None, *, grace: float = 20.0, term: bool = True
) -> None:
    """End ``proc``'s process group (SIGTERM, then SIGKILL after ``grace``), then SIGKILL
    whatever still carries ``tag``. Idempotent."""
    import psutil

    if proc is not None:
        if proc.poll() is None and term:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group may outlive its leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    if tag is None:
        return
    for _ in range(5):
        left = tagged(tag)
        if not left:
            return
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.kill()
        psutil.wait_procs(left, timeout=10)
    raise RuntimeError(f"processes tagged {tag} survive SIGKILL: {[p.pid for p in left]}")


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status != 200:
            raise OSError(f"{url}: HTTP {resp.status}")
        return resp.read()


# ----------------------------------------------------------------------------- S3 (moto)
class S3Server:
    """``moto_server`` on 127.0.0.1 (in-memory S3; its state dies with the process)."""

    ACCESS_KEY = "vitok-test-key"
    SECRET_KEY = "vitok-test-secret"
    REGION = "us-east-1"

    def __init__(self, workdir: Path, *, timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.workdir / "moto.log"
        self.tag = f"s3-{uuid.uuid4().hex[:12]}"
        cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc: subprocess.Popen | None = popen(cmd, base_env(), self.log, self.tag)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {self.proc.returncode}\n{tail(self.log)}")
            return bool(http_ok(f"{self.endpoint}/moto-api/"))

        try:
            wait_for(ready, "moto_server", timeout, lambda: tail(self.log))
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What every client of this S3 needs (boto3, pyarrow, Ray, MLflow server)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def stop(self) -> None:
        kill_tree(self.proc, self.tag, grace=10)


# ----------------------------------------------------------------------------- MLflow
class MlflowServer:
    """``mlflow server`` with a SQLite store in ``workdir`` and artifacts proxied to S3.

    ``stop()`` then ``start()`` brings it back on the same port and the same database."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        artifacts_destination: str,
        *,
        timeout: float = 120.0,
        start: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = base_env(**env)
        self.artifacts_destination = artifacts_destination
        self.timeout = timeout
        self.port = free_port()
        self.db = self.workdir / "mlflow.db"
        self.log = self.workdir / "mlflow.log"
        self.tag = f"mlflow-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.db}", "--workers", "1"]
        cmd += ["--artifacts-destination", self.artifacts_destination, "--serve-artifacts"]
        self.proc = popen(cmd, self.env, self.log, self.tag, cwd=self.workdir)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}\n{tail(self.log)}")
            return http_ok(f"{self.uri}/health").strip() == b"OK"

        try:
            wait_for(ready, "mlflow server", self.timeout, lambda: tail(self.log))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        kill_tree(self.proc, self.tag, grace=15)
        self.proc = None


# ----------------------------------------------------------------------------- Ray
def ray_ports(head: bool) -> dict[str, int]:
    ports = {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    if head:
        ports.update(
            {
                "--port": free_port(),
                "--dashboard-port": free_port(),
                "--ray-client-server-port": free_port(),
            }
        )
    return ports


def ray_logs_tail(temp_dir: Path, names=("raylet.out", "gcs_server.out", "dashboard.log")) -> str:
    logs = temp_dir / "session_latest" / "logs"
    parts = [f"--- {temp_dir}/ray_start.log\n{tail(temp_dir / 'ray_start.log')}"]
    parts += [f"--- {logs / n}\n{tail(logs / n, 2000)}" for n in names if (logs / n).exists()]
    return "\n".join(parts)


class LocalHead:
    """A Ray head started with ``ray start --head --block``; ``stop`` ends only its processes."""

    def __init__(
        self,
        temp_dir: Path,
        env: dict[str, str],
        *,
        num_cpus: float = 2,
        resources: dict[str, float] | None = None,
    ) -> None:
        self.temp_dir = Path(temp_dir)
        self.ports = ray_ports(head=True)
        self.dashboard_port = self.ports["--dashboard-port"]
        self.gcs_port = self.ports["--port"]
        self.tag = f"rayhead-{uuid.uuid4().hex[:12]}"
        # (From test_cluster.py, about num_cpus:) 3 logical CPUs on 2 cores: a trial's driver
        # holds a fraction of one, so with 2 a 1-CPU Ray Data read next to the 1-CPU Train
        # worker never gets scheduled.
        cmd = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0"]
        # Ray rewrites a loopback --node-ip-address to the machine's IP (services.
        # resolve_ip_for_localhost): both nodes register that IP, so `node:<ip>` resources do
        # not tell them apart (use node ids or custom resources). Only the dashboard stays
        # on 127.0.0.1.
        cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
        cmd += [f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        # Worker ports from the OS: two raylets on one host would hand out the same ports
        # from the default range 10002-19999.
        cmd += ["--min-worker-port=0", "--max-worker-port=0"]
        if resources:
            cmd += [f"--resources={json.dumps(resources)}"]
        cmd += [f"{k}={v}" for k, v in self.ports.items()]
        # Own session: the group id is this pid, so stop() signals exactly these processes.
        self.proc = popen(cmd, env, self.temp_dir / "ray_start.log", self.tag)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def logs(self) -> str:
        return ray_logs_tail(self.temp_dir)

    def stop(self) -> None:
        import psutil

        # ray start's SIGTERM handler stops its children; then whatever carries the tag.
        kill_tree(self.proc, self.tag, grace=60)
        # Anything of this head still alive (workers, job drivers): its temp dir is in argv.
        mine = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mine in arg for arg in p.info["cmdline"] or []):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def connect(head: LocalHead, headers: dict[str, str], timeout: float = 90.0):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {head.logs()}")
        try:
            return JobSubmissionClient(head.address, headers=headers)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def retry(call, what: str, timeout: float = 90.0):
    """``call()``, retried while the head is still coming up (its job agent registers late,
    and the dashboard may drop a connection meanwhile)."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (RuntimeError, requests.exceptions.ConnectionError) as err:
            transient = isinstance(err, requests.exceptions.ConnectionError) or (
                "No available agent" in str(err)
            )
            if not transient or time.monotonic() > deadline:
                raise AssertionError(f"{what}: {err}") from err
            time.sleep(2.0)


def run_job(
    client,
    entrypoint: str,
    working_dir: Path,
    *,
    timeout: float = JOB_TIMEOUT_S,
    env_vars: dict[str, str] | None = None,
) -> str:
    """Submit as ``ray job submit --working-dir <dir> -- <entrypoint>``; return its logs.

    Fails the test (with the job's log tail) unless the job succeeds within ``timeout``."""
    import pytest
    from ray.job_submission import JobStatus

    runtime_env: dict = {"working_dir": str(working_dir)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    job_id = retry(
        lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env),
        f"submit {entrypoint}",
    )
    deadline = time.monotonic() + timeout
    while not (status := retry(lambda: client.get_job_status(job_id), "status")).is_terminal():
        if time.monotonic() > deadline:
            logs = client.get_job_logs(job_id)
            client.stop_job(job_id)
            pytest.fail(f"{entrypoint} still {status} after {timeout}s\n{logs[-6000:]}")
        time.sleep(2.0)
    logs = retry(lambda: client.get_job_logs(job_id), "logs")
    assert status == JobStatus.SUCCEEDED, f"{entrypoint}: {status}\n{logs[-6000:]}"
    return logs


# Mount a tmpfs on each of the first $1 arguments, then exec the rest (`ray start ...`).
_NAMESPACE_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do '
    'mkdir -p "$1" && mount -t tmpfs -o mode=1777,size=512m vitok-private "$1" '
    '|| { echo "cannot mount a tmpfs on $1" >&2; exit 97; }; shift; n=$((n-1)); done; '
    'exec "$@"'
)


def namespace_command(private_dirs: list[Path], cmd: list[str]) -> list[str]:
    """``cmd`` in a new private mount namespace with a fresh tmpfs over each private dir."""
    dirs = [str(Path(d).resolve()) for d in private_dirs]
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _NAMESPACE_SCRIPT, "sh", str(len(dirs)), *dirs, *cmd,
    ]  # fmt: skip


def can_unshare_mounts() -> bool:
    """Whether this user may create a mount namespace and mount a tmpfs (root, usually)."""
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp(prefix="vk-ns-")
    try:
        out = subprocess.run(
            namespace_command([Path(probe)], ["true"]), capture_output=True, timeout=30
        )
        return out.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        os.rmdir(probe)


@dataclass
class _WorkerNode:
    temp_dir: Path
    proc: subprocess.Popen
    tag: str


class TwoNodeRay:
    """A Ray head (``head_cpus``) and one worker node (``worker_cpus``, ``worker_resources``)
    on 127.0.0.1, token auth on, the worker in its own mount namespace with a private tmpfs
    over each of ``private_dirs``. Construction waits until both nodes are alive."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        *,
        head_cpus: float = 1,
        worker_cpus: float = 2,
        worker_resources: dict[str, float],
        private_dirs: list[Path],
        timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.worker_cpus = worker_cpus
        self.worker_resources = dict(worker_resources)
        self.private_dirs = [Path(d).resolve() for d in private_dirs]
        for d in self.private_dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.token = uuid.uuid4().hex
        self.env = base_env(**env)
        self.env.update(
            # Head, worker node, their job drivers and workers all inherit these.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop() tears down at once
            TORCH_EXTENSIONS_DIR=os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
            ),
        )
        # Short paths: Ray's unix sockets live under --temp-dir (108-byte limit).
        self._temp_dirs: list[Path] = []
        self.tags: list[str] = []  # of the head and every worker node started
        self.head: LocalHead | None = None
        self.worker: _WorkerNode | None = None
        self.worker_node_id: str | None = None
        self._past_worker_ids: set[str] = set()  # a restarted node must get a new id
        try:
            self.head = LocalHead(self._new_temp("vk-rayh-"), self.env, num_cpus=head_cpus)
            self.tags.append(self.head.tag)
            self._wait_nodes(expect_worker=False)
            self.restart_worker()
        except BaseException:
            self.stop()
            raise

    # -- public
    @property
    def address(self) -> str:
        """The dashboard URL (Jobs API, state API)."""
        return self.head.address

    @property
    def gcs_address(self) -> str:
        return self.head.gcs_address

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self):
        """A ``JobSubmissionClient`` for the head."""
        return connect(self.head, self.headers, timeout=self.timeout)

    def nodes(self) -> list[dict]:
        """The cluster's nodes from the state API (``ray list nodes``), dead ones included."""
        raw = http_ok(f"{self.address}/api/v0/nodes?limit=1000&detail=1", self.headers, 30)
        body = json.loads(raw)
        if not body.get("result", True):
            raise OSError(body.get("msg"))
        return body["data"]["result"]["result"]

    def worker_path(self, path: Path | str) -> Path:
        """``path`` as the worker node sees it (inside its mount namespace)."""
        assert self.worker is not None and self.worker.proc.poll() is None, "no worker node"
        return Path(f"/proc/{self.worker.proc.pid}/root") / Path(path).resolve().relative_to("/")

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet (only that process); return its pid."""
        import psutil

        assert self.worker is not None
        raylets = [
            p
            for p in psutil.Process(self.worker.proc.pid).children(recursive=True)
            if p.name() == "raylet"
        ]
        assert len(raylets) == 1, f"worker raylets: {raylets}"
        raylets[0].send_signal(signal.SIGKILL)
        raylets[0].wait(timeout=30)
        return raylets[0].pid

    def restart_worker(self) -> str:
        """(Re)start the worker node in a fresh namespace; return its new node id."""
        self._stop_worker()
        temp_dir = self._new_temp("vk-rayw-")
        tag = f"raywork-{uuid.uuid4().hex[:12]}"
        self.tags.append(tag)
        cmd = [RAY, "start", f"--address={self.gcs_address}", "--block"]
        cmd += [f"--num-cpus={self.worker_cpus}", "--num-gpus=0"]
        cmd += [f"--resources={json.dumps(self.worker_resources)}"]
        cmd += ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        cmd += ["--min-worker-port=0", "--max-worker-port=0"]
        cmd += [f"{k}={v}" for k, v in ray_ports(head=False).items()]
        proc = popen(
            namespace_command(self.private_dirs, cmd), self.env, temp_dir / "ray_start.log", tag
        )
        self.worker = _WorkerNode(temp_dir, proc, tag)
        self.worker_node_id = self._wait_nodes(expect_worker=True)
        self._past_worker_ids.add(self.worker_node_id)
        return self.worker_node_id

    def wait_node_dead(self, node_id: str, timeout: float = 120.0) -> None:
        """Wait until the head has marked ``node_id`` DEAD (after ``kill_worker_raylet``)."""

        def dead() -> bool:
            return any(n["node_id"] == node_id and n["state"] == "DEAD" for n in self.nodes())

        wait_for(dead, f"node {node_id} marked DEAD", timeout, self.logs)

    def logs(self) -> str:
        parts = [f"=== head\n{self.head.logs()}" if self.head else ""]
        if self.worker:
            parts.append(f"=== worker node\n{ray_logs_tail(self.worker.temp_dir)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """End every process of both nodes (by group and tag) and remove the temp dirs."""
        errors = []
        for step in (self._stop_worker, self.head.stop if self.head else None):
            if step is None:
                continue
            try:
                step()
            except Exception as err:  # keep cleaning up
                errors.append(err)
        for d in self._temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if errors:
            raise errors[0]

    # -- internal
    def _new_temp(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self._temp_dirs.append(path)
        return path

    def _stop_worker(self) -> None:
        if self.worker is not None:
            kill_tree(self.worker.proc, self.worker.tag, grace=30)
            # The tmpfs mounts go with the namespace's last process.

    def _wait_nodes(self, expect_worker: bool) -> str:
        def ready() -> str | None:
            if self.head.proc.poll() is not None:
                raise RuntimeError(f"ray head exited {self.head.proc.returncode}\n{self.logs()}")
            if expect_worker and self.worker.proc.poll() is not None:
                raise RuntimeError(
                    f"ray worker node exited {self.worker.proc.returncode}\n{self.logs()}"
                )
            alive = [n for n in self.nodes() if n["state"] == "ALIVE"]
            heads = [n for n in alive if n["is_head_node"]]
            workers = [
                n
                for n in alive
                if not n["is_head_node"] and n["node_id"] not in self._past_worker_ids
            ]
            if not expect_worker:
                return heads[0]["node_id"] if heads else None
            return workers[0]["node_id"] if heads and len(workers) == 1 else None

        what = "ray worker node" if expect_worker else "ray head"
        return wait_for(ready, what, self.timeout, self.logs)


# ----------------------------------------------------------------------------- the stack
@dataclass
class ClusterStack:
    s3: S3Server
    mlflow: MlflowServer
    ray: TwoNodeRay
    bucket: str
    private_dirs: list[Path]

    @property
    def env(self) -> dict[str, str]:
        """What a client of the stack needs (S3 variables, MLflow URI)."""
        return {**self.s3.env, "MLFLOW_TRACKING_URI": self.mlflow.uri}

    @property
    def tags(self) -> list[str]:
        """The process markers of everything the stack started (see ``tagged``)."""
        return [self.s3.tag, self.mlflow.tag, *self.ray.tags]

    @property
    def temp_dirs(self) -> list[Path]:
        return list(self.ray._temp_dirs)


@contextlib.contextmanager
def cluster_stack(
    workdir: Path,
    *,
    bucket: str = "vitok-test",
    worker_resources: dict[str, float] | None = None,
    private_dirs: list[Path] | None = None,
    head_cpus: float = 1,
    worker_cpus: float = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[ClusterStack]:
    """S3 (with ``bucket``), MLflow (artifacts in ``s3://bucket/mlflow``), two-node Ray.

    Ray's processes inherit the S3 variables and ``MLFLOW_TRACKING_URI``. Everything is
    stopped on exit, also when starting fails halfway. Default worker resource:
    ``{"worker_node": 1}``; default private dir: ``<workdir>/node-local``. ``extra_env`` goes
    to every Ray process (both nodes)."""
    workdir = Path(workdir)
    private_dirs = private_dirs or [workdir / "node-local"]
    stops: list[Callable[[], None]] = []
    try:
        s3 = S3Server(workdir / "s3")
        stops.append(s3.stop)
        s3.make_bucket(bucket)
        mlflow = MlflowServer(workdir / "mlflow", s3.env, f"s3://{bucket}/mlflow")
        stops.append(mlflow.stop)
        ray = TwoNodeRay(
            workdir / "ray",
            {**s3.env, "MLFLOW_TRACKING_URI": mlflow.uri, **(extra_env or {})},
            head_cpus=head_cpus,
            worker_cpus=worker_cpus,
            worker_resources=worker_resources or {"worker_node": 1},
            private_dirs=private_dirs,
        )
        stops.append(ray.stop)
        yield ClusterStack(s3, mlflow, ray, bucket, ray.private_dirs)
    finally:
        errors = []
        for stop in reversed(stops):
            try:
                stop()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


def copy_repo(dest: Path) -> Path:
    """The repo's tracked and untracked-but-not-ignored files (what a working_dir ships)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest
