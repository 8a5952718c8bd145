"""How clip shards are laid out in Parquet, for the training read path
(``vitok.platform.data.shard_reader``), and how a clip column is encoded and decoded.

Layout (``parquet_write_options``): one clip per row group, so a row group is the unit of the
per-epoch global permutation (a real shuffle: a row group of several consecutive clips of
one video would put those clips in one batch), and a worker reads exactly the clips it
trains on. No compression and no dictionary: a clip's bytes are read with one range read
and no decode (snappy gains nothing on pixels, and Parquet's dictionary-encoded list of
uint8 decodes at about a tenth of a memory copy's speed; ``benchmark.py ingest`` prints it).

Encodings of the ``clip`` column (``encode_clips`` / ``decode_clips``):

- ``raw``: one binary value per clip, its ``(T, H, W, 3)`` uint8 bytes (the shape is the
  manifest's ``clip_shape``);
- ``jpeg`` / ``webp``: a list of one encoded image per frame (Pillow), ``quality`` 1-100;
- shards written before this layout hold a tensor column (a list of uint8 per row, the
  shape in its type): read as they are.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

CLIP_ENCODINGS = ("raw", "jpeg", "webp")
CLIP_COLUMN = "clip"


def parquet_write_options() -> dict[str, Any]:
    """``write_parquet`` keyword arguments of a clip (or latent) shard: one row per row
    group, uncompressed, no dictionary, no statistics (nobody filters on them, and they
    would grow the footer by two values per column and row group)."""
    return {
        "row_group_size": 1,
        "compression": "none",
        "use_dictionary": False,
        "write_statistics": False,
    }


def write_shards(
    ds: Any,
    path: str,
    *,
    encoding: str = "raw",
    quality: int = 90,
    remote_args: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    """``ds.write_parquet(path, **kw)`` with the clip column encoded and the layout above.

    The encoding is a map over the producing tasks' output; give it their ``remote_args``
    (``num_cpus``, ``max_retries``...) and Ray Data fuses it into them (no extra task, no
    copy of the clips through the object store)."""
    import warnings

    check_encoding(encoding, quality)
    with warnings.catch_warnings():  # max_retries is only accepted as a remote arg
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        encoded = ds.map_batches(
            encode_batch,
            batch_format="numpy",
            fn_kwargs={"encoding": encoding, "quality": quality},
            **(remote_args or {}),
        )
    encoded.write_parquet(path, **kw, **parquet_write_options())


def check_encoding(encoding: str, quality: int) -> None:
    if encoding not in CLIP_ENCODINGS:
        raise ValueError(f"clip_encoding={encoding!r} is not one of {list(CLIP_ENCODINGS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"clip_quality={quality!r} must lie in [1, 100]")


def encode_batch(
    batch: dict[str, np.ndarray], *, encoding: str, quality: int
) -> dict[str, np.ndarray]:
    """A Ray Data batch with ``clip`` (N, T, H, W, 3) uint8 -> the same with ``clip`` as one
    encoded value per row (an object array: bytes, or a list of bytes per frame)."""
    if CLIP_COLUMN not in batch:
        return batch
    return {**batch, CLIP_COLUMN: encode_clips(batch[CLIP_COLUMN], encoding, quality)}


def encode_clips(clips: np.ndarray, encoding: str = "raw", quality: int = 90) -> np.ndarray:
    """(N, T, H, W, 3) uint8 -> an object array of N encoded clips."""
    clips = np.ascontiguousarray(clips, dtype=np.uint8)
    out = np.empty(len(clips), dtype=object)
    for i, clip in enumerate(clips):
        if encoding == "raw":
            out[i] = clip.tobytes()
        else:
            out[i] = [_encode_frame(frame, encoding, quality) for frame in clip]
    return out


def _encode_frame(frame: np.ndarray, encoding: str, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(frame)
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def decode_clips(column: Any, shape: Sequence[int] | None = None) -> np.ndarray:
    """A clip (or latent) column of one table or batch -> ``(N, *shape)`` numpy.

    Handles every stored form: a binary column of raw bytes (``shape`` needed), a list of
    encoded frames per row (JPEG or WebP), and a tensor column (a list of values per row,
    the shape in the extension type or in the field's metadata; ``column`` may then be a
    ``(field, array)`` pair). Raw and tensor columns are views of the Arrow buffers.
    """
    import pyarrow as pa

    field = None
    if isinstance(column, tuple):
        field, column = column
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:  # one array per chunk, then one copy
            parts = [decode_clips((field, c) if field else c, shape) for c in column.chunks]
            return np.concatenate(parts) if parts else np.zeros((0, *(shape or ())), np.uint8)
        column = column.chunk(0)  # (combine_chunks would copy even a single chunk)
    n = len(column)
    if isinstance(column.type, pa.ExtensionType):
        shape = getattr(column.type, "shape", None) or shape
        column = column.storage
    elif field is not None and shape is None:
        shape = _shape_from_metadata(field)
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if shape is None:
            raise ValueError("a raw clip column needs its shape (the manifest's clip_shape)")
        offsets = np.frombuffer(column.buffers()[1], _offset_dtype(kind))
        offsets = offsets[column.offset : column.offset + n + 1]
        data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        return data.reshape(n, *shape)  # (N, T, H, W, 3), a view
    if _is_list(kind) and (pa.types.is_binary(kind.value_type)):
        frames = column.flatten()  # one encoded image per frame
        images = [_decode_frame(frames[i].as_py()) for i in range(len(frames))]
        lengths = np.diff(np.asarray(column.offsets))
        return np.stack(images).reshape(n, int(lengths[0]) if n else 0, *images[0].shape)
    if _is_list(kind):
        values = column.flatten().to_numpy(zero_copy_only=False)
        if shape is None:
            raise ValueError(f"the tensor column ({kind}) carries no shape; pass one")
        return values.reshape(n, *shape)
    return column.to_numpy(zero_copy_only=False)


def _decode_frame(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _offset_dtype(kind: Any) -> type:
    import pyarrow as pa

    return np.int64 if pa.types.is_large_binary(kind) else np.int32


def _shape_from_metadata(field: Any) -> tuple[int, ...] | None:
    """A tensor column's shape where Ray's extension type is not registered in this process:
    Ray keeps it in the field's ``ARROW:extension:metadata``."""
    meta = field.metadata or {}
    raw = meta.get(b"ARROW:extension:metadata")
    if raw is None:
        return None
    value = json.loads(raw)
    shape = value.get("shape") if isinstance(value, dict) else value
    return tuple(int(v) for v in shape) if shape is not None else None


def decode_batch(batch: dict[str, np.ndarray], *, shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Ray Data batch (numpy format) whose ``clip`` column is encoded -> ``(N, *shape)``
    uint8 clips; a batch already holding arrays passes through."""
    column = batch.get(CLIP_COLUMN)
    if column is None or column.dtype != object:
        return batch
    first = column[0] if len(column) else None
    if isinstance(first, bytes | bytearray):
        flat = np.frombuffer(b"".join(column), np.uint8)
        clips = flat.reshape(len(column), *shape)
    else:
        clips = (
            np.stack([np.stack([_decode_frame(bytes(f)) for f in frames]) for frames in column])
            if len(column)
            else np.zeros((0, *shape), np.uint8)
        )
    return {**batch, CLIP_COLUMN: clips}


__all__ = [
    "CLIP_COLUMN",
    "CLIP_ENCODINGS",
    "check_encoding",
    "decode_batch",
    "decode_clips",
    "encode_batch",
    "encode_clips",
    "parquet_write_options",
    "write_shards",
]
