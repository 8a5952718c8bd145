"""cluster.yaml against Ray's own schema, shipped code on workers, and a real job submission.

The slow test starts its own Ray head with ``ray start --head --block`` on loopback (free
ports, a private --temp-dir, token auth with a private token), talks to it only over HTTP
through the Jobs API, and stops it by signalling the process group it started: never
``ray stop``, which would kill every Ray on the machine (the session's ``ray_local`` too).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
# The study a cluster runs, submitted exactly as README "Run on a cluster" shows (the preset
# changes). Switch to pipelines/scaling_study.py here once it exists.
STUDY_ENTRYPOINT = "python pipelines/scaling_study.py --preset smoke"
# The same submission on the CLI, as README shows it.
README_SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . --"
JOB_TIMEOUT_S = 300.0


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


# ----------------------------------------------------------------------------- cluster.yaml
def test_cluster_yaml_matches_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_cluster())
    validate_config(config)  # raises jsonschema.ValidationError on a bad field
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}
    assert any(t["node_config"]["InstanceType"] == "p5.48xlarge" for t in gpu_types.values())
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]


def ray_default_inbound_rules(extra: list[dict]) -> list[dict]:
    """The ingress rules Ray's AWS provider creates for a cluster: its defaults plus ``extra``.

    Ray's own functions; without boto3 (not a dependency) they are taken from its source.
    """
    try:
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules
    except ImportError:
        import ast
        import importlib.util
        import itertools

        ray_dir = Path(importlib.util.find_spec("ray").origin).parent
        tree = ast.parse((ray_dir / "autoscaler/_private/aws/config.py").read_text())
        wanted = {
            "_create_default_inbound_rules",
            "_create_default_intracluster_inbound_rules",
            "_create_default_ssh_inbound_rules",
        }
        defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
        assert {d.name for d in defs} == wanted, "Ray moved its security-group defaults"
        namespace: dict = {"itertools": itertools}
        exec(compile(ast.Module(body=defs, type_ignores=[]), "ray-aws-config", "exec"), namespace)
        _create_default_inbound_rules = namespace["_create_default_inbound_rules"]
    return _create_default_inbound_rules(["sg-cluster"], extra)


def test_cluster_opens_only_ssh_to_the_world():
    config = load_cluster()
    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = ray_default_inbound_rules(extra)
    world = [
        r
        for r in rules
        if any(ip.get("CidrIp") == "0.0.0.0/0" for ip in r.get("IpRanges", []))
        or any(ip.get("CidrIpv6") == "::/0" for ip in r.get("Ipv6Ranges", []))
    ]
    assert world, "expected Ray's SSH rule"
    for rule in world:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
    # A node type with its own security groups or interfaces would bypass the group above.
    for name, node_type in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], name
        assert "NetworkInterfaces" not in node_type["node_config"], name
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start


def test_cluster_image_matches_installed_ray():
    import ray

    image = load_cluster()["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_cluster_installs_project_and_serves_mlflow():
    config = load_cluster()
    mounts = config["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    assert any(f"pip install --quiet -e {remote}" in c for c in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]  # no .venv or mlflow.db goes up
    head = "\n".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "--serve-artifacts" in head
    assert re.search(r"--backend-store-uri \$\{VITOK_MLFLOW_BACKEND_URI:-sqlite:////", head)
    # Jobs inherit the tracking URI and auth mode from `ray start`; workers use the same auth.
    start_head = config["head_start_ray_commands"][-1]
    assert start_head.index("MLFLOW_TRACKING_URI=") < start_head.index("ray start")
    for cmd in (start_head, config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd
    assert "/home/ray/.ray/auth_token" in mounts


def test_readme_documents_the_cluster_commands():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run on a cluster") :]
    for needle in (
        "ray up cluster.yaml",
        "8265",
        "5000",
        README_SUBMIT,
        "pipelines/scaling_study.py --preset paper-video-ucf --data /data/UCF-101",
        "ray job logs",
        "ray down cluster.yaml",
    ):
        assert needle in section, needle


# ----------------------------------------------------------------------------- shipped code
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


def run_python(code: str, cwd: Path, pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [PY, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_shipped_copy_wins_over_installed(tmp_path: Path):
    copy = copy_repo(tmp_path / "repo")
    with (copy / "platform" / "sources.py").open("a") as f:
        f.write("\nSHIPPED_EDIT = True\n")
    code = (
        "from vitok.platform.runtime import use_shipped_code\n"
        "print('ROOT', use_shipped_code())\n"
        "import vitok.platform.sources as s\n"
        "print('FILE', s.__file__, getattr(s, 'SHIPPED_EDIT', False))\n"
    )
    shipped = run_python(code, tmp_path, pythonpath=copy)
    assert shipped.returncode == 0, shipped.stderr
    assert f"ROOT {copy.resolve()}" in shipped.stdout
    assert f"FILE {copy.resolve() / 'platform' / 'sources.py'} True" in shipped.stdout
    # No repo on PYTHONPATH (a plain local run): the installed copy, untouched.
    local = run_python(code, tmp_path, pythonpath=None)
    assert local.returncode == 0, local.stderr
    assert "ROOT None" in local.stdout and "False" in local.stdout


def test_shipped_code_refuses_after_stale_import(tmp_path: Path):
    copy = copy_repo(tmp_path / "repo")
    code = (
        "import vitok.platform.sources\n"
        "from vitok.platform.runtime import use_shipped_code\n"
        "use_shipped_code()\n"
    )
    out = run_python(code, tmp_path, pythonpath=copy)
    assert out.returncode != 0
    assert "vitok.platform.sources" in out.stderr and "before any other vitok import" in out.stderr


def test_code_fingerprint_sees_edits(tmp_path: Path):
    from vitok.platform.runtime import code_fingerprint

    copy = copy_repo(tmp_path / "repo")
    before = code_fingerprint(copy)
    assert before == code_fingerprint(REPO)  # the shipped copy is the code that runs here
    with (copy / "tokenizer" / "config.py").open("a") as f:
        f.write("\n# edit\n")
    assert code_fingerprint(copy) != before


# ----------------------------------------------------------------------------- real cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A Ray head started with ``ray start --head --block``; ``stop`` ends only its processes."""

    def __init__(self, temp_dir: Path, env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.dashboard_port = free_port()
        self.log = (temp_dir / "ray_start.log").open("w")
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        # 3 logical CPUs on 2 cores: a trial's driver holds a fraction of one, so with 2 a
        # 1-CPU Ray Data read next to the 1-CPU Train worker never gets scheduled.
        cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0"]
        cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
        cmd += [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        cmd += [f"{k}={v}" for k, v in ports.items()]
        # Own session: the group id is this pid, so stop() signals exactly these processes.
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        import psutil

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # ray start's handler stops its children
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Anything of this head still alive (workers, job drivers): its temp dir is in argv.
        mine = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mine in arg for arg in p.info["cmdline"] or []):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.log.close()


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[LocalHead, dict[str, str]]]:
    # Short path: Ray's unix sockets live under --temp-dir (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="vk-ray-", dir="/tmp"))
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(
        # Head, its job drivers and workers all inherit these, as on the real cluster.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop() tears down at once
        # A job's `python` is the one with the project installed (the image's, on a cluster).
        PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
    )
    head = LocalHead(temp_dir, env)
    try:
        yield head, {"Authorization": f"Bearer {token}"}
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def connect(head: LocalHead, headers: dict[str, str], timeout: float = 90.0):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {(head.temp_dir / 'ray_start.log').read_text()}")
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


def run_job(client, entrypoint: str, working_dir: Path) -> str:
    """Submit as ``ray job submit --working-dir <dir> -- <entrypoint>``; return its logs."""
    from ray.job_submission import JobStatus

    job_id = retry(
        lambda: client.submit_job(
            entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir)}
        ),
        f"submit {entrypoint}",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := retry(lambda: client.get_job_status(job_id), "status")).is_terminal():
        if time.monotonic() > deadline:
            logs = client.get_job_logs(job_id)
            client.stop_job(job_id)
            pytest.fail(f"{entrypoint} still {status} after {JOB_TIMEOUT_S}s\n{logs[-6000:]}")
        time.sleep(2.0)
    logs = retry(lambda: client.get_job_logs(job_id), "logs")
    assert status == JobStatus.SUCCEEDED, f"{entrypoint}: {status}\n{logs[-6000:]}"
    return logs


@pytest.mark.slow
def test_job_submission_runs_study_and_then_edited_code(ray_head, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from vitok.platform.runtime import code_fingerprint

    head, headers = ray_head
    work = copy_repo(tmp_path / "work")  # the folder a user runs `ray job submit` in
    client = connect(head, headers)
    # Token auth is on (RAY_AUTH_MODE=token, as on the cluster): no token, no jobs API.
    import requests

    assert requests.get(f"{head.address}/api/jobs/", timeout=30).status_code == 401

    # 1. The smoke study, tracked through the MLFLOW_TRACKING_URI the head exported.
    run_job(client, STUDY_ENTRYPOINT, work)
    tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = tracking.search_experiments()
    runs = tracking.search_runs([e.experiment_id for e in experiments])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished, [(r.info.run_name, r.info.status) for r in runs]
    assert any(r.data.metrics for r in finished)
    assert any(r.data.params for r in finished)

    # 2. Edit the code, submit again: driver and worker run the edit, not the installed copy.
    marker = f"VITOK_EDIT_{uuid.uuid4().hex[:8]}"
    with (work / "tokenizer" / "config.py").open("a") as f:
        f.write(f"\nprint({marker!r}, flush=True)\n")
    logs = run_job(
        client, "python pipelines/cluster_check.py --import vitok.tokenizer.config", work
    )
    lines = logs.splitlines()
    assert any(line.startswith(marker) for line in lines), logs  # driver
    assert any(marker in line and "pid=" in line for line in lines), logs  # a Ray worker
    assert f"code={code_fingerprint(work)} ok" in logs, logs
    assert "code check passed" in logs
    assert str(REPO) not in re.findall(r"root=(\S+)", logs)

    # 3. Control: without use_shipped_code the editable install would win (a stale copy).
    probe = "python -c \"import vitok.tokenizer.config as c; print('ORIGIN', c.__file__)\""
    logs = run_job(client, probe, work)
    assert f"ORIGIN {REPO / 'tokenizer' / 'config.py'}" in logs
    assert marker not in logs
