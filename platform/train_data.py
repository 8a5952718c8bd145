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

import torch

from vitok.platform.read_plan import batches_in_segment, contiguous_part, worker_order
from vitok.platform.shard_reader import ArraySplit, ShardSplit, SplitReader, UnitCache
from vitok.platform.train import TrainConfig

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
        cache = UnitCache(cfg.cache_mb)
        self.readers = {
            name: SplitReader(
                split,
                name,
                threads=cfg.read_threads,
                prefetch=cfg.prefetch_batches,
                cache=cache,
                pin_memory=pin_memory and name == "train",
            )
            for name, split in splits.items()
        }
        self.unit_rows = splits["train"].unit_rows

    def batches_in_epoch(self, segments: Segments = ()) -> int:
        """Batches this worker (and every other) takes in the epoch's open segment."""
        return batches_in_segment(self.unit_rows, self.world, self.cfg.batch_size, segments)

    def train_batches(
        self, epoch: int, segments: Segments = (), start: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches of ``epoch`` from batch ``start`` of the open segment on;
        nothing before ``start`` is read."""
        cfg = self.cfg
        order = worker_order(
            self.unit_rows,
            seed=cfg.seed,
            epoch=epoch,
            world=self.world,
            rank=self.rank,
            batch_size=cfg.batch_size,
            window=cfg.shuffle_buffer,
            segments=segments,
        )
        return self.readers["train"].batches(order[start * cfg.batch_size :], cfg.batch_size)

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
    import numpy as np

    return ArraySplit({k: np.asarray(v) for k, v in arrays.items()}, rows_per_unit)


__all__ = ["Split", "WorkerData", "check_splits", "split_from_arrays"]
