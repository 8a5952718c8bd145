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
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers_cluster import LocalHead, connect, copy_repo, run_job

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# The study a cluster runs, submitted exactly as README "Run on a cluster" shows (the preset
# changes). Switch to pipelines/scaling_study.py here once it exists.
STUDY_ENTRYPOINT = "python pipelines/scaling_study.py --preset smoke"
# The same submission on the CLI, as README shows it.
README_SUBMIT = "ray job submit --address http://127.0.0.1:8265 --working-dir . --"


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
    # The settings are in cluster.yaml itself (rsync drops git-ignored files such as the old
    # cluster.env), written on every node and sourced by every later command; the storage
    # root is shared storage; MLflow's login is a synced file mount, read last.
    setup = " ".join(config["setup_commands"])
    settings = "/home/ray/vitok_settings.sh"
    assert f"> {settings}" in setup
    assert "cluster.env" not in yaml.safe_dump(config)
    assert re.search(r"VITOK_STORAGE=s3://\S+/\S+", setup)
    login = next(r for r, local in mounts.items() if local == "~/.vitok") + "/mlflow_auth"
    assert f"set -a; . {login}; set +a" in setup
    # MLflow: kept on a host volume of the head (the container runs with --rm), created by
    # the ssh user before docker would create it root-owned.
    store = "/home/ray/mlflow"
    volumes = [o.split("=", 1)[1] for o in config["docker"]["head_run_options"] if "--volume=" in o]
    host = next(v.split(":")[0] for v in volumes if v.split(":")[1] == store)
    assert any(f"mkdir -p {host}" in c for c in config["initialization_commands"])
    assert re.search(rf"VITOK_MLFLOW_BACKEND_URI=sqlite:///{store}/\S+\.db", setup)
    assert re.search(rf"VITOK_MLFLOW_ARTIFACTS={store}/\S+", setup)
    # ... restarted by a supervisor loop (nohup + its own session, pid file in the container),
    # bound to the head's private address only, with the basic-auth app and its state on the
    # host volume, and its extras installed on the head (auth always, db for a database).
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(r"nohup setsid bash -c 'echo \$\$ > /tmp/\S+\.pid; while true; do", server)
    assert re.search(r"mlflow server .*; echo .*; sleep 5; done'", server)
    assert "--app-name basic-auth" in server and "--serve-artifacts" in server
    assert '--host "$VITOK_HEAD_IP"' in server and "0.0.0.0" not in server
    assert "VITOK_HEAD_IP=$(python -c" in server and "get_node_ip_address()" in server
    assert '--backend-store-uri "$VITOK_MLFLOW_BACKEND_URI"' in server
    assert '--artifacts-destination "$VITOK_MLFLOW_ARTIFACTS"' in server
    assert f"database_uri = sqlite:///{store}/basic_auth.db" in server
    assert f"MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat {store}/flask_secret)" in server
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD" in server
    head_setup = " ".join(config["head_setup_commands"])
    assert "extras=auth;" in head_setup and "extras=auth,db;" in head_setup
    assert "mlflow[$extras]==$(python -c 'import mlflow; print(mlflow.__version__)')" in head_setup
    # Jobs inherit the settings (VITOK_STORAGE, the login), the tracking URI and the auth
    # mode from `ray start`; workers get the same.
    start_head = config["head_start_ray_commands"][-1]
    start_worker = config["worker_start_ray_commands"][-1]
    assert start_head.index("MLFLOW_TRACKING_URI=") < start_head.index("ray start")
    for cmd in (start_head, start_worker):
        assert "RAY_AUTH_MODE=token" in cmd
        assert cmd.index(f". {settings}") < cmd.index("ray start")
    assert "/home/ray/.ray/auth_token" in mounts
    # GPU nodes reach the storage root with an instance profile; no keys in any file.
    for name, node_type in config["available_node_types"].items():
        if node_type.get("resources", {}).get("GPU"):
            assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    assert "AWS_SECRET_ACCESS_KEY" not in (REPO / "cluster.yaml").read_text()


def test_readme_documents_the_cluster_commands():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run on a cluster") :]
    study = "pipelines/scaling_study.py --preset paper-video-ucf --data /data/UCF-101"
    for needle in (
        "ray up cluster.yaml",
        "8265",
        "5000",
        README_SUBMIT,
        study,
        f"{README_SUBMIT} python {study} --resume",
        f"{README_SUBMIT} python {study} --set storage.root=s3://",
        "ray job logs",
        "ray down cluster.yaml",
        # The storage root, what lives there, how nodes reach it, how MLflow persists.
        "VITOK_STORAGE",
        "s3://my-bucket/vitok",
        "EFS",
        "studies/<name>/",
        "data/<hash>/",
        "checkpoints",
        "vitok-worker",
        "~/.vitok/mlflow_auth",
        "basic-auth",
        "/home/ubuntu/vitok-mlflow",
        "mlflow[db]",
    ):
        assert needle in section, needle
    # Names the README uses are the ones cluster.yaml and the code use.
    config = load_cluster()
    assert "/home/ubuntu/vitok-mlflow:/home/ray/mlflow" in " ".join(
        config["docker"]["head_run_options"]
    )
    assert config["file_mounts"]["/home/ray/.vitok"] == "~/.vitok"  # holds mlflow_auth
    profiles = {
        t["node_config"].get("IamInstanceProfile", {}).get("Name")
        for t in config["available_node_types"].values()
    }
    assert "vitok-worker" in profiles


# ----------------------------------------------------------------------------- shipped code
def run_python(code: str, cwd: Path, pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [PY, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_shipped_copy_wins_over_installed(tmp_path: Path):
    copy = copy_repo(tmp_path / "repo")
    with (copy / "platform" / "data" / "sources.py").open("a") as f:
        f.write("\nSHIPPED_EDIT = True\n")
    code = (
        "from vitok.platform.runtime import use_shipped_code\n"
        "print('ROOT', use_shipped_code())\n"
        "import vitok.platform.data.sources as s\n"
        "print('FILE', s.__file__, getattr(s, 'SHIPPED_EDIT', False))\n"
    )
    shipped = run_python(code, tmp_path, pythonpath=copy)
    assert shipped.returncode == 0, shipped.stderr
    assert f"ROOT {copy.resolve()}" in shipped.stdout
    assert f"FILE {copy.resolve() / 'platform' / 'data' / 'sources.py'} True" in shipped.stdout
    # No repo on PYTHONPATH (a plain local run): the installed copy, untouched.
    local = run_python(code, tmp_path, pythonpath=None)
    assert local.returncode == 0, local.stderr
    assert "ROOT None" in local.stdout and "False" in local.stdout


def test_entry_point_script_runs_the_shipped_copy(tmp_path: Path):
    """`python pipelines/X.py` in a job's working dir: its first vitok import (the launcher,
    vitok.pipelines.cli) maps vitok.* onto the shipped copy before anything else loads."""
    copy = copy_repo(tmp_path / "repo")
    for rel, marker in (("pipelines/arguments.py", "ARGS"), ("tokenizer/config.py", "TOK")):
        with (copy / rel).open("a") as f:
            f.write(f"\nprint('SHIPPED_{marker}', flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [PY, "pipelines/train_tokenizer.py", "--print-config"]
    shipped = subprocess.run(
        cmd, cwd=copy, env={**env, "PYTHONPATH": str(copy)}, capture_output=True, text=True
    )
    assert shipped.returncode == 0, shipped.stderr
    assert "SHIPPED_ARGS" in shipped.stdout and "SHIPPED_TOK" in shipped.stdout
    assert "name: tokenizer-demo" in shipped.stdout
    # No repo on PYTHONPATH (a plain local run): the installed copy, untouched.
    local = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    assert "SHIPPED" not in local.stdout


def test_shipped_code_refuses_after_stale_import(tmp_path: Path):
    copy = copy_repo(tmp_path / "repo")
    code = (
        "import vitok.platform.data.sources\n"
        "from vitok.platform.runtime import use_shipped_code\n"
        "use_shipped_code()\n"
    )
    out = run_python(code, tmp_path, pythonpath=copy)
    assert out.returncode != 0
    assert (
        "vitok.platform.data.sources" in out.stderr
        and "before any other vitok import" in out.stderr
    )


def test_code_fingerprint_sees_edits(tmp_path: Path):
    from vitok.platform.runtime import code_fingerprint

    copy = copy_repo(tmp_path / "repo")
    before = code_fingerprint(copy)
    assert before == code_fingerprint(REPO)  # the shipped copy is the code that runs here
    with (copy / "tokenizer" / "config.py").open("a") as f:
        f.write("\n# edit\n")
    assert code_fingerprint(copy) != before


# ----------------------------------------------------------------------------- real cluster
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
