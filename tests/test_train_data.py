"""The training read path without Ray: each worker reads only its share of the split from
the shard files, in an order that is a function of (seed, epoch, world, rank), resumes at the
checkpointed batch without reading what came before, sees each clip once per epoch across a
restart at another world size, and shuffles for real (clips of one video no more often in
one batch than a uniform permutation puts them there, within 2x)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitok.platform.data import read_plan
from vitok.platform.data.read_plan import (
    same_group_pair_share,
    uniform_pair_share,
    worker_order,
)
from vitok.platform.data.shard_layout import encode_clips, parquet_write_options
from vitok.platform.data.shard_reader import ShardSplit, SplitReader, UnitCache
from vitok.platform.training.train import TrainConfig
from vitok.platform.training.train_data import WorkerData, check_splits, split_from_arrays
from vitok.platform.training.train_loop import resume_at_world

SHAPE = (2, 16, 16, 3)  # 1536 bytes a clip


def clip_of(row: int) -> np.ndarray:
    """Clip number ``row``: its bytes spell the row, so a batch shows what it holds."""
    return np.full(SHAPE, row % 251, np.uint8) + np.arange(SHAPE[-1], dtype=np.uint8)


def write_split(folder, videos: list[int], files: int = 3, rows_per_group: int = 1) -> list:
    """Shards of ``len(videos)`` clips in stored order (clip i of video ``videos[i]``), raw
    clips as the writer stores them; ``rows_per_group=1`` is the writer's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(videos)
    options = parquet_write_options()
    options["row_group_size"] = rows_per_group
    paths = []
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        clips = np.stack([clip_of(int(i)) for i in rows])
        table = pa.table(
            {
                "clip": pa.array(list(encode_clips(clips)), pa.binary()),
                "label": pa.array(rows.astype(np.int64)),  # the row id, to check contents
                "path": pa.array([f"video{videos[i]:04d}.mp4" for i in rows]),
            }
        )
        path = folder / f"part-{f}.parquet"
        pq.write_table(table, path, **options)
        paths.append(str(path))
    return paths


def rows_of(batches) -> list[list[int]]:
    out = []
    for batch in batches:
        clips = batch["clip"].numpy()
        labels = batch["label"].tolist()
        for clip, label in zip(clips, labels):
            np.testing.assert_array_equal(clip, clip_of(label))  # the bytes of that row
        out.append(labels)
    return out


def ucf_videos(n_videos: int = 120, seed: int = 0) -> list[int]:
    """A UCF-shaped corpus in stored order: each video's 2-3 clips back to back."""
    per_video = np.random.default_rng(seed).integers(2, 4, n_videos)
    return [v for v, k in enumerate(per_video) for _ in range(k)]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ShardSplit:
    folder = tmp_path_factory.mktemp("shards")
    files = write_split(folder, ucf_videos(40))  # 40 videos, about 100 clips, 3 files
    return ShardSplit.from_files(files, ("clip", "label"), SHAPE)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "seed": 3, "cache_mb": 0, "read_span": 1, **kw})


def _epoch(split, cfg, world, epoch=0, segments=(), start=0):
    """(rows of each worker's batches, each worker's data bytes read)."""
    out, read = [], []
    for rank in range(world):
        data = WorkerData({"train": split}, cfg, rank, world)
        out.append(rows_of(data.train_batches(epoch, segments, start)))
        read.append(data.readers["train"].bytes_read)
        data.close()
    return out, read


# ----------------------------------------------------------------------------- order
def test_the_order_is_a_function_of_seed_epoch_world_and_rank(split):
    cfg, n = _cfg(), int(split.unit_rows.sum())
    for world in (1, 2, 4):
        epoch0, _ = _epoch(split, cfg, world)
        again, _ = _epoch(split, cfg, world)
        assert epoch0 == again  # a restarted worker gets the same batches
        batches = {len(rows) for rows in epoch0}
        assert batches == {(n // world) // cfg.batch_size}  # equal steps on every worker
        seen = [i for rows in epoch0 for batch in rows for i in batch]
        assert len(seen) == len(set(seen)) > n - world * cfg.batch_size  # each clip once
        assert epoch0 != _epoch(split, cfg, world, epoch=1)[0]  # a new order each epoch
        assert epoch0 != _epoch(split, _cfg(seed=4), world)[0]
    # The epoch's global sequence does not depend on the world size: two workers take its
    # halves (each arranged in its own batches).
    one = read_plan.epoch_sequence(split.unit_rows, 3, 0)
    two = [WorkerData({"train": split}, cfg, r, 2).order(0) for r in (0, 1)]
    half = len(one) // 2
    assert set(two[0]) <= set(one[:half]) and set(two[1]) <= set(one[half:])


# ----------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("read_span", [1, 8])
def test_bytes_read_per_worker_fall_as_one_over_world(split, read_span):
    """Each worker reads its share (at most 1.1 x split / world, plus one row group) at world
    1, 2, 4 and 8, so what a worker reads falls as 1/world, also when a read spans 8 row
    groups: a unit at the edge of a share is read only in the rows that worker uses."""
    cfg = _cfg(batch_size=2, read_span=read_span)
    total = sum(
        pq.ParquetFile(f).metadata.row_group(g).total_byte_size
        for f in split.files
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    )
    one_group = max(
        pq.ParquetFile(f).metadata.row_group(g).total_byte_size
        for f in split.files
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    )
    per_world = {}
    for world in (1, 2, 4, 8):
        _, read = _epoch(split, cfg, world)
        assert max(read) <= 1.1 * total / world + one_group, (world, read, total)
        per_world[world] = max(read)
    assert per_world[8] < per_world[4] < per_world[2] < per_world[1] <= total
    assert per_world[1] / per_world[8] > 7  # about 8x less per worker at 8 workers


def test_the_default_read_is_about_a_megabyte_on_disk_and_8_on_object_storage(tmp_path):
    """``train.read_span=0`` sizes a read in bytes: the split's stored clip size sets how
    many row groups make about 1 MiB (a file system) or 8 MiB (object storage), and a split
    keeps at least 64 units to permute."""
    from vitok.platform.training.train_data import read_span

    def stored(rows: int, row_bytes: float) -> ShardSplit:  # the plan needs no files
        return ShardSplit(("x.parquet",), ((1,) * rows,), ("clip",), row_bytes=row_bytes)

    clip64, clip128 = 16 * 64 * 64 * 3, 16 * 128 * 128 * 3
    assert read_span(stored(100_000, clip64), remote=False) == 6  # 1.1 MiB a read
    assert read_span(stored(100_000, clip64), remote=True) == 43  # 8.1 MiB
    assert read_span(stored(100_000, clip128), remote=False) == 2
    assert read_span(stored(100_000, clip128), remote=True) == 11
    assert read_span(stored(640, clip64), remote=True) == 10  # 64 units of 10 clips
    assert read_span(stored(33, clip64), remote=False) == 1
    assert read_span(split_from_arrays({"x": np.zeros((10, 3))}), remote=True) == 1
    # The stored size comes from the footers: the clip column and the label, as stored.
    files = write_split(tmp_path / "s", list(range(640)), files=2)  # 1536 B a clip
    big = ShardSplit.from_files(files, ("clip", "label"), SHAPE)
    assert 1536 < big.row_bytes < 1536 * 1.1
    assert read_span(big, remote=False) == 10
    data = WorkerData({"train": big}, TrainConfig(batch_size=4), 0, 1)
    assert data.span == read_span(big, remote=False)
    # The shipped footers spare the worker every footer read.
    assert big.footers is not None and data.readers["train"].footer_bytes == 0


def test_the_cache_serves_later_epochs_without_changing_the_order(split):
    cfg = _cfg(cache_mb=64)
    data = WorkerData({"train": split}, cfg, 1, 2)
    first = rows_of(data.train_batches(0))
    read_once = data.readers["train"].bytes_read
    later = [rows_of(data.train_batches(e)) for e in (1, 2, 3, 4, 5, 6)]
    assert data.readers["train"].bytes_read <= 2.2 * read_once  # never more than the split
    assert [first, *later] == [_epoch(split, _cfg(), 2, epoch=e)[0][1] for e in range(7)]


# ----------------------------------------------------------------------------- resume
def test_a_resume_reads_from_the_checkpointed_batch_on(split):
    cfg = _cfg()
    full, read_full = _epoch(split, cfg, 2)
    k = 5
    resumed, read_resumed = _epoch(split, cfg, 2, start=k)
    assert resumed == [rows[k:] for rows in full]
    for rank in (0, 1):  # only the rest of the share was read
        left = len(full[rank]) - k
        assert read_resumed[rank] <= read_full[rank] * left / len(full[rank]) + 1600


def test_a_restart_at_another_world_size_sees_each_clip_once_per_epoch(split):
    """Two workers stop after 4 batches; the restarted job has one worker (then 3, then 2):
    across the segments every clip of the epoch is seen at most once, and all but less
    than one global batch per segment."""
    cfg, n = _cfg(), int(split.unit_rows.sum())
    for worlds in ((2, 1), (4, 3, 2), (1, 2)):
        seen, segments = [], []
        for i, world in enumerate(worlds):
            rows, _ = _epoch(split, cfg, world, segments=segments)
            done = 4 if i < len(worlds) - 1 else len(rows[0])
            seen += [r for w in rows for batch in w[:done] for r in batch]
            state = {"world": world, "batch_in_epoch": done, "segments": list(segments)}
            if i < len(worlds) - 1:
                resume_at_world(state, worlds[i + 1])
                assert state["batch_in_epoch"] == 0 and state["world"] == worlds[i + 1]
            segments = [tuple(s) for s in state["segments"]]
        assert len(seen) == len(set(seen)), worlds
        assert len(seen) > n - sum(w * cfg.batch_size for w in worlds), (worlds, len(seen), n)
    # At the same world size the open segment simply continues.
    state = {"world": 2, "batch_in_epoch": 3, "segments": []}
    resume_at_world(state, 2)
    assert state == {"world": 2, "batch_in_epoch": 3, "segments": []}


# ----------------------------------------------------------------------------- shuffle
def _pair_ratio(split, videos, world, batch_size, epochs=4, **kw) -> float:
    cfg = _cfg(batch_size=batch_size, **kw)
    workers = [WorkerData({"train": split}, cfg, r, world) for r in range(world)]
    shares = []
    for epoch in range(epochs):
        orders = [w.order(epoch).reshape(-1, batch_size) for w in workers]
        global_batches = np.concatenate(orders, axis=1)  # (batches, world * batch_size)
        shares.append(same_group_pair_share([videos[b] for b in global_batches]))
    return float(np.mean(shares)) / uniform_pair_share(videos)


def test_the_shuffle_mixes_videos_like_a_uniform_permutation(tmp_path):
    """On a UCF-shaped corpus stored video by video (2-3 clips each), the share of pairs in
    a global batch from the same video is within 2x of a uniform permutation's, at 1 and 4
    workers, with the writer's layout (one clip per row group)."""
    videos = np.asarray(ucf_videos(400, seed=1))
    files = write_split(tmp_path / "ucf", videos.tolist(), files=4)
    split = ShardSplit.from_files(files, ("clip", "label"), SHAPE)
    for world in (1, 4):
        ratio = _pair_ratio(split, videos, world, batch_size=32 // world)
        assert 0.5 < ratio < 2.0, (world, ratio)
        # 8 consecutive clips per read (object storage): the plan deals them into different
        # batches, so a batch holds fewer pairs of one video than a uniform permutation's.
        ratio = _pair_ratio(split, videos, world, batch_size=32 // world, read_span=8)
        assert ratio < 1.0, (world, ratio)
    # Stored order (what a read without the permutation gives) puts them together: the
    # same check fails by a wide margin.
    stored = videos[: len(videos) // 32 * 32].reshape(-1, 32)
    assert same_group_pair_share(list(stored)) / uniform_pair_share(videos) > 10


def test_row_groups_of_several_clips_are_read_whole_and_mixed_within_the_window(tmp_path):
    """Shards of another layout (8 clips per row group, as older shards): every clip is read
    correctly, each once, and the window shuffle mixes a row group's clips over batches."""
    videos = np.asarray(ucf_videos(60, seed=2))
    files = write_split(tmp_path / "old", videos.tolist(), files=2, rows_per_group=8)
    split = ShardSplit.from_files(files, ("clip", "label"), SHAPE)
    rows, _ = _epoch(split, _cfg(shuffle_buffer=64), 2)
    seen = [r for w in rows for batch in w for r in batch]
    assert len(seen) == len(set(seen)) > len(videos) - 8
    mixed = _pair_ratio(split, videos, 2, batch_size=8, shuffle_buffer=64)
    unmixed = _pair_ratio(split, videos, 2, batch_size=8, shuffle_buffer=8)
    assert mixed < unmixed / 2


# ----------------------------------------------------------------------------- reader
def test_a_mix_keeps_only_the_masked_rows(split):
    keep = [np.arange(sum(rows)) % 3 == 0 for rows in split.group_rows]
    masked = ShardSplit.from_files(split.files, ("clip", "label"), SHAPE, keep)
    kept = {int(i) for i in np.concatenate([np.arange(sum(r)) for r in split.group_rows])}
    starts = np.cumsum([0] + [sum(r) for r in split.group_rows])
    kept = {s + i for s, k in zip(starts, keep) for i in np.flatnonzero(k)}
    reader = SplitReader(masked, cache=UnitCache(0))
    rows = rows_of(reader.batches(np.arange(int(masked.unit_rows.sum())), 1))
    assert sorted(r for batch in rows for r in batch) == sorted(kept)
    # Reads of 8 row groups, each worker's share cut mid-unit: every worker gets exactly the
    # kept rows of its order, with the right bytes (rows_of checks each clip).
    cfg = _cfg(batch_size=3, read_span=8)
    for world in (2, 3):
        rows, _ = _epoch(masked, cfg, world)
        for rank in range(world):
            order = WorkerData({"train": masked}, cfg, rank, world).order(0)
            expected = [sorted(kept)[i] for i in order]
            assert [r for batch in rows[rank] for r in batch] == expected


def test_a_read_error_is_raised_where_the_batches_are_used(tmp_path):
    files = write_split(tmp_path / "gone", list(range(16)), files=2)
    split = ShardSplit.from_files(files, ("clip", "label"), SHAPE)
    (tmp_path / "gone" / "part-1.parquet").unlink()
    reader = SplitReader(split, threads=2, prefetch=1)
    with pytest.raises(OSError):
        rows_of(reader.batches(np.arange(16), 4))
    # A consumer that stops early ends the reader thread (no hang, nothing left running).
    files = write_split(tmp_path / "ok", list(range(64)), files=2)
    reader = SplitReader(ShardSplit.from_files(files, ("clip", "label"), SHAPE), prefetch=1)
    batches = reader.batches(np.arange(64), 4)
    assert next(batches)["label"].tolist() == [0, 1, 2, 3]
    batches.close()
    reader.close()


def test_in_memory_splits_and_what_a_job_may_pass():
    arrays = split_from_arrays({"x": np.arange(10.0)[:, None], "label": np.arange(10)})
    data = WorkerData({"train": arrays}, _cfg(batch_size=2), 0, 1)
    rows = [b["label"].tolist() for b in data.train_batches(0)]
    assert sorted(i for b in rows for i in b) == list(range(10))
    with pytest.raises(TypeError, match="pass a ShardSplit"):
        check_splits({"train": object()})
    with pytest.raises(ValueError, match="'train'"):
        check_splits({"val": arrays})


def test_plan_segments_consume_a_prefix_of_nothing_twice():
    """The plan alone (no I/O): after closed segments, the open one's rows are exactly the
    rows no earlier segment consumed (less the short tails)."""
    rows = np.full(26, 4, np.int64)  # units of 4 rows
    consumed = []
    for r in range(2):
        order = worker_order(rows, seed=1, epoch=2, world=2, rank=r, batch_size=5, window=20)
        consumed += order[: 3 * 5].tolist()
        # Each full window deals a unit's rows into different batches (a unit holds 4 rows,
        # a window of 20 rows 4 batches; a short last window has fewer).
        for batch in order[: len(order) // 20 * 20].reshape(-1, 5):
            assert len(set((batch // 4).tolist())) == 5, batch
    rest = [
        worker_order(
            rows, seed=1, epoch=2, world=3, rank=r, batch_size=5, window=20, segments=[(2, 3)]
        )
        for r in range(3)
    ]
    later = np.concatenate(rest).tolist()
    assert not set(consumed) & set(later) and len(set(later)) == len(later)
    assert read_plan.batches_in_segment(rows, 3, 5, [(2, 3)]) == len(rest[0]) // 5
