"""A worker's batches are a function of (seed, epoch, rank): in memory or streamed, every
worker of a global batch gets a disjoint slice, and a too-large split falls back to the
stream."""

from __future__ import annotations

import torch

from vitok.platform.train import TrainConfig
from vitok.platform.train_data import EpochCache, train_batches


class Shard:
    """The stored-order stream a worker gets (``ray.train.get_dataset_shard``), counting
    passes over it."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4)  # row i is all i
        self.passes = 0

    def iter_torch_batches(self, batch_size, drop_last, **shuffle):
        self.passes += 1
        order = torch.arange(len(self.x))
        if shuffle.get("local_shuffle_seed") is not None:
            g = torch.Generator().manual_seed(shuffle["local_shuffle_seed"])
            order = order[torch.randperm(len(order), generator=g)]
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, stop, batch_size):
            yield {"x": self.x[order[i : i + batch_size]]}


def _rows(cfg, rank, world, epoch, cache, shard):
    return [
        b["x"][:, 0].long().tolist() for b in train_batches(shard, cfg, rank, world, epoch, cache)
    ]


def test_cached_epochs_are_seeded_permutations_split_across_ranks():
    cfg = TrainConfig(batch_size=3, seed=7, cache_mb=1)
    shard = Shard(20)
    caches = [EpochCache(cfg.cache_mb), EpochCache(cfg.cache_mb)]
    epoch0 = [_rows(cfg, r, 2, 0, caches[r], shard) for r in (0, 1)]
    assert shard.passes == 2  # each worker read the split once ...
    epoch1 = [_rows(cfg, r, 2, 1, caches[r], shard) for r in (0, 1)]
    assert shard.passes == 2  # ... and never again
    for epoch in (epoch0, epoch1):
        assert len(epoch[0]) == len(epoch[1]) == 20 // 6  # full global batches only
        seen = [i for rank in epoch for batch in rank for i in batch]
        assert len(seen) == len(set(seen)) == 18  # disjoint slices, no row twice
    assert epoch0 != epoch1  # a new permutation each epoch
    # A restarted worker (a new cache) gets exactly the same batches for the same epoch.
    assert _rows(cfg, 1, 2, 1, EpochCache(cfg.cache_mb), Shard(20)) == epoch1[1]


def test_a_split_larger_than_the_cache_streams_with_the_seeded_shuffle():
    cfg = TrainConfig(batch_size=4, seed=3, cache_mb=0, shuffle_buffer=8)
    shard = Shard(16)
    streamed = _rows(cfg, 0, 1, 2, EpochCache(cfg.cache_mb), shard)
    assert shard.passes == 1 and sorted(i for b in streamed for i in b) == list(range(16))
    assert streamed == _rows(cfg, 0, 1, 2, EpochCache(0), Shard(16))  # same seed, same order

    tiny = EpochCache(limit_mb=1)
    tiny.limit = 100  # bytes: 16 rows of 4 float32 are 256
    big = Shard(16)
    assert tiny.rows(big) is None and tiny.rows(big) is None and big.passes == 1
