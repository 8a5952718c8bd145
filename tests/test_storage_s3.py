"""The storage root on a real S3 server (moto on 127.0.0.1), with its endpoint given either
way a user may give it: in the URI, as Ray's docs show for MinIO and Ceph
(``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http``), or in the environment
(``AWS_ENDPOINT_URL``, the form the two-node tests use). Path parts go before the query,
and every object lands under the prefix the root names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers_cluster import REPO, S3Server, base_env

from vitok.platform import storage
from vitok.platform.study.store import StudyStore

BUCKET = "vitok"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def _credentials(s3: S3Server, endpoint_in_env: bool) -> dict[str, str]:
    env = {k: v for k, v in s3.env.items() if k != "MLFLOW_S3_ENDPOINT_URL"}
    if not endpoint_in_env:
        env.pop("AWS_ENDPOINT_URL")
    return env


def _root(s3: S3Server, form: str, prefix: str) -> str:
    if form == "uri":
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{s3.port}&scheme=http"
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(params=["uri", "env"], ids=["endpoint-in-uri", "endpoint-in-env"])
def root(request, s3, monkeypatch) -> str:
    """A fresh root under the bucket; the endpoint in the URI (no AWS_ENDPOINT_URL at all)
    or in the environment."""
    form = request.param
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for key, value in _credentials(s3, endpoint_in_env=form == "env").items():
        monkeypatch.setenv(key, value)
    storage._remote_fs.cache_clear()  # a filesystem made under another environment
    yield _root(s3, form, f"{request.node.originalname}-{form}-{time.time_ns()}")
    storage._remote_fs.cache_clear()


def _objects(s3: S3Server, prefix: str) -> list[str]:
    """The objects under a prefix, less the empty directory markers pyarrow writes."""
    return [k for k in s3.keys(BUCKET, prefix) if not k.endswith("/")]


def _prefix(root: str) -> str:
    """The key prefix a root names inside the bucket."""
    return root.split("?", 1)[0].removeprefix(f"s3://{BUCKET}/")


def test_join_and_name_keep_the_query_at_the_end():
    root = "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    joined = storage.join(root, "studies", "/demo/")
    assert joined == "s3://b/runs/studies/demo?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name(joined) == "demo"
    assert storage.join("s3://b/runs/", "x") == "s3://b/runs/x"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    trailing = "s3://b/runs/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.resolve_root(trailing) == root  # the path's trailing slash goes


def test_objects_land_under_the_roots_prefix(s3, root):
    prefix = _prefix(root)
    target = storage.join(root, "data", "abc", "manifest.json")
    storage.write_json(target, {"files": 3})
    assert storage.read_json(target) == {"files": 3}
    size = len(storage.read_bytes(target))
    assert storage.is_file(target) and storage.exists(storage.join(root, "data"))
    assert storage.listdir(storage.join(root, "data")) == ["abc"]
    assert storage.list_files(storage.join(root, "data")) == [("abc/manifest.json", size)]
    assert _objects(s3, prefix) == [f"{prefix}/data/abc/manifest.json"]
    storage.delete(storage.join(root, "data"))
    assert _objects(s3, prefix) == [] and not storage.exists(target)


def test_study_store_locates_fresh_and_resumed_studies(s3, root, tmp_path):
    first = StudyStore.locate(root, "demo", resume=False)
    assert first.name == "demo"
    assert first.uri == storage.join(root, "studies", "demo")
    storage.write_text(first.path("config.yaml"), "name: demo\n")
    second = StudyStore.locate(root, "demo", resume=False)
    assert second.name == "demo-2"
    storage.write_text(second.path("config.yaml"), "name: demo\n")
    resumed = StudyStore.locate(root, "demo", resume=True)
    assert resumed.uri == second.uri
    resumed.acquire(settle_s=0.0)
    try:
        assert storage.is_file(resumed.path("driver.json"))
    finally:
        resumed.release()
    prefix = _prefix(root)
    assert _objects(s3, prefix) == [
        f"{prefix}/studies/demo-2/config.yaml",
        f"{prefix}/studies/demo/config.yaml",
    ]
    # A local copy of a remote file (checkpoints, weights) keeps the object's own name.
    local = storage.local_copy(first.path("config.yaml"))
    assert local.name.endswith("-config.yaml") and local.read_text() == "name: demo\n"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_runs_with_the_endpoint_in_its_root_uri(s3, tmp_path, monkeypatch):
    """``scaling_study.py`` as a user types it, the endpoint only in ``storage.root`` (no
    ``AWS_ENDPOINT_URL``): the shards (Ray Data), Tune's and Ray Train's storage, the
    checkpoints, the committed result and the report all land in the bucket."""
    prefix = f"e2e-{time.time_ns()}"
    root = _root(s3, "uri", prefix)
    env = base_env(**_credentials(s3, endpoint_in_env=False))
    env.pop("AWS_ENDPOINT_URL", None)
    sets = [
        f"storage.root={root}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "generator_train=null",
        "search.sweeps=[c=4]",
    ]
    args = [sys.executable, str(REPO / "pipelines" / "scaling_study.py"), "--preset"]
    args += ["smoke-study", *(x for s in sets for x in ("--set", s))]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # killed as a group if it overruns
    )
    try:
        out, _ = proc.communicate(timeout=840)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-6000:]
    assert "study smoke-study: 1 trials finished, 0 failed" in out, out[-6000:]
    keys = _objects(s3, prefix)
    assert not [k for k in keys if "?" in k or "endpoint_override" in k], keys
    study = f"{prefix}/studies/smoke-study"
    assert any(k.startswith(f"{prefix}/data/") and k.endswith("/manifest.json") for k in keys)
    assert any(k.startswith(f"{prefix}/data/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(f"{study}/tune/") for k in keys)
    assert f"{study}/report/report.md" in keys and f"{study}/config.yaml" in keys
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for key, value in _credentials(s3, endpoint_in_env=False).items():
        monkeypatch.setenv(key, value)
    result = StudyStore(storage.join(root, "studies", "smoke-study")).result("c4")
    assert result is not None and result["status"] == "finished"
    checkpoint = result["tokenizer_checkpoint"]  # a location under the root, query and all
    assert checkpoint.startswith(f"s3://{BUCKET}/{study}/trials/c4/ray/c4-stage1/checkpoint_")
    assert checkpoint.endswith(f"?endpoint_override=127.0.0.1:{s3.port}&scheme=http")
    assert storage.is_file(storage.join(checkpoint, "model.pt"))
    assert f"{_prefix(checkpoint)}/model.pt" in keys
