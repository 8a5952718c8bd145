"""Which rows each training worker reads in an epoch, and in what order: index arithmetic
only (no I/O), so every worker computes the same plan from the same row-group table.

A split is a list of units, numbered in manifest order, each holding ``rows[u]`` rows; row
ids run through the units in that order. A unit is what a reader fetches with one request:
``read_span`` consecutive Parquet row groups of one file (one clip each in the current
layout, see ``shard_layout``). An epoch:

1. ``epoch_sequence``: the units in a permutation seeded by (seed, epoch), their rows
   concatenated. It does not depend on the world size.
2. ``rank_order``: worker ``rank`` of ``world`` takes the contiguous ``1/world`` slice of
   that sequence (so it reads only its own units, and of a unit it shares with a neighbour
   at an end of its slice only the rows it uses) and deals it into batches window by
   window, so that the rows of one unit (several consecutive clips of a shard, read with
   one request) land in different batches.
3. Every worker takes ``(len // world) // batch_size`` batches: the same count everywhere,
   computed from the row table alone, since collectives need equal steps.

Resume: the position in an epoch is a list of segments ``[(world, batches done), ...]``.
Restarting at the same world size continues the open segment at its batch. Restarting at
another world size closes it: the rows no worker consumed yet (every worker's order after
its done batches, concatenated by rank) become the sequence that the new world splits, so
each clip is still seen at most once in the epoch (and every clip once, but for the last
partial batch per worker).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SEED_TAG = 0x5EED_0DE4  # keeps these streams apart from other users of (seed, epoch)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([_SEED_TAG, *(int(k) for k in key)])


def unit_starts(rows: np.ndarray) -> np.ndarray:
    """First row id of each unit, and the total at the end: (U + 1,) int64."""
    return np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])


def epoch_sequence(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Row ids of the epoch: units permuted by (seed, epoch), rows in stored order within a
    unit. (N,) int64."""
    rows = np.asarray(rows, np.int64)
    perm = _rng(seed, epoch).permutation(len(rows))
    starts = unit_starts(rows)[:-1][perm]
    counts = rows[perm]
    # Row ids of the permuted units, vectorised: each unit's start repeated over its rows,
    # plus the position within the unit.
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return base + np.arange(int(counts.sum()), dtype=np.int64)


def rank_order(
    sequence: np.ndarray,
    starts: np.ndarray,
    *,
    world: int,
    rank: int,
    batch_size: int,
    window: int,
    key: Sequence[int],
) -> np.ndarray:
    """Worker ``rank``'s contiguous slice of ``sequence``, arranged into batches window by
    window (a generator seeded with ``key``, world and rank):

    in each window of ``window`` rows (rounded up to whole batches), the runs of rows that
    come from one unit (``starts``: each unit's first row id) are shuffled, then dealt
    round-robin into the window's batches, whose order is shuffled too. A unit's rows land in
    different batches as long as it holds at most ``window / batch_size`` of them, so a unit
    read with one request (several consecutive clips of a shard) puts no two of its clips in
    one batch. Rows a last short window cannot fill a batch with come last (the caller's
    dropped tail).
    """
    n = len(sequence)
    share = sequence[rank * n // world : (rank + 1) * n // world]
    m = len(share)
    if m == 0:
        return share.copy()
    rng = _rng(*key, world, rank)
    size = max(1, -(-max(window, 1) // batch_size)) * batch_size  # whole batches
    pos = np.arange(m)
    win = pos // size
    unit = np.searchsorted(starts, share, side="right") - 1
    first = np.ones(m, bool)
    first[1:] = (unit[1:] != unit[:-1]) | (win[1:] != win[:-1])
    run = np.cumsum(first) - 1  # runs of one unit within one window
    shuffled = share[np.lexsort((pos, rng.random(run[-1] + 1)[run], win))]
    at = pos - win * size  # position within the window
    batches = (np.bincount(win) // batch_size)[win]  # full batches of the row's window
    dealt = at < batches * batch_size
    slot = np.where(dealt, at % np.maximum(batches, 1), 0)
    slot_key = rng.random((int(win[-1]) + 1, size // batch_size))[win, slot]
    slot_key = np.where(dealt, slot_key, 2.0)  # the leftover rows after every batch
    within = np.where(dealt, at // np.maximum(batches, 1), at)
    return shuffled[np.lexsort((within, slot_key, win))]


def worker_order(
    rows: np.ndarray,
    *,
    seed: int,
    epoch: int,
    world: int,
    rank: int,
    batch_size: int,
    window: int,
    segments: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """The row ids worker ``rank`` trains on in the open segment of ``epoch``, in order,
    ``batches * batch_size`` of them (``batches_in_segment``). ``segments`` are the epoch's
    closed segments, ``(world, batches done)`` each, oldest first."""
    starts = unit_starts(np.asarray(rows, np.int64))
    remaining = epoch_sequence(rows, seed, epoch)
    arrange = {"batch_size": batch_size, "window": window}
    for i, (seg_world, done) in enumerate(segments):
        orders = [
            rank_order(remaining, starts, world=seg_world, rank=r, key=(seed, epoch, i), **arrange)
            for r in range(seg_world)
        ]
        remaining = np.concatenate([o[done * batch_size :] for o in orders])
    key = (seed, epoch, len(segments))
    order = rank_order(remaining, starts, world=world, rank=rank, key=key, **arrange)
    batches = (len(remaining) // world) // batch_size
    return order[: batches * batch_size]


def batches_in_segment(
    rows: np.ndarray, world: int, batch_size: int, segments: Sequence[tuple[int, int]] = ()
) -> int:
    """Batches per worker in the open segment (the same on every rank)."""
    left = int(np.sum(rows))
    for seg_world, done in segments:
        left -= seg_world * done * batch_size
    return (left // world) // batch_size


def contiguous_part(total: int, world: int, rank: int) -> np.ndarray:
    """Rows ``[rank * total // world, (rank + 1) * total // world)`` in stored order: a
    worker's part of an evaluation split (the evaluator reduces across workers)."""
    return np.arange(rank * total // world, (rank + 1) * total // world, dtype=np.int64)


def same_group_pair_share(batches: Sequence[np.ndarray]) -> float:
    """Of all pairs of rows within a batch, the share whose group ids (a video, a class)
    are equal. ``batches``: each batch's group ids."""
    same = pairs = 0
    for groups in batches:
        counts = np.unique(groups, return_counts=True)[1]
        same += int((counts * (counts - 1)).sum()) // 2
        pairs += len(groups) * (len(groups) - 1) // 2
    return same / pairs if pairs else 0.0


def uniform_pair_share(groups: np.ndarray) -> float:
    """``same_group_pair_share`` expected of batches drawn by a uniform permutation of all
    rows: the chance that two distinct rows share a group."""
    counts = np.unique(groups, return_counts=True)[1].astype(np.float64)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


__all__ = [
    "batches_in_segment",
    "contiguous_part",
    "epoch_sequence",
    "rank_order",
    "same_group_pair_share",
    "uniform_pair_share",
    "unit_starts",
    "worker_order",
]
