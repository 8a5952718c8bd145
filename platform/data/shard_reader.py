"""A training worker's reader: the rows of a plan (``vitok.platform.data.read_plan``) as torch
batches, read straight from Parquet with pyarrow (local disk, S3, GCS: the storage root's
filesystem) a unit at a time (``span`` consecutive row groups: ``shard_splits``), in reader
threads ahead of the step.

``SplitReader.batches(order, batch_size)`` reads each unit the order needs once (only the
rows of it the order uses: a unit at the edge of a worker's share is read in part), in the
order it is first needed, on ``threads`` threads, at most ``prefetch`` batches ahead; a unit
is dropped after the last batch that uses it, so memory is bounded by the lookahead and the
plan's shuffle window, never by the split. A ``UnitCache`` keeps units read earlier up to
``cache_mb`` (a small split is read once per worker and then served from memory; a large
one saves that fraction of its reads); an epoch whose units are all cached is served in the
caller's thread. On a GPU, batches are copied into pinned memory in the reader thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vitok.platform.data.read_plan import unit_starts
from vitok.platform.data.shard_splits import Arrays, ArraySplit, ShardSplit

Transform = Callable[[dict[str, torch.Tensor], int], Any]  # (batch, index in the plan)


# ----------------------------------------------------------------------------- cache
class UnitCache:
    """Units read earlier, kept while they fit ``limit_mb`` (first come, never evicted: the
    content is the same whenever a unit is read, so what is cached changes no order)."""

    def __init__(self, limit_mb: float) -> None:
        self.limit = int(limit_mb * 2**20)
        self.size = 0
        self._units: dict[tuple[str, int], Arrays] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Arrays | None:
        return self._units.get(key)

    def offer(self, key: tuple[str, int], arrays: Arrays) -> None:
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            if key in self._units or self.size + size > self.limit:
                return
            self.size += size
        # A copy: a view would keep the whole Arrow buffer it came from alive.
        copy = {k: np.array(v) for k, v in arrays.items()}
        with self._lock:
            self._units[key] = copy


# ----------------------------------------------------------------------------- reader
class SplitReader:
    """Batches of one split for one worker (see the module docstring)."""

    def __init__(
        self,
        split: ShardSplit | ArraySplit,
        name: str = "train",
        *,
        span: int = 1,
        threads: int = 2,
        prefetch: int = 2,
        cache: UnitCache | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.split, self.name = split, name
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        self.cache = cache or UnitCache(0)
        self.pin_memory = pin_memory
        self.units = split.open(span)
        self.unit_rows = self.units.unit_rows  # the plan's units: one read each
        self.starts = unit_starts(self.unit_rows)
        self.num_rows = int(self.starts[-1])
        self._pool: ThreadPoolExecutor | None = None  # kept across epochs: its threads
        # keep their open files

    @property
    def bytes_read(self) -> int:
        """Bytes of row groups read from storage so far (footers: ``footer_bytes``)."""
        return self.units.bytes_read

    @property
    def footer_bytes(self) -> int:
        return self.units.footer_bytes

    def batches(
        self,
        order: np.ndarray,
        batch_size: int,
        *,
        drop_last: bool = True,
        transform: Transform | None = None,
    ) -> Iterator[Any]:
        """The rows ``order`` names (ids into the split), ``batch_size`` at a time, each
        passed through ``transform(batch, index)`` when given (in the reader thread, so a
        batch's crops and flips overlap the step too)."""
        order = np.asarray(order, np.int64)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        plan = _BatchPlan(order[:stop], self.starts, batch_size)
        transform = transform or _unchanged
        if all(self.cache.get((self.name, u)) is not None for u in plan.unit_sequence):
            for b in range(plan.count):  # everything in memory: nothing to overlap
                yield transform(plan.gather(b, lambda u: self._load(u, *plan.rows_needed(u))), b)
            return
        yield from self._prefetched(plan, transform)

    def _load(self, unit: int, lo: int, hi: int) -> Arrays:
        """Rows ``[lo, hi)`` of ``unit`` as arrays indexed from ``lo``: from the cache, or
        read (only those rows' row groups); a unit read whole is offered to the cache."""
        cached = self.cache.get((self.name, unit))
        if cached is not None:
            return {k: v[lo:hi] for k, v in cached.items()} if lo else cached
        whole = lo == 0 and hi == self.unit_rows[unit]
        arrays = self.units.read(unit, lo, hi)
        if whole:
            self.cache.offer((self.name, unit), arrays)
        return arrays

    def _prefetched(self, plan: _BatchPlan, transform: Transform) -> Iterator[Any]:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce,
            args=(plan, transform, out, stop),
            daemon=True,
            name="vitok-reader",
        )
        thread.start()
        try:
            for _ in range(plan.count):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def _produce(
        self, plan: _BatchPlan, transform: Transform, out: queue.Queue, stop: threading.Event
    ) -> None:
        """Reader thread: submits unit reads up to ``prefetch`` batches ahead, assembles each
        batch once its units are in, drops units after their last batch."""
        held: dict[int, Future] = {}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vitok-read")
        pool = self._pool
        try:
            submitted = 0
            for b in range(plan.count):
                horizon = plan.first_unit_of_batch(min(b + self.prefetch, plan.count - 1) + 1)
                while submitted < horizon:
                    unit = int(plan.unit_sequence[submitted])
                    held[unit] = pool.submit(self._load, unit, *plan.rows_needed(unit))
                    submitted += 1
                batch = plan.gather(b, lambda u: held[u].result())
                for unit in plan.units_last_used_by(b):
                    held.pop(int(unit), None)
                batch = transform(batch, b)
                if self.pin_memory:
                    batch = {
                        k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()
                    }
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - raised in the consumer's thread
            out.put(err)
        finally:
            for future in held.values():  # reads still queued for this plan
                future.cancel()
            for future in held.values():
                if not future.cancelled():
                    future.exception()  # wait: no read outlives its plan

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.units.close()


def _unchanged(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return batch


class _BatchPlan:
    """The units a list of row ids needs, batch by batch: which unit and offset each row is,
    the rows of each unit it needs (a unit shared with the next worker's share is read only
    in part), the units in order of first use, and after which batch each unit is done."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, batch_size: int) -> None:
        self.batch_size = batch_size
        self.count = -(-len(order) // batch_size)
        self.unit = np.searchsorted(starts, order, side="right") - 1
        self.offset = order - starts[self.unit]
        units, inverse = np.unique(self.unit, return_inverse=True)
        lo = np.full(len(units), np.iinfo(np.int64).max)
        hi = np.zeros(len(units), np.int64)
        np.minimum.at(lo, inverse, self.offset)
        np.maximum.at(hi, inverse, self.offset + 1)
        self._lo = dict(zip(units.tolist(), lo.tolist()))
        self._hi = dict(zip(units.tolist(), hi.tolist()))
        self.base = lo[inverse]  # the first row read of each row's unit
        first = np.unique(self.unit, return_index=True)[1]
        self.unit_sequence = self.unit[np.sort(first)]  # units in order of first use
        first_batch = np.sort(first) // batch_size  # of each unit in that sequence
        # number of units first needed by batches < b, for every b (and b = count)
        self._first_counts = np.searchsorted(first_batch, np.arange(self.count + 1))
        last = len(order) - 1 - np.unique(self.unit[::-1], return_index=True)[1]
        units = np.unique(self.unit)
        last_batch = last // batch_size
        self._done_after = {b: units[last_batch == b] for b in np.unique(last_batch)}

    def first_unit_of_batch(self, b: int) -> int:
        """How many units of ``unit_sequence`` batches before ``b`` need."""
        return int(self._first_counts[min(b, self.count)])

    def units_last_used_by(self, b: int) -> np.ndarray:
        return self._done_after.get(b, np.empty(0, np.int64))

    def rows_needed(self, unit: int) -> tuple[int, int]:
        """``[lo, hi)``: the rows of ``unit`` this plan uses lie within them."""
        return self._lo[unit], self._hi[unit]

    def gather(self, b: int, unit_arrays: Any) -> dict[str, torch.Tensor]:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        rows = [unit_arrays(int(u)) for u in self.unit[sl]]
        at = self.offset[sl] - self.base[sl]  # arrays of a unit start at its first row read
        out = {}
        for name in rows[0]:
            out[name] = torch.from_numpy(np.stack([r[name][o] for r, o in zip(rows, at)]))
            # (B, ...)
        return out


__all__ = ["ArraySplit", "ShardSplit", "SplitReader", "Transform", "UnitCache"]
