"""A prepare killed at any point resumes: committed units are kept (not decoded again), the
rest are decoded, and the result equals an uninterrupted prepare's; partial work is removed.
Also the progress line, the unit plan and the preprocess command line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_data import write_index_video

from vitok.platform.data.prepare import DataConfig, prepare

REPO = Path(__file__).resolve().parents[1]


def _corpus(folder: Path, files: int) -> Path:
    for i in range(files):
        write_index_video(folder / f"class{i % 4}" / f"slow_{i:02d}.mp4", 30)
    return folder


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (inode, mtime in ns)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _expected_files(manifest: dict, units: set[str]) -> set[str]:
    """What a committed data folder holds: the manifest, its rejects table, the shards the
    manifest lists and one marker per unit (``units``: their names); nothing else."""
    shards = {e["path"] for split in manifest["files"].values() for e in split}
    return {"manifest.json", manifest["rejects"], *shards, *(f"units/{n}" for n in units)}


def _shard_entries(manifest: dict) -> dict[str, list[tuple]]:
    return {
        split: [(e["path"], e["bytes"], e["rows"], e["crc32"]) for e in entries]
        for split, entries in manifest["files"].items()
    }


def _same_result(a: dict, b: dict) -> None:
    """Two manifests describe the same shards, byte for byte, and the same counts."""
    assert _shard_entries(a) == _shard_entries(b)
    for key in ("hash", "labels", "counts", "units", "clip_shape", "sources"):
        assert a[key] == b[key], key


CFG = DataConfig(
    frames=8, size=(32, 32), clips_per_video=1, val_fraction=0.25, decode_timeout_s=30.0
)


def test_a_rerun_decodes_only_units_without_a_marker(ray_local, tmp_path: Path) -> None:
    """A run cut off after some units committed (their markers written), one of them cut
    between its shard and its marker, with a half-written shard file left behind: the
    rerun decodes only the uncommitted units' files and removes the leftovers."""
    import dataclasses

    folder = _corpus(tmp_path / "videos", 16)
    cfg = dataclasses.replace(CFG, sources=(f"videos:{folder}",))
    first = prepare(cfg, str(tmp_path / "store"), progress=False)  # uninterrupted
    assert first.decoded_files == 16 and first.manifest["units"] == 16  # one file each
    reference = json.loads(json.dumps(first.manifest))
    data = Path(first.root)
    (data / "manifest.json").unlink()  # as if killed before the commit...
    markers = sorted((data / "units").glob("*.json"))
    lost = markers[:5]  # ...with these five units not committed (their shards written)
    lost_files = sum(len(json.loads(m.read_text())["files"]) for m in lost)
    for marker in lost:
        marker.unlink()
    train = data / "shards" / "split=train"
    (train / ".train-00003.parquet.x.tmp").write_bytes(b"PAR1 half")  # a write cut short
    (train / "train-00099.parquet").write_bytes(b"PAR1 of no unit")
    kept = {k: v for k, v in _tree(data).items() if k.startswith("shards/")}
    lost_shards = {f"shards/split={m.stem.split('-')[0]}/{m.stem}.parquet" for m in lost}

    again = prepare(cfg, str(tmp_path / "store"), progress=False)
    assert not again.reused and again.decoded_files == lost_files == 5
    _same_result(again.manifest, reference)
    after = _tree(data)
    for path in set(kept) - lost_shards:  # committed shards: not written again
        if "train-00099" not in path and not path.endswith(".tmp"):
            assert after[path] == kept[path], path
    for path in lost_shards:  # the uncommitted units' shards: written again
        assert after[path] != kept[path], path
    assert set(after) == _expected_files(again.manifest, {m.name for m in markers})
    assert prepare(cfg, str(tmp_path / "store"), progress=False).reused


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.slow  # a preprocess subprocess with its own Ray, killed; the rerun here
def test_killed_preprocess_resumes_where_it_stopped(
    ray_local, tmp_path: Path, monkeypatch, capsys
) -> None:
    """SIGKILL of the preprocess process group mid-way, then the same command again: the
    rerun decodes exactly the files of the units not committed before the kill, and ends
    with the shards, counts and manifest of an uninterrupted run."""
    from vitok.pipelines.preprocess import _parser, build_config, main

    files = 16
    folder = _corpus(tmp_path / "videos", files)
    argv = ["--source", f"videos:{folder}", "--storage", str(tmp_path / "store")]
    argv += ["--set", "frames=8", "--set", "size=[32,32]", "--set", "clips_per_video=1"]
    argv += ["--num-cpus", "2"]
    env = {**os.environ, "VITOK_INJECT_FAULTS": "slow=slow_*", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(REPO / "pipelines" / "preprocess.py"), *argv]

    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        units = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "store" / "data").glob("*/units/*.json"))
            if len(found) >= 6:
                units = found[0].parent
                break
            time.sleep(0.05)
        assert units is not None, proc.stdout.read().decode() if proc.poll() is not None else ""
        tree = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray (GCS, raylet)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # Ray's workers run in process groups of their own: they notice the raylet is gone and
    # exit within seconds (a unit they finish meanwhile is committed whole). Count what is
    # committed once nothing of the killed run is left.
    deadline = time.monotonic() + 60
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(tree) == set()
    data = units.parent
    committed = {p.name: json.loads(p.read_text()) for p in units.glob("*.json")}
    assert 6 <= len(committed) < files and not (data / "manifest.json").exists()
    done_files = sum(len(m["files"]) for m in committed.values())
    before = _tree(data)

    # The same command again, here (this session's Ray: one Ray start fewer).
    monkeypatch.setenv("VITOK_INJECT_FAULTS", "slow=slow_*")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resuming: {done_files} of {files} files already committed" in out
    assert f"resumed ({files - done_files} files decoded now" in out
    manifest = json.loads((data / "manifest.json").read_text())
    markers = {p.name: json.loads(p.read_text()) for p in units.glob("*.json")}
    assert len(markers) == manifest["units"] and manifest["counts"]["files_total"] == files
    for name, marker in committed.items():  # kept as they were: not decoded again
        assert markers[name] == marker
    redone = [m for m in markers.values() if m["attempt"] == manifest["attempt"]]
    assert sum(len(m["files"]) for m in redone) == files - done_files
    after = _tree(data)
    for path, stamp in before.items():
        if path.startswith("shards/") and path in after:
            shard_unit = Path(path).stem
            if f"{shard_unit}.json" in committed:
                assert after[path] == stamp, path  # the killed run's shards, untouched
    assert set(after) == _expected_files(manifest, set(markers))

    parser = _parser()
    cfg = build_config(parser, parser.parse_args(argv))
    reference = prepare(cfg.data, str(tmp_path / "reference"), progress=False)
    _same_result(manifest, reference.manifest)


# ----------------------------------------------------------------------------- progress
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_prints_a_line_every_interval() -> None:
    from vitok.platform.data.progress import PrepareProgress

    clock, out = _Clock(), io.StringIO()
    meter = PrepareProgress(100, done_files=20, done_clips=40, stream=out, clock=clock)
    meter.start()
    for _ in range(8):  # 8 files every 10 s: a line at most every 30 s
        clock.now += 10
        meter.update(8, 16, 1)
    meter.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[vitok.data] resuming: 20 of 100 files already committed")
    assert lines[1] == "[vitok.data] 20/100 files (20%), 40 clips, 0 rejects, time left: measuring"
    assert lines[2] == (
        "[vitok.data] 44/100 files (44%), 88 clips, 1.6 clips/s, 3 rejects, 1m10s left"
    )
    assert len(lines) == 5  # start, two in between (30 s, 60 s), the final one
    assert lines[-1].startswith(
        "[vitok.data] 84/100 files (84%), 168 clips, 1.6 clips/s, 8 rejects"
    )


def test_progress_on_a_terminal_redraws_one_line_and_is_quiet_when_disabled() -> None:
    from vitok.platform.data.progress import PrepareProgress, format_seconds

    clock, tty = _Clock(), _Tty()
    meter = PrepareProgress(10, stream=tty, clock=clock)
    meter.start()
    for _ in range(10):
        clock.now += 1
        meter.update(1, 2, 0)
    meter.close()
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn in place
    assert text.count("\r") == 12 and "10/10 files (100%)" in text  # start, 10, close
    quiet = io.StringIO()
    off = PrepareProgress(10, stream=quiet, enabled=False, clock=clock)
    off.start()
    off.update(10, 20, 0)
    off.close()
    assert quiet.getvalue() == ""
    assert [format_seconds(s) for s in (5, 75, 4000)] == ["5s", "1m15s", "1h06m"]


@pytest.mark.slow  # an S3 server and two preprocess runs with a Ray each (~40 s)
def test_preprocess_reads_a_corpus_in_s3_into_an_s3_root_and_resumes(tmp_path: Path) -> None:
    """``--data s3://...`` (listed and decoded from the bucket) and ``--storage s3://...``
    (shards uploaded whole, units committed by markers): the hash ``--print-config`` shows
    is the one written, and a rerun after lost markers decodes only their files."""
    from helpers_cluster import S3Server, base_env

    s3 = S3Server(tmp_path / "s3")
    try:
        bucket = s3.make_bucket("corpus")
        local = _corpus(tmp_path / "videos", 8)
        for path in sorted(local.rglob("*.mp4")):
            s3.client().upload_file(str(path), bucket, f"UCF/{path.relative_to(local)}")
        command = [sys.executable, str(REPO / "pipelines" / "preprocess.py")]
        command += ["--data", f"s3://{bucket}/UCF", "--storage", f"s3://{bucket}/vitok"]
        command += ["--set", "frames=8", "--set", "size=[32,32]", "--set", "clips_per_video=1"]
        command += ["--num-cpus", "2", "--no-progress"]
        env = base_env(**s3.env)

        def run(*extra: str) -> str:
            done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            return done.stdout

        key = run("--print-config").split("# data hash: ")[1].split()[0]
        assert f"data hash:    {key}" in run()
        prefix = f"vitok/data/{key}/"
        keys = s3.keys(bucket, prefix)
        manifest = json.loads(
            s3.client().get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read()
        )
        assert manifest["counts"]["files_total"] == 8 and manifest["units"] == 8
        shards = {e["path"] for split in manifest["files"].values() for e in split}
        markers = [k for k in keys if k.startswith(f"{prefix}units/")]
        assert {f"{prefix}{p}" for p in shards} <= set(keys) and len(markers) == 8
        for gone in [f"{prefix}manifest.json", *markers[:3]]:  # a run cut off before these
            s3.client().delete_object(Bucket=bucket, Key=gone)
        out = run()
        assert "decoded now:  3 of 8 files" in out and f"data hash:    {key}" in out
        again = json.loads(
            s3.client().get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read()
        )
        _same_result(again, manifest)
    finally:
        s3.stop()


def test_print_config_shows_the_hash_of_the_shards_the_study_reuses(ray_local, tmp_path, capsys):
    """``preprocess.py --preset P --data DIR --print-config`` prints the data hash that the
    study of the same preset and data computes; the shards preprocess writes are the ones
    the study's prepare then reuses without decoding."""
    from vitok.pipelines import scaling_study
    from vitok.pipelines.experiment import ExperimentConfig
    from vitok.pipelines.preprocess import main
    from vitok.platform.config import from_yaml

    folder = _corpus(tmp_path / "videos", 4)
    args = ["--preset", "demo", "--data", str(folder)]
    store = ["--storage", str(tmp_path / "store")]
    assert main([*args, *store, "--print-config"]) == 0
    printed = capsys.readouterr().out.split("# data hash: ")[1].split()[0]
    assert (
        scaling_study.main([*args, "--set", f"storage.root={tmp_path / 'store'}", "--print-config"])
        == 0
    )
    study = from_yaml(ExperimentConfig, capsys.readouterr().out)
    assert main([*args, *store, "--no-progress"]) == 0
    assert f"data hash:    {printed}" in capsys.readouterr().out
    reused = prepare(study.data, study.storage.root, progress=False)
    assert reused.config_hash == printed and reused.reused and reused.decoded_files == 0


def test_two_writers_at_once_commit_one_result(ray_local, tmp_path: Path) -> None:
    """Two prepares of the same data at the same time: both decode (the same units, written
    whole to the same names), the first to commit wins, the other returns that commit."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    folder = _corpus(tmp_path / "videos", 8)
    cfg = dataclasses.replace(CFG, sources=(f"videos:{folder}",))
    root = str(tmp_path / "store")
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: prepare(cfg, root, progress=False), range(2))
    assert a.decoded_files == b.decoded_files == 8  # both decoded: none found a commit
    assert sorted([a.reused, b.reused]) == [False, True]  # one wrote the manifest
    assert a.manifest == b.manifest and a.num_train + a.num_val == 8
    data = Path(a.root)
    markers = {p.name for p in (data / "units").glob("*.json")}
    assert len(markers) == a.manifest["units"]
    assert set(_tree(data)) == _expected_files(a.manifest, markers)
    assert prepare(cfg, root, progress=False).reused
