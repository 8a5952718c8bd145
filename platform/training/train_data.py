"""A training worker's data: its batches of each epoch and its part of the evaluation split.

Every worker reads only its share of the training split, straight from the shard files
(``shard_reader``), in an order that is a function of (seed, epoch, world, rank) and of the
epoch's earlier segments only (``read_plan``): a restarted worker sees the same clips as
before the kill, a resume starts reading at the checkpointed batch, and a restart at another
world size still sees each clip once per epoch. Ray Data is not involved: no dataset manager
or split coordinator process per run, and nothing to fast-forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.data.read_plan import batches_in_segment, contiguous_part, worker_order
from vitok.platform.data.shard_reader import (
    ArraySplit,
    ShardSplit,
    SplitReader,
    Transform,
    UnitCache,
)
from vitok.platform.training.config import TrainConfig

Split = ShardSplit | ArraySplit
Segments = Sequence[tuple[int, int]]


class WorkerData:
    """One worker's readers: "train" (its share of each epoch) and "val" if given, sharing
    one ``UnitCache`` of ``cfg.cache_mb``."""

    def __init__(
        self,
        splits: Mapping[str, Split],
        cfg: TrainConfig,
        rank: int,
        world: int,
        *,
        pin_memory: bool = False,
    ) -> None:
        check_splits(splits)
        self.cfg, self.rank, self.world = cfg, rank, world
        remote = is_remote(splits["train"])
        self.span = cfg.read_span or read_span(splits["train"], remote)
        threads = cfg.read_threads or (REMOTE_THREADS if remote else 1)
        cache = UnitCache(cfg.cache_mb)
        self.readers = {
            name: SplitReader(
                split,
                name,
                span=self.span,
                threads=threads,
                prefetch=cfg.prefetch_batches,
                cache=cache,
                pin_memory=pin_memory and name == "train",
            )
            for name, split in splits.items()
        }
        self.unit_rows = self.readers["train"].unit_rows  # the plan's units: one read each
        self.window = max(cfg.shuffle_buffer, self.span * cfg.batch_size)

    def batches_in_epoch(self, segments: Segments = ()) -> int:
        """Batches this worker (and every other) takes in the epoch's open segment."""
        return batches_in_segment(self.unit_rows, self.world, self.cfg.batch_size, segments)

    def order(self, epoch: int, segments: Segments = ()) -> np.ndarray:
        """Row ids this worker trains on in the epoch's open segment, in order (no I/O)."""
        cfg = self.cfg
        return worker_order(
            self.unit_rows,
            seed=cfg.seed,
            epoch=epoch,
            world=self.world,
            rank=self.rank,
            batch_size=cfg.batch_size,
            window=self.window,
            segments=segments,
        )

    def train_batches(
        self,
        epoch: int,
        segments: Segments = (),
        start: int = 0,
        transform: Transform | None = None,
    ) -> Iterator[Any]:
        """This worker's batches of ``epoch`` from batch ``start`` of the open segment on
        (nothing before it is read), each through ``transform(batch, i)`` in the reader
        thread, ``i`` counting from ``start``'s batch as 0."""
        order = self.order(epoch, segments)[start * self.cfg.batch_size :]
        return self.readers["train"].batches(order, self.cfg.batch_size, transform=transform)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's contiguous part of the "val" split, in stored order, the last batch
        possibly short (the evaluator reduces across workers)."""
        reader = self.readers["val"]
        part = contiguous_part(reader.num_rows, self.world, self.rank)
        return reader.batches(part, self.cfg.batch_size, drop_last=False)

    @property
    def bytes_read(self) -> dict[str, int]:
        return {name: reader.bytes_read for name, reader in self.readers.items()}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


# train.read_span = 0: reads of about READ_BYTES. On object storage 8 MiB, the size AWS's
# S3 performance guidelines give as typical for byte-range GETs (each request waits on
# latency: fewer, larger ones). On a file system 1 MiB: each read_row_groups call costs
# pyarrow about 0.1 ms, as much as reading a 16x64x64 clip (benchmark.py ingest: 16x64x64
# from local disk went from 35-55% of the plain loop at one clip a read to 50-62% at 6).
# A split keeps at least MIN_UNITS units to permute (a tiny split reads one row group a
# read: its cache serves every later epoch anyway).
# train.read_threads = 0: 8 reads in flight on object storage, one reader thread on a file
# system (more only contend for the GIL).
REMOTE_READ_BYTES = 8 * 2**20
LOCAL_READ_BYTES = 2**20
MIN_UNITS = 64
REMOTE_THREADS = 8


def read_span(split: Split, remote: bool) -> int:
    """Row groups a read when ``train.read_span`` is 0 (see READ_BYTES above)."""
    row_bytes = getattr(split, "row_bytes", 0.0)
    if not row_bytes:
        return 1
    target = REMOTE_READ_BYTES if remote else LOCAL_READ_BYTES
    rows = int(split.unit_rows.sum())
    return max(1, min(-(-target // int(row_bytes)), rows // MIN_UNITS))


def is_remote(split: Split) -> bool:
    """Whether a split's files are on object storage."""
    return any(not storage.is_local(f) for f in getattr(split, "files", ()))


def check_splits(splits: Mapping[str, object]) -> None:
    """A job's data is a "train" split and optionally a "val" split, each a ``ShardSplit``
    or ``ArraySplit`` (a Ray Dataset is refused: workers read the files themselves)."""
    if "train" not in splits:
        raise ValueError(f"datasets must hold a 'train' split; got {sorted(splits)}")
    for name, split in splits.items():
        if name not in ("train", "val"):
            raise ValueError(f"datasets: split {name!r} is not 'train' or 'val'")
        if not isinstance(split, ShardSplit | ArraySplit):
            raise TypeError(
                f"datasets[{name!r}] is a {type(split).__name__}; pass a ShardSplit "
                "(clips.clip_splits(prepared), LatentSet.split(name)) or an ArraySplit"
            )
        if int(split.unit_rows.sum()) == 0:
            raise ValueError(f"datasets[{name!r}] holds no rows")


def split_from_arrays(arrays: Mapping[str, object], rows_per_unit: int = 1) -> ArraySplit:
    """An ``ArraySplit`` of numpy-convertible columns (tests, probes, loop benchmarks)."""
    return ArraySplit({k: np.asarray(v) for k, v in arrays.items()}, rows_per_unit)


__all__ = ["Split", "WorkerData", "check_splits", "split_from_arrays"]
