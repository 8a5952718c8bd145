"""Where a training job's data is and how one unit of it is read: ``ShardSplit`` (Parquet
files and the rows of each row group, from the footers, read once on the driver; the
columns; the raw clip shape; an optional keep mask per file) and ``ArraySplit`` (columns in
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
OPEN_FILES = 64  # per reader thread (each open file keeps its footer in memory)


# ----------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class ShardSplit:
    """Parquet files of one split and their row groups: the units of the plan."""

    files: tuple[str, ...]
    group_rows: tuple[tuple[int, ...], ...]  # per file: rows in each row group
    columns: tuple[str, ...]
    clip_shape: tuple[int, ...] | None = None  # (T, H, W, 3) of a raw clip column
    keep: tuple[bytes, ...] | None = None  # per file: np.packbits of the kept rows

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
            group_rows = tuple(pool.map(_group_rows, files))
        packed = None
        if keep is not None:
            packed = tuple(np.packbits(np.asarray(k, bool)).tobytes() for k in keep)
        shape = tuple(int(v) for v in clip_shape) if clip_shape is not None else None
        return cls(tuple(files), group_rows, tuple(columns), shape, packed)

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


def _group_rows(uri: str) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    return tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))


# ----------------------------------------------------------------------------- unit readers
class ArrayUnits:
    """Units of an ``ArraySplit``: slices of its arrays (no bytes are read)."""

    def __init__(self, split: ArraySplit, span: int = 1) -> None:
        self.split, self.size = split, split.rows_per_unit * span
        self.bytes_read = self.footer_bytes = 0
        n = len(next(iter(split.arrays.values())))
        full, rest = divmod(n, self.size)
        self.unit_rows = np.asarray([self.size] * full + ([rest] if rest else []), np.int64)

    def read(self, unit: int) -> Arrays:
        lo = unit * self.size
        return {k: v[lo : lo + self.size] for k, v in self.split.arrays.items()}

    def close(self) -> None:
        pass


class ParquetUnits:
    """Units of a ``ShardSplit``: ``span`` consecutive row groups of a file each, read with
    one ``read_row_groups`` (one request on object storage: the column chunks of
    consecutive row groups lie together) on the storage root's filesystem. Thread-safe:
    every thread opens its own file handles (an LRU of ``OPEN_FILES``) over footers read
    once per worker. ``bytes_read`` counts the column chunks read from storage,
    ``footer_bytes`` the footers."""

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
        self._local = threading.local()
        self._open: set[Any] = set()  # every thread's open files, closed by close()

    def _metadata(self, index: int) -> Any:
        with self._lock:
            meta = self._meta.get(index)
        if meta is None:
            import pyarrow.parquet as pq

            fs, path = storage.filesystem(self.split.files[index])
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            sizes = _column_bytes(meta, self.split.columns)
            with self._lock:
                if index not in self._meta:
                    self._meta[index], self._sizes[index] = meta, sizes
                    self.footer_bytes += meta.serialized_size + 8  # footer, length, magic
        return meta

    def _file(self, index: int) -> Any:
        import pyarrow.parquet as pq

        handles = getattr(self._local, "files", None)
        if handles is None:
            handles = self._local.files = collections.OrderedDict()
        if index in handles:
            handles.move_to_end(index)
            return handles[index][1]
        meta = self._metadata(index)
        fs, path = storage.filesystem(self.split.files[index])
        raw = fs.open_input_file(path)
        remote = not storage.is_local(self.split.files[index])
        handles[index] = (raw, pq.ParquetFile(raw, metadata=meta, pre_buffer=remote))
        with self._lock:
            self._open.add(raw)
        if len(handles) > OPEN_FILES:
            old = handles.popitem(last=False)[1][0]
            with self._lock:
                self._open.discard(old)
            old.close()
        return handles[index][1]

    def read(self, unit: int) -> Arrays:
        index, first, count = self.spans[unit]
        parquet = self._file(index)
        groups = list(range(first, first + count))
        columns = list(self.split.columns)
        table = parquet.read_row_groups(groups, columns=columns, use_threads=False)
        size = (
            int(self._sizes[index][first])
            if count == 1
            else int(self._sizes[index][first : first + count].sum())
        )
        with self._lock:
            self.bytes_read += size
        out = {}
        for name in self.split.columns:
            shape = self.split.clip_shape if name == CLIP_COLUMN else None
            out[name] = decode_clips((table.schema.field(name), table.column(name)), shape)
        if self.masks is not None:
            lo, hi = self.file_starts[index][first], self.file_starts[index][first + count]
            kept = self.masks[index][lo:hi]
            out = {k: v[kept] for k, v in out.items()}
        return out

    def close(self) -> None:
        with self._lock:
            handles, self._open = list(self._open), set()
        for raw in handles:
            raw.close()
        self._local = threading.local()


__all__ = ["ArraySplit", "ArrayUnits", "Arrays", "ParquetUnits", "ShardSplit"]
