"""The multi-node harness itself: S3 (moto), an MLflow server and a two-node Ray, for real.

A job submitted through the Jobs API runs a Ray Train ``TorchTrainer`` whose one worker must
land on the worker node (a custom resource only that node has). It checkpoints to
``s3://<bucket>/train``, logs an MLflow run through the server (artifacts proxied to S3) and
writes a file into the worker node's private tmpfs, which the head and this process must not
see. See tests/helpers_cluster.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers_cluster import can_unshare_mounts, cluster_stack, run_job, tagged

WORKER_RESOURCE = "harness_worker_node"

JOB_SCRIPT = """
import json
import os
import tempfile

import ray
import ray.train
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

CONFIG = json.loads(os.environ["HARNESS_CONFIG"])


def train_loop(config):
    import mlflow
    import torch

    node_id = ray.get_runtime_context().get_node_id()
    private = config["private_dir"]
    path = os.path.join(private, f"written-on-{node_id[:12]}.txt")
    with open(path, "w") as f:
        f.write(node_id)
    mounts = [line.split() for line in open("/proc/self/mountinfo")]
    private_fs = [m[m.index("-") + 1] for m in mounts if m[4] == private]
    mlflow.set_experiment("multinode-harness")
    with mlflow.start_run(run_name="train-worker") as run:
        mlflow.log_param("node_id", node_id)
        mlflow.log_artifact(path)
    model = torch.nn.Linear(2, 1)
    with tempfile.TemporaryDirectory() as d:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        metrics = {
            "node_id": node_id,
            "private_file": path,
            "private_fs": private_fs[-1] if private_fs else None,
            "host_marker_seen": os.path.exists(config["host_marker"]),
            "mlflow_run_id": run.info.run_id,
            "mlflow_artifact_uri": run.info.artifact_uri,
        }
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


ray.init()
trainer = TorchTrainer(
    train_loop,
    train_loop_config=CONFIG,
    scaling_config=ScalingConfig(
        num_workers=1,
        use_gpu=False,
        resources_per_worker={"CPU": 0.5, CONFIG["worker_resource"]: 0.01},
    ),
    run_config=RunConfig(
        name="harness",
        storage_path=CONFIG["storage_path"],
        failure_config=FailureConfig(max_failures=0),
    ),
)
result = trainer.fit()
report = {
    "metrics": result.metrics,
    "checkpoint": result.checkpoint.path,
    "driver_node_id": ray.get_runtime_context().get_node_id(),
    "driver_sees_private_file": os.path.exists(result.metrics["private_file"]),
}
print("HARNESS_RESULT " + json.dumps(report), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs unshare -m and tmpfs mounts (root)")
def test_two_node_stack_trains_on_worker_node_into_s3(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    private = tmp_path / "node-local"
    started = time.monotonic()
    with cluster_stack(
        tmp_path / "stack", worker_resources={WORKER_RESOURCE: 1}, private_dirs=[private]
    ) as stack:
        bucket, ray_cluster = stack.bucket, stack.ray
        # Written on the host after the worker node mounted its tmpfs: the worker must not see it.
        host_marker = private / "written-on-host.txt"
        host_marker.write_text("host")

        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "harness_job.py").write_text(JOB_SCRIPT)
        config = {
            "private_dir": str(private.resolve()),
            "host_marker": str(host_marker.resolve()),
            "worker_resource": WORKER_RESOURCE,
            "storage_path": f"s3://{bucket}/train",
        }
        logs = run_job(
            ray_cluster.client(),
            "python harness_job.py",
            job_dir,
            timeout=240,
            env_vars={"HARNESS_CONFIG": json.dumps(config)},
        )
        line = next((x for x in logs.splitlines() if x.startswith("HARNESS_RESULT ")), None)
        assert line, logs[-6000:]
        report = json.loads(line.removeprefix("HARNESS_RESULT "))
        metrics = report["metrics"]

        # The Train worker ran on the worker node, the job driver on the head.
        assert metrics["node_id"] == ray_cluster.worker_node_id
        assert report["driver_node_id"] != ray_cluster.worker_node_id

        # Node-local files really are node-local, both ways.
        private_file = Path(metrics["private_file"])
        assert metrics["private_fs"] == "tmpfs"
        assert not metrics["host_marker_seen"]
        assert not private_file.exists(), "the worker's private file leaked to the host"
        assert not report["driver_sees_private_file"], "the head node sees the worker's file"
        assert ray_cluster.worker_path(private_file).read_text() == metrics["node_id"]

        # The checkpoint went to S3 (from the worker node).
        checkpoint = report["checkpoint"]  # "bucket/train/harness/checkpoint_..."
        assert checkpoint.startswith(f"{bucket}/train/harness/"), checkpoint
        prefix = checkpoint.removeprefix(f"{bucket}/")
        assert f"{prefix}/model.pt" in stack.s3.keys(bucket, prefix), stack.s3.keys(bucket)

        # The MLflow run logged from the Train worker: in the server, its artifact in S3.
        run_id = metrics["mlflow_run_id"]
        run = MlflowClient(tracking_uri=stack.mlflow.uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["node_id"] == ray_cluster.worker_node_id
        assert metrics["mlflow_artifact_uri"].startswith("mlflow-artifacts:")
        artifacts = [k for k in stack.s3.keys(bucket, "mlflow/") if f"/{run_id}/artifacts/" in k]
        assert [k.rsplit("/", 1)[-1] for k in artifacts] == [private_file.name], artifacts
        print(f"stack up + job: {time.monotonic() - started:.0f}s")

    assert not private_file.exists()
    # Everything the stack started is gone (matched by its markers: other Rays may be running).
    leftover = [(tag, p.pid) for tag in stack.tags for p in tagged(tag)]
    assert not leftover, leftover
    assert not [d for d in stack.temp_dirs if d.exists()], "Ray temp dirs left behind"
    print(f"total with teardown: {time.monotonic() - started:.0f}s (pid {os.getpid()})")
