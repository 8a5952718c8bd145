"""The scaling study on a real two-node Ray cluster with its storage root in S3.

The stack (tests/helpers_cluster.py): an S3 server (moto) on 127.0.0.1, an MLflow server
whose artifacts go to that bucket, a Ray head with 1 CPU and a worker node in its own mount
namespace. Both nodes' scratch and temp folders (``VITOK_SCRATCH``, ``TMPDIR``) are the same
path, which the worker node covers with a private tmpfs: anything one node writes there, the
other cannot see. The study is submitted as the README says (``ray job submit --working-dir
.``), with trials pinned to the worker node by a custom resource, so every piece of state a
trial needs must come through the storage root. Mid-way, the worker node's raylet is killed
and the node started again: the trial is retried and resumes from its checkpoint in S3.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers_cluster import can_unshare_mounts, cluster_stack, copy_repo, run_job, tagged

WORKER = "vitok_worker"  # a resource only the worker node has
PIN = f"['{WORKER}=0.01']"


def _study_command(root: str, *extra: str) -> str:
    sets = [
        f"storage.root={root}",
        f"search.trial_resources={PIN}",
        f"train.resources={PIN}",
        f"generator_train.resources={PIN}",
        "tracking.system_metrics=false",
    ]
    args = " ".join(f'--set "{s}"' for s in sets)
    return f"python pipelines/scaling_study.py --preset smoke-study {args} {' '.join(extra)}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs unshare -m and tmpfs mounts (root)")
def test_study_runs_across_two_nodes_with_storage_in_s3(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    private = (tmp_path / "node-local").resolve()
    node_env = {"VITOK_SCRATCH": str(private / "scratch"), "TMPDIR": str(private)}
    work = copy_repo(tmp_path / "work")  # the folder a user runs `ray job submit` in
    started = time.monotonic()
    with cluster_stack(
        tmp_path / "stack",
        worker_resources={WORKER: 1},
        private_dirs=[private],
        extra_env=node_env,
    ) as stack:
        bucket, cluster = stack.bucket, stack.ray
        root = f"s3://{bucket}/vitok"
        client = cluster.client()
        first_worker = cluster.worker_node_id
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(run_job, client, _study_command(root), work, timeout=1200)
            # Mid-trial, once Ray Train has registered the first trial's stage-1 checkpoint in
            # the bucket, the worker node dies (its raylet SIGKILLed) and comes back as a new
            # node.
            registered = "vitok/studies/smoke-study/trials/c2/ray/c2-stage1/checkpoint_manager"
            deadline = time.monotonic() + 900
            while not any(k.startswith(registered) for k in stack.s3.keys(bucket, "vitok/")):
                assert not job.done(), job.result()[-6000:]
                assert time.monotonic() < deadline, "no stage-1 checkpoint appeared"
                time.sleep(1.0)
            cluster.kill_worker_raylet()
            cluster.wait_node_dead(first_worker)
            assert cluster.restart_worker() != first_worker
            logs = job.result()
        (tmp_path / "job.log").write_text(logs)
        assert "study smoke-study: 2 trials finished, 0 failed" in logs, logs[-6000:]

        keys = stack.s3.keys(bucket, "vitok/")
        study = "vitok/studies/smoke-study"
        # Committed trial results; each trial ran on the worker node.
        for trial in ("c2", "c8"):
            body = stack.s3.client().get_object(
                Bucket=bucket, Key=f"{study}/trials/{trial}/result.json"
            )["Body"]
            result = json.loads(body.read())
            # The restarted worker node ran both to the end (pinned there; the old one died).
            assert result["status"] == "finished" and result["node_id"] == cluster.worker_node_id
            assert result["tokenizer_checkpoint"].startswith(f"{root}/studies/smoke-study/")
            # Checkpoints persisted from the worker node into the bucket.
            prefix = f"{study}/trials/{trial}/ray/{trial}-stage1/checkpoint_"
            assert any(k.startswith(prefix) and k.endswith("/model.pt") for k in keys), trial
            assert any(k.startswith(f"{study}/trials/{trial}/generator/latents/") for k in keys)
        # Shards (committed by their manifest), the synthetic source, Tune state, the report.
        assert any(k.startswith("vitok/data/") and k.endswith("/manifest.json") for k in keys)
        assert any(k.endswith(".parquet") and "/shards/split=train/" in k for k in keys)
        assert any(k.startswith("vitok/data/synthetic-") and k.endswith(".mp4") for k in keys)
        assert any(k.startswith(f"{study}/tune/") for k in keys)
        for name in ("report.md", "scaling_E.png", "trials.csv"):
            assert f"{study}/report/{name}" in keys, name

        # MLflow: the parent run and its four children, artifacts in the bucket.
        tracking = MlflowClient(tracking_uri=stack.mlflow.uri)
        exp = tracking.get_experiment_by_name("vitok")
        (parent,) = tracking.search_runs([exp.experiment_id], "tags.`vitok.kind` = 'study'")
        children = tracking.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert sorted(r.data.tags["vitok.kind"] for r in children) == [
            "generator",
            "generator",
            "tokenizer",
            "tokenizer",
        ]
        assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
        artifact_keys = stack.s3.keys(bucket, "mlflow/")
        assert any(
            f"/{parent.info.run_id}/artifacts/report/scaling_E.png" in k for k in artifact_keys
        )

        # Nothing was written under the job's working dir (on the head, where it ran) or here.
        shipped = list(
            cluster.head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*")
        )
        assert shipped, "the job's unpacked working_dir was not found"
        for folder in [work, *shipped]:
            assert not (folder / "results").exists() and not (folder / "mlflow.db").exists()

        # Each trial finished once; the killed one resumed its Train run from the checkpoint.
        finished = [k for k in stack.s3.keys(bucket, f"{study}/events/") if "finished" in k]
        assert sorted(k.rsplit("-", 2)[-2] for k in finished) == ["c2", "c8"], finished
        (c2,) = [r for r in children if r.info.run_name == "c2"]
        assert int(c2.data.tags["vitok.resumed_at_step"]) > 0  # from its checkpoint in S3

        # --resume from a changed checkout finds the study by name; nothing reruns.
        events_before = stack.s3.keys(bucket, f"{study}/events/")
        with (work / "pipelines" / "presets.py").open("a") as f:
            f.write("\n# a local edit after the first submission\n")
        logs = run_job(client, _study_command(root, "--resume"), work, timeout=600)
        assert "study smoke-study: 2 trials finished, 0 failed" in logs, logs[-6000:]
        assert "studies/smoke-study" in logs
        assert stack.s3.keys(bucket, f"{study}/events/") == events_before  # no trial started
        print(f"two-node study and resume: {time.monotonic() - started:.0f} s")

    leftover = [(tag, p.pid) for tag in stack.tags for p in tagged(tag)]
    assert not leftover, leftover
