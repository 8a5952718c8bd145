"""Where a training job's data is and how one unit of it is read: ``ShardSplit`` (Parquet
files and the rows of each row group, from the footers, read once on the driver and
shipped with the split while they are small; the columns; the raw clip shape; the stored
bytes per row; an optional keep mask per file) and ``ArraySplit`` (columns in
memory: tests, probes, benchmarks of the loop alone). Both are small and picklable, shipped
to every worker; ``split.open(span)`` gives the worker's unit reader
(``vitok.platform.data.shard_reader`` reads through it)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitok.platform import storage
from vitok.platform.data.read_plan import unit_starts
from vitok.platform.data.shard_layout import CLIP_COLUMN, decode_clips

Arrays = dict[str, np.ndarray]
FOOTER_THREADS = 8
OPEN_FILES = 64  # open handles per reader thread
# The footers the driver read ride with the split to every worker while they total at most
# this much (a worker then reads none: on object storage each is a request, and a worker's
# first batches touch as many files as a batch has clips). Beyond it, each worker reads a
# file's footer the first time it reads from that file.
SHIPPED_FOOTER_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class ShardSplit:
    """Parquet files of one split and their row groups: the units of the plan."""

    files: tuple[str, ...]
    group_rows: tuple[tuple[int, ...], ...]  # per file: rows in each row group
    columns: tuple[str, ...]
    clip_shape: tuple[int, ...] | None = None  # (T, H, W, 3) of a raw clip column
    keep: tuple[bytes, ...] | None = None  # per file: np.packbits of the kept rows
    row_bytes: float = 0.0  # stored bytes of the columns read, per row (mean)
    # per file: its footer (``pq.FileMetaData``), while they total SHIPPED_FOOTER_BYTES
    footers: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_files(
        cls,
        files: Sequence[str],
        columns: Sequence[str],
        clip_shape: Sequence[int] | None = None,
        keep: Sequence[np.ndarray] | None = None,
    ) -> ShardSplit:
        """Reads every file's footer (on a few threads) for its row-group sizes."""
        with ThreadPoolExecutor(max(1, min(FOOTER_THREADS, len(files)))) as pool:
            metas = list(pool.map(_metadata, files))
        group_rows = tuple(
            tuple(m.row_group(g).num_rows for g in range(m.num_row_groups)) for m in metas
        )
        rows = sum(m.num_rows for m in metas)
        stored = sum(int(_column_bytes(m, columns).sum()) for m in metas)
        shipped = sum(m.serialized_size for m in metas) <= SHIPPED_FOOTER_BYTES
        packed = None
        if keep is not None:
            packed = tuple(np.packbits(np.asarray(k, bool)).tobytes() for k in keep)
        shape = tuple(int(v) for v in clip_shape) if clip_shape is not None else None
        return cls(
            tuple(files),
            group_rows,
            tuple(columns),
            shape,
            packed,
            row_bytes=stored / max(rows, 1),
            footers=tuple(metas) if shipped else None,
        )

    @property
    def unit_rows(self) -> np.ndarray:
        """Rows each row group (in file order) contributes, after the keep mask."""
        return self.spans(1)[1]

    def spans(self, span: int) -> tuple[list[tuple[int, int, int]], np.ndarray]:
        """Read units of ``span`` consecutive row groups of one file: ``(file, first group,
        groups)`` each, and the rows each contributes after the keep mask."""
        masks = self._masks() if self.keep is not None else None
        units, rows = [], []
        for index, groups in enumerate(self.group_rows):
            bounds = unit_starts(np.asarray(groups, np.int64))
            for first in range(0, len(groups), span):
                count = min(span, len(groups) - first)
                lo, hi = bounds[first], bounds[first + count]
                units.append((index, first, count))
                rows.append(int(masks[index][lo:hi].sum()) if masks else int(hi - lo))
        return units, np.asarray(rows, np.int64)

    def _masks(self) -> list[np.ndarray]:
        return [
            np.unpackbits(np.frombuffer(k, np.uint8), count=sum(rows)).astype(bool)
            for k, rows in zip(self.keep or (), self.group_rows)
        ]

    def open(self, span: int = 1) -> ParquetUnits:
        return ParquetUnits(self, span)


@dataclass(frozen=True)
class ArraySplit:
    """Columns in memory, ``(N, ...)`` each; units of ``rows_per_unit`` rows."""

    arrays: Mapping[str, np.ndarray] = field(hash=False)
    rows_per_unit: int = 1

    @property
    def unit_rows(self) -> np.ndarray:
        return self.open().unit_rows

    def open(self, span: int = 1) -> ArrayUnits:
        return ArrayUnits(self, span)


def _column_bytes(meta: Any, columns: Sequence[str]) -> np.ndarray:
    """Bytes stored of ``columns`` in each row group (what reading them fetches)."""
    leaves = [
        i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] in columns
    ]
    return np.asarray(
        [
            sum(meta.row_group(g).column(i).total_compressed_size for i in leaves)
            for g in range(meta.num_row_groups)
        ],
        np.int64,
    )


def _metadata(uri: str) -> Any:
    """A Parquet file's footer (``pq.FileMetaData``)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


# ----------------------------------------------------------------------------- unit readers
class ArrayUnits:
    """Units of an ``ArraySplit``: slices of its arrays (no bytes are read)."""

    def __init__(self, split: ArraySplit, span: int = 1) -> None:
        self.split, self.size = split, split.rows_per_unit * span
        self.bytes_read = self.footer_bytes = 0
        n = len(next(iter(split.arrays.values())))
        full, rest = divmod(n, self.size)
        self.unit_rows = np.asarray([self.size] * full + ([rest] if rest else []), np.int64)

    def read(self, unit: int, lo: int = 0, hi: int | None = None) -> Arrays:
        start = unit * self.size
        hi = int(self.unit_rows[unit]) if hi is None else hi
        return {k: v[start + lo : start + hi] for k, v in self.split.arrays.items()}

    def close(self) -> None:
        pass


class ParquetUnits:
    """Units of a ``ShardSplit``: ``span`` consecutive row groups of a file each, read with
    one ``read_row_groups`` (one request on object storage: the column chunks of
    consecutive row groups lie together) on the storage root's filesystem. Thread-safe:
    every thread opens its own file handles (an LRU of ``OPEN_FILES``) over the footers
    shipped with the split (or read once per worker). ``bytes_read`` counts the column
    chunks read from storage, ``footer_bytes`` the footers read."""

    def __init__(self, split: ShardSplit, span: int = 1) -> None:
        self.split = split
        self.spans, self.unit_rows = split.spans(span)
        self.masks = split._masks() if split.keep is not None else None
        self.file_starts = [unit_starts(np.asarray(r, np.int64)) for r in split.group_rows]
        self.bytes_read = 0  # column chunks of the units read
        self.footer_bytes = 0  # footers, once per file and worker
        self._meta: dict[int, Any] = {}
        self._sizes: dict[int, np.ndarray] = {}  # per file: bytes of each row group's columns
        self._lock = threading.Lock()
        self._file_locks: dict[int, threading.Lock] = {}
        self._local = threading.local()
        self._open: set[Any] = set()  # every thread's open files, closed by close()

    def _metadata(self, index: int) -> Any:
        """File ``index``'s footer: shipped with the split, or read once per worker (one
        lock per file: threads wanting the same footer wait for one read)."""
        with self._lock:
            meta = self._meta.get(index)
            lock = self._file_locks.setdefault(index, threading.Lock())
        if meta is not None:
            return meta
        with lock:
            with self._lock:
                meta = self._meta.get(index)
            if meta is not None:
                return meta
            shipped = self.split.footers
            meta = shipped[index] if shipped else _metadata(self.split.files[index])
            sizes = _column_bytes(meta, self.split.columns)
            with self._lock:
                self._meta[index], self._sizes[index] = meta, sizes
                if not shipped:
                    self.footer_bytes += meta.serialized_size + 8  # footer, length, magic
        return meta

    def _file(self, index: int) -> Any:
        """A ``pq.ParquetFile`` of file ``index`` for one read, over this thread's open
        handle of the file. A new one each read: on object storage it pre-buffers (one
        request for the row groups read) and keeps that buffer until its next read, so a
        kept one would hold a read's worth of memory per file and thread."""
        import pyarrow.parquet as pq

        handles = getattr(self._local, "files", None)
        if handles is None:
            handles = self._local.files = collections.OrderedDict()
        if index in handles:
            handles.move_to_end(index)
        else:
            fs, path = storage.filesystem(self.split.files[index])
            handles[index] = raw = fs.open_input_file(path)
            with self._lock:
                self._open.add(raw)
            if len(handles) > OPEN_FILES:
                old = handles.popitem(last=False)[1]
                with self._lock:
                    self._open.discard(old)
                old.close()
        remote = not storage.is_local(self.split.files[index])
        return pq.ParquetFile(handles[index], metadata=self._metadata(index), pre_buffer=remote)

    def read(self, unit: int, lo: int = 0, hi: int | None = None) -> Arrays:
        """Rows ``[lo, hi)`` of ``unit`` (after the keep mask; all of it by default), read
        with one request: only the row groups that hold them."""
        index, first, count = self.spans[unit]
        hi = int(self.unit_rows[unit]) if hi is None else hi
        starts = self.file_starts[index]
        base = int(starts[first])
        bounds = starts[first : first + count + 1] - base  # row groups' rows in the unit
        kept = None
        if self.masks is not None:
            kept = np.flatnonzero(self.masks[index][base : base + int(bounds[-1])])
        raw_lo, raw_hi = (lo, hi) if kept is None else (int(kept[lo]), int(kept[hi - 1]) + 1)
        g0 = int(np.searchsorted(bounds, raw_lo, side="right")) - 1
        g1 = int(np.searchsorted(bounds, raw_hi, side="left"))
        parquet = self._file(index)
        groups = list(range(first + g0, first + g1))
        columns = list(self.split.columns)
        table = parquet.read_row_groups(groups, columns=columns, use_threads=False)
        size = int(self._sizes[index][first + g0 : first + g1].sum())
        with self._lock:
            self.bytes_read += size
        out = {}
        for name in self.split.columns:
            shape = self.split.clip_shape if name == CLIP_COLUMN else None
            out[name] = decode_clips((table.schema.field(name), table.column(name)), shape)
        # The rows read run over raw rows [bounds[g0], bounds[g1]) of the unit: keep what
        # the mask keeps, then the requested rows.
        a, b = int(bounds[g0]), int(bounds[g1])
        if kept is None:
            pick = slice(lo - a, hi - a)
            return {k: v[pick] for k, v in out.items()}
        window = self.masks[index][base + a : base + b]
        skip = int(np.searchsorted(kept, a))  # kept rows before the first row group read
        return {k: v[window][lo - skip : hi - skip] for k, v in out.items()}

    def close(self) -> None:
        with self._lock:
            handles, self._open = list(self._open), set()
        for raw in handles:
            raw.close()
        self._local = threading.local()


__all__ = ["ArraySplit", "ArrayUnits", "Arrays", "ParquetUnits", "ShardSplit"]
