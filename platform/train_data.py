"""A training worker's data: its batches of each epoch, a function of (seed, epoch, rank)
only, so a restarted worker sees the same clips in the same order as before the kill.

Ray Train gives every worker the whole training split unsplit and in stored order
(``data_config``); ``train_batches`` orders it (a seeded permutation of an in-memory copy
when it fits ``train.cache_mb``, else a seeded local shuffle of the stream) and keeps this
worker's slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vitok.platform.train import TrainConfig


def train_batches(
    shard: Any, cfg: TrainConfig, rank: int, world: int, epoch: int, cache: EpochCache
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of one epoch, a function of (seed, epoch, rank) only.

    ``shard`` iterates the whole training split in its stored order (Ray Train gives every
    worker the unsplit dataset with ``preserve_order``; see ``data_config``). Every worker
    orders it identically, draws global batches of ``batch_size * world`` rows and keeps
    rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each: together the workers see
    each row of a full global batch once, every worker the same number of batches.

    A split that fits ``cfg.cache_mb`` is read once into ``cache`` and each epoch is a
    permutation seeded by seed + epoch; a larger one streams every epoch through a local
    shuffle buffer of ``shuffle_buffer`` rows per worker, seeded by seed + epoch.
    """
    global_batch = cfg.batch_size * world
    lo, hi = rank * cfg.batch_size, (rank + 1) * cfg.batch_size
    rows = cache.rows(shard)
    if rows is not None:
        count = len(next(iter(rows.values()))) if rows else 0
        order = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for start in range(0, count - global_batch + 1, global_batch):
            picked = order[start + lo : start + hi]
            yield {k: v[picked] for k, v in rows.items()}
        return
    for batch in shard.iter_torch_batches(
        batch_size=global_batch,
        drop_last=True,
        local_shuffle_buffer_size=cfg.shuffle_buffer * world or None,
        local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
    ):
        yield {k: v[lo:hi] for k, v in batch.items()}  # (batch_size, ...) per column


class EpochCache:
    """The training split in memory, in stored order, when it fits ``limit_mb`` (decided by
    reading it once; the same split decides the same way on every restart)."""

    def __init__(self, limit_mb: int) -> None:
        self.limit = limit_mb * 2**20
        self._rows: dict[str, torch.Tensor] | None = None
        self._too_big = limit_mb <= 0

    def rows(self, shard: Any) -> dict[str, torch.Tensor] | None:
        if self._rows is None and not self._too_big:
            parts: dict[str, list[torch.Tensor]] = {}
            size = 0
            for batch in shard.iter_torch_batches(batch_size=256, drop_last=False):
                size += sum(v.numel() * v.element_size() for v in batch.values())
                if size > self.limit:
                    self._too_big = True
                    return None
                for k, v in batch.items():
                    parts.setdefault(k, []).append(v)
            self._rows = {k: torch.cat(v) for k, v in parts.items()}
        return self._rows


def data_config(datasets: Mapping[str, Any]) -> Any:
    """Ray Train's ingest: "train" unsplit and in order (``train_batches``), others split."""
    from ray.train import DataConfig

    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    names = [name for name in datasets if name != "train"]
    return DataConfig(datasets_to_split=names, execution_options={"train": ordered})


__all__ = ["EpochCache", "data_config", "train_batches"]
