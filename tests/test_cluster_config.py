"""platform/study/cluster.py (what an autoscaling cluster can ever provide) and cluster.yaml's
shell.

Fast: no Ray is started. The autoscaler is faked by monkeypatching
``ray.autoscaler.sdk.request_resources`` and ``ray.cluster_resources``; the node types come
from cluster.yaml itself, from a bootstrap config written to tmp_path, and from a real
``ClusterConfig`` protobuf as the GCS would hold it. cluster.yaml's commands are checked
with ``bash -n`` and, where they only touch files, run in a temporary home. The slow test
runs the head's MLflow command for real (basic-auth, supervisor loop) on 127.0.0.1.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import ray
import yaml

from vitok.platform.study import cluster

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
BASH = shutil.which("bash")


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """No env var, no GCS config, an empty home: nothing says there is an autoscaler."""
    monkeypatch.delenv(cluster.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cluster, "_node_types_from_gcs", lambda: None)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


# ----------------------------------------------------------------------------- node types
def test_node_types_of_cluster_yaml():
    types = cluster.autoscaler_node_types(str(CLUSTER_YAML))
    assert types is not None
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu["gpu-8xh100"] == {
        "resources": {"CPU": 192.0, "GPU": 8.0},
        "min_workers": 0,
        "max_workers": 2,
        "head": False,
    }
    assert gpu["gpu-1x"]["resources"] == {"CPU": 4.0, "GPU": 1.0}
    assert gpu["gpu-1x"]["max_workers"] == 4
    head = types[load_cluster()["head_node_type"]]
    assert head["head"] and head["max_workers"] == 0 and "GPU" not in head["resources"]


BOOTSTRAP = {
    # What `ray up` writes to ~/ray_bootstrap_config.yaml: resources filled in, bounds set.
    "cluster_name": "fake",
    "max_workers": 3,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 8}, "node_config": {}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 16, "GPU": 2, "memory": 1e11}, "max_workers": 5},
        "cpu": {"resources": {"CPU": 32}, "min_workers": 1},  # bound: the global 3
        "off": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 0},
    },
}


def test_node_types_from_the_bootstrap_config(no_sources, monkeypatch, tmp_path):
    # The default location on the head, found without being told.
    (no_sources / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(BOOTSTRAP))
    types = cluster.autoscaler_node_types()
    assert set(types) == {"head", "gpu", "cpu", "off"}
    assert types["gpu"]["max_workers"] == 3  # capped by the global max_workers
    assert types["cpu"] == {
        "resources": {"CPU": 32.0},
        "min_workers": 1,
        "max_workers": 3,
        "head": False,
    }
    # The env var wins over the default location.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**BOOTSTRAP, "available_node_types": {"x": {}}}))
    monkeypatch.setenv(cluster.ENV_VAR, str(other))
    assert set(cluster.autoscaler_node_types()) == {"x"}


def test_no_autoscaler_means_none(no_sources, tmp_path):
    assert cluster.autoscaler_node_types() is None
    assert cluster.autoscaler_node_types(str(tmp_path / "missing.yaml")) is None
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(yaml.safe_dump({"cluster_name": "x", "max_workers": 2}))
    assert cluster.autoscaler_node_types(str(legacy)) is None


def test_node_types_from_the_gcs(monkeypatch, tmp_path):
    """The GCS's ClusterConfig (as KubeRay reports it) comes before the default file."""
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.min_count, group.max_count = "gpu-group", 0, 4
    group.resources["GPU"], group.resources["CPU"] = 8, 96
    unbounded = config.node_group_configs.add()
    unbounded.name, unbounded.max_count = "cpu-group", -1
    unbounded.resources["CPU"] = 16
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(BOOTSTRAP))
    monkeypatch.delenv(cluster.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    types = cluster.autoscaler_node_types()
    assert types["gpu-group"] == {
        "resources": {"GPU": 8.0, "CPU": 96.0},
        "min_workers": 0,
        "max_workers": 4,
        "head": False,
    }
    assert types["cpu-group"]["max_workers"] == math.inf
    assert cluster.max_bundles({"CPU": 1}, types) == math.inf
    # An empty GCS config (a `ray up` cluster): the bootstrap file answers.
    monkeypatch.setattr(state, "get_cluster_config", lambda: autoscaler_pb2.ClusterConfig())
    assert "gpu" in cluster.autoscaler_node_types()
    # The GCS unreachable (a private API that changed, say): the file answers too.
    monkeypatch.setattr(state, "get_cluster_config", lambda: 1 / 0)
    assert "gpu" in cluster.autoscaler_node_types()


# ----------------------------------------------------------------------------- fitting
def test_fitting_against_cluster_yaml():
    types = cluster.autoscaler_node_types(str(CLUSTER_YAML))
    per_node = cluster.max_resources_per_node(types)
    assert {"CPU": 192.0, "GPU": 8.0} in per_node and {"CPU": 4.0, "GPU": 1.0} in per_node
    head_up = [{"CPU": 8.0, "memory": 2.0e10}]  # a fresh cluster: only the CPU head is up
    assert cluster.can_ever_fit({"GPU": 1, "CPU": 8}, types, head_up)
    assert cluster.can_ever_fit({"GPU": 8, "CPU": 100}, types, head_up)
    assert not cluster.can_ever_fit({"GPU": 16}, types, head_up)
    assert not cluster.can_ever_fit({"GPU": 1, "CPU": 200}, types, head_up)
    assert not cluster.can_ever_fit({"TPU": 1}, types, head_up)
    assert cluster.can_ever_fit({"CPU": 0.01}, types, head_up)
    # One trial's 8 workers: p5 nodes only when a worker wants 8 CPUs (a g6.xlarge has 4).
    assert cluster.max_bundles({"GPU": 1, "CPU": 8}, types, head_up) == 16
    assert cluster.max_bundles({"GPU": 1, "CPU": 4}, types, head_up) == 2 * 8 + 4 * 1
    assert cluster.max_bundles({"GPU": 16}, types, head_up) == 0


def test_fitting_without_an_autoscaler():
    laptop = [{"CPU": 2.0, "memory": 4.0e9}]
    assert cluster.max_resources_per_node(None) == []
    assert not cluster.can_ever_fit({"GPU": 1}, None, laptop)
    assert cluster.can_ever_fit({"CPU": 1}, None, laptop)
    assert cluster.max_bundles({"CPU": 1}, None, laptop) == 2
    fixed = [{"CPU": 64.0, "GPU": 4.0}, {"CPU": 64.0, "GPU": 4.0}]
    assert cluster.can_ever_fit({"GPU": 4, "CPU": 8}, None, fixed)
    assert cluster.max_bundles({"GPU": 1, "CPU": 8}, None, fixed) == 8


def test_types_that_can_never_start_do_not_count():
    types = cluster.node_types_from_config(BOOTSTRAP)
    per_node = cluster.max_resources_per_node(types)
    assert {"CPU": 64.0, "GPU": 8.0} not in per_node  # "off": max_workers 0
    assert {"CPU": 8.0} in per_node  # the head always is
    assert not cluster.can_ever_fit({"GPU": 8}, types, [])
    assert cluster.can_ever_fit({"GPU": 2}, types, [])


def test_describe_bundles():
    assert cluster.describe_bundles([{"CPU": 8, "GPU": 1}] * 8) == "8 x {GPU: 1, CPU: 8}"
    mixed = [{"GPU": 1, "CPU": 8}, {"CPU": 0.5}, {"GPU": 1, "CPU": 8}]
    assert cluster.describe_bundles(mixed) == "2 x {GPU: 1, CPU: 8} + 1 x {CPU: 0.5}"


# ----------------------------------------------------------------------------- autoscaler
class FakeAutoscaler:
    """request_resources and cluster_resources; GPUs come up after ``after`` polls."""

    def __init__(self, monkeypatch, *, after: int | None, gpus: float = 8, fail_at=None):
        # after: the poll after which everything is up (None: never); the first poll is
        # request_and_wait's own look before it asks for anything.
        self.requests: list[list[dict]] = []
        self.polls = 0
        self.after, self.gpus, self.fail_at = after, gpus, fail_at
        monkeypatch.setattr("ray.autoscaler.sdk.request_resources", self.request)
        monkeypatch.setattr(ray, "cluster_resources", self.resources)

    def request(self, num_cpus=None, bundles=None, bundle_label_selectors=None):
        assert num_cpus is None
        self.requests.append(list(bundles))

    def resources(self) -> dict[str, float]:
        self.polls += 1
        if self.fail_at is not None and self.polls >= self.fail_at:
            raise ConnectionError("GCS went away")
        if self.after is not None and self.polls > self.after:
            return {"CPU": 8.0 + 192.0, "GPU": self.gpus}
        # The first look: only the CPU head; then one small GPU node that is not enough.
        return {"CPU": 8.0 + 16.0, "GPU": 2.0} if self.polls > 1 else {"CPU": 8.0}


BUNDLES = [{"GPU": 1, "CPU": 8}] * 8


def test_request_and_wait_until_the_gpus_come(monkeypatch):
    fake = FakeAutoscaler(monkeypatch, after=3)
    lines: list[str] = []
    assert cluster.request_and_wait(BUNDLES, timeout_s=30, poll_s=0.01, log=lines.append)
    assert fake.requests[0] == [{"GPU": 1.0, "CPU": 8.0}] * 8
    assert fake.requests[-1] == []  # withdrawn: idle nodes may scale down later
    waiting = [line for line in lines if "waiting for the autoscaler" in line]
    assert len(waiting) >= 2
    assert re.fullmatch(
        r"\[vitok\] waiting for the autoscaler: 8 x \{GPU: 1, CPU: 8\} requested, "
        r"\d+ of 8 GPUs, \d+ of 64 CPUs up, \d+ s elapsed \(timeout 30 s\)",
        waiting[0],
    ), waiting[0]
    assert "2 of 8 GPUs" in waiting[-1]
    assert "brought up 8 x {GPU: 1, CPU: 8}" in lines[-1]


def test_request_and_wait_gives_up_at_the_timeout(monkeypatch):
    fake = FakeAutoscaler(monkeypatch, after=None)
    lines: list[str] = []
    t0 = time.monotonic()
    assert not cluster.request_and_wait(BUNDLES, timeout_s=0.2, poll_s=0.05, log=lines.append)
    assert time.monotonic() - t0 < 2.0
    assert fake.requests == [[{"GPU": 1.0, "CPU": 8.0}] * 8, []]
    assert "gave up waiting for the autoscaler" in lines[-1] and "ray status" in lines[-1]
    # A long poll never overshoots the timeout.
    t0 = time.monotonic()
    assert not cluster.request_and_wait(BUNDLES, timeout_s=0.1, poll_s=60, log=lines.append)
    assert time.monotonic() - t0 < 2.0


def test_request_and_wait_when_already_there(monkeypatch):
    fake = FakeAutoscaler(monkeypatch, after=-1)
    lines: list[str] = []
    assert cluster.request_and_wait(BUNDLES, timeout_s=5, poll_s=0.01, log=lines.append)
    assert fake.requests == [] and lines == []


def test_request_and_wait_keep(monkeypatch):
    fake = FakeAutoscaler(monkeypatch, after=1)
    assert cluster.request_and_wait(BUNDLES, 5, poll_s=0.01, log=lambda _: None, keep=True)
    assert fake.requests == [[{"GPU": 1.0, "CPU": 8.0}] * 8]  # still in force
    cluster.release_request()
    assert fake.requests[-1] == []


def test_request_and_wait_withdraws_on_error(monkeypatch):
    fake = FakeAutoscaler(monkeypatch, after=None, fail_at=3)
    with pytest.raises(ConnectionError):
        cluster.request_and_wait(BUNDLES, 5, poll_s=0.01, log=lambda _: None)
    assert fake.requests[-1] == []


def test_request_and_wait_prints_and_flushes(monkeypatch, capsys):
    FakeAutoscaler(monkeypatch, after=2)
    assert cluster.request_and_wait([{"GPU": 4}], 5, poll_s=0.01)
    out = capsys.readouterr().out
    assert "[vitok] waiting for the autoscaler: 1 x {GPU: 4} requested, 2 of 4 GPUs up" in out


def test_cluster_module_imports_no_model_code():
    code = (
        "import sys\n"
        "import vitok.platform.study.cluster\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'mlflow')\n"
        "       or m.startswith(('vitok.tokenizer', 'vitok.generator', 'vitok.pipelines'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------- cluster.yaml
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def cluster_commands() -> list[tuple[str, str]]:
    config = load_cluster()
    return [(key, cmd) for key in COMMAND_LISTS for cmd in config.get(key) or []]


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_every_cluster_command_is_valid_bash():
    for key, cmd in cluster_commands():
        out = subprocess.run([BASH, "-n", "-c", cmd], capture_output=True, text=True)
        assert out.returncode == 0, f"{key}: {cmd}\n{out.stderr}"


def localize(cmd: str, home: Path, port: int = 5000, ip: str = "127.0.0.1") -> str:
    """A cluster.yaml command with the container's paths under ``home`` (and a free port)."""
    swaps = {
        "/home/ray/": f"{home}/",
        "/tmp/vitok-mlflow.pid": f"{home}/vitok-mlflow.pid",
        "--port 5000": f"--port {port}",
        ":5000": f":{port}",
        "import ray.util; print(ray.util.get_node_ip_address())": f"print({ip!r})",
    }
    for old, new in swaps.items():
        cmd = cmd.replace(old, new)
    return cmd


def run_bash(cmd: str, home: Path, **kw) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "VITOK_", "RAY_ADDRESS"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    return subprocess.run([BASH, "-c", cmd], env=env, capture_output=True, text=True, **kw)


def settings_command() -> str:
    setup = load_cluster()["setup_commands"]
    writers = [c for c in setup if "vitok_settings.sh" in c and "printf" in c]
    assert len(writers) == 1, "one command writes the settings"
    return writers[0]


def write_auth(home: Path, user: str = "admin", password: str = "s3cret-Pass") -> None:
    mounts = load_cluster()["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == "~/.vitok")  # the folder
    assert remote.startswith("/home/ray/")
    path = Path(localize(remote, home)) / "mlflow_auth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"MLFLOW_TRACKING_USERNAME={user}\nMLFLOW_TRACKING_PASSWORD={password}\n")


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_settings_reach_every_command(tmp_path):
    """The settings file: the values from cluster.yaml, then the synced login (which wins)."""
    home = tmp_path / "home"
    home.mkdir()
    write_auth(home)
    out = run_bash(localize(settings_command(), home), home)
    assert out.returncode == 0, out.stderr
    probe = (
        f". {home}/vitok_settings.sh; "
        'echo "$VITOK_STORAGE|$VITOK_MLFLOW_BACKEND_URI|$VITOK_MLFLOW_ARTIFACTS|'
        '$MLFLOW_TRACKING_USERNAME|$MLFLOW_TRACKING_PASSWORD"; env | grep -c ^MLFLOW_TRACKING_'
    )
    got = run_bash(probe, home).stdout.split()
    storage, backend, artifacts, user, password = got[0].split("|")
    # (the container's /home/ray is ``home`` here)
    assert storage.startswith("s3://") and backend == f"sqlite:///{home}/mlflow/mlflow.db"
    assert artifacts == f"{home}/mlflow/artifacts"
    assert (user, password) == ("admin", "s3cret-Pass")
    assert got[1] == "2", "the login is exported, so `ray start` hands it to drivers"
    # The head refuses the placeholder bucket, and accepts a real one.
    head_setup = load_cluster()["head_setup_commands"]
    check = next(c for c in head_setup if "VITOK_STORAGE" in c and "exit 1" in c)
    refused = run_bash(localize(check, home), home)
    assert refused.returncode != 0 and "set VITOK_STORAGE" in refused.stderr
    edited = settings_command().replace("s3://my-bucket/vitok", "s3://team-bucket/vitok")
    assert run_bash(localize(edited, home), home).returncode == 0
    assert run_bash(localize(check, home), home).returncode == 0


# ----------------------------------------------------------------------------- MLflow (slow)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def group_members(pgid: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(BASH is None or shutil.which("setsid") is None, reason="needs bash, setsid")
def test_head_mlflow_command_serves_with_auth_and_restarts(tmp_path):
    """The head's MLflow command from cluster.yaml, as is but for paths, port and address."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (the head installs it) is missing")
    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)  # the host volume
    write_auth(home, password="pw-for-the-test")
    port = free_port()
    assert run_bash(localize(settings_command(), home), home).returncode == 0
    head = load_cluster()["head_start_ray_commands"]
    start = localize(next(c for c in head if "mlflow server" in c), home, port)
    pid_file = home / "vitok-mlflow.pid"
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    login = ("admin", "pw-for-the-test")
    supervisors: list[int] = []

    def started() -> int:
        def new_pid() -> bool:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            return bool(text) and int(text) not in supervisors

        assert run_bash(start, home, timeout=60).returncode == 0
        wait_for(new_pid, 10, "the supervisor's pid file")
        supervisors.append(int(pid_file.read_text()))
        return supervisors[-1]

    try:
        started()
        wait_for(lambda: http_status(url, login) == 200, 300, "MLflow with basic-auth")
        assert http_status(url) == 401, "no login, no access"
        assert http_status(url, ("admin", "wrong")) == 401
        assert (home / "mlflow" / "address").read_text().strip() == f"http://127.0.0.1:{port}"
        for name in ("basic_auth.db", "flask_secret", "basic_auth.ini", "server.log"):
            assert (home / "mlflow" / name).exists(), name  # on the host volume
        secret = (home / "mlflow" / "flask_secret").read_text()
        # A client with the login (as a job driver or worker has it) logs a run and an
        # artifact; the artifact goes through the server onto the host volume.
        code = (
            "import mlflow\n"
            "mlflow.set_experiment('cluster-check')\n"
            "with mlflow.start_run():\n"
            "    mlflow.log_metric('x', 1.0)\n"
            "    mlflow.log_text('hello', 'note.txt')\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
            MLFLOW_TRACKING_USERNAME=login[0],
            MLFLOW_TRACKING_PASSWORD=login[1],
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        client = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert client.returncode == 0, client.stderr[-3000:]
        notes = list((home / "mlflow" / "artifacts").rglob("note.txt"))
        assert [n.read_text() for n in notes] == ["hello"]
        env["MLFLOW_TRACKING_PASSWORD"] = "wrong"
        denied = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert denied.returncode != 0

        # A crashed server comes back (the supervisor loop).
        server = [p for p in group_members(supervisors[0]) if p != supervisors[0]]
        assert server, "the server runs in the supervisor's process group"
        for pid in server:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: http_status(url, login) != 200, 10, "the server to go")
        wait_for(lambda: http_status(url, login) == 200, 300, "the server to come back")
        assert "restarting in 5 s" in (home / "mlflow" / "server.log").read_text()

        # `ray up` again: the old supervisor is replaced, the secret and the admin are kept.
        started()
        wait_for(lambda: not group_members(supervisors[0]), 20, "the old supervisor to stop")
        wait_for(lambda: http_status(url, login) == 200, 300, "MLflow after a restart")
        assert (home / "mlflow" / "flask_secret").read_text() == secret
    finally:
        for pgid in supervisors:
            if group_members(pgid):
                os.killpg(pgid, signal.SIGTERM)
        for pgid in supervisors:
            try:
                wait_for(lambda pgid=pgid: not group_members(pgid), 20, "MLflow to stop")
            except AssertionError:
                os.killpg(pgid, signal.SIGKILL)
