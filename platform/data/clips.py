"""Clip shards read back: ``clip_splits(prepared)``, what a training job reads (each worker
its share, straight from the files: ``vitok.platform.data.shard_reader``), ``clip_dataset(prepared,
split)`` as a Ray Dataset (batch inference, generation metrics), and ``to_model_input``, which
turns a uint8 batch into the model's float input in [-1, 1] with random crop and flip
(training) or a centre crop (evaluation)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.data.shard_checks import read_parquet_columns
from vitok.platform.data.shard_layout import CLIP_COLUMN, decode_batch, decode_clips
from vitok.platform.data.shard_splits import ShardSplit

if TYPE_CHECKING:
    from vitok.platform.data.config import PreparedData

TENSOR_COLUMNS = ("clip", "label")


# Light tasks (shard reads and writes, row tagging, filtering) ask a quarter CPU each, so
# they still schedule beside training workers, encoder actors and trial drivers on a
# 2-core machine; Ray's default of one whole CPU per task deadlocks concurrent trials there.
LIGHT_TASK_CPUS = 0.25


def clip_dataset(
    prepared: PreparedData,
    split: str,
    *,
    columns: Iterable[str] | None = TENSOR_COLUMNS,
    weights: tuple[float, ...] | None = None,
) -> Any:
    """The clips of one split as a ``ray.data.Dataset``.

    Columns: ``clip`` ``(T, H, W, 3)`` uint8 and ``label`` int64 by default (ready for
    ``iter_torch_batches``); ``columns=None`` also keeps ``path``, ``start_s``, ``fps``,
    ``clip_index`` and ``source_id``. ``weights`` (one per source; default: the config's)
    mix the training split by keeping a deterministic fraction of each source's clips.
    The stored clip encoding (``shard_layout``) is decoded in the read tasks.
    """

    if prepared.count(split) == 0:
        raise ValueError(f"split={split!r} of {prepared.root} holds no clips")
    ds = read_shards(prepared.files(split))
    cfg_weights = tuple(prepared.manifest["config"].get("weights") or ())
    weights = cfg_weights if weights is None else weights
    if split == "train" and weights:
        ds = ds.map_batches(
            _keep_fraction,
            batch_format="numpy",
            num_cpus=LIGHT_TASK_CPUS,
            fn_kwargs={"keep": _mix_fractions(prepared, weights)},
        )
    if columns is not None:
        ds = ds.select_columns(list(columns))
    if columns is None or CLIP_COLUMN in columns:
        ds = ds.map_batches(
            decode_batch,
            batch_format="numpy",
            num_cpus=LIGHT_TASK_CPUS,
            fn_kwargs={"shape": tuple(prepared.manifest["clip_shape"])},
        )
    return ds


def clip_splits(prepared: PreparedData) -> dict[str, ShardSplit]:
    """What a training job reads: the "train" split (mixed by the config's weights) and,
    when there is one, the "val" split, as ``ShardSplit``s (``clip`` and ``label``).

    Kept per process and shard list: building one reads every shard's footer (its row
    groups), and a study's trial process (reused by Tune) asks for the same splits trial
    after trial.
    """
    files = (tuple(prepared.files("train")), tuple(prepared.files("val")))
    weights = tuple(prepared.manifest["config"].get("weights") or ())
    key = (files, weights)
    if key not in _SPLITS:
        shape = tuple(prepared.manifest["clip_shape"])
        keep = _keep_masks(prepared, weights) if weights else None
        splits = {"train": ShardSplit.from_files(files[0], TENSOR_COLUMNS, shape, keep)}
        if prepared.num_val:
            splits["val"] = ShardSplit.from_files(files[1], TENSOR_COLUMNS, shape)
        _SPLITS.clear()  # one entry: a process works on one data config at a time
        _SPLITS[key] = splits
    return dict(_SPLITS[key])


_SPLITS: dict[tuple[Any, ...], dict[str, ShardSplit]] = {}


def _keep_masks(prepared: PreparedData, weights: tuple[float, ...]) -> list[np.ndarray]:
    """Per training shard, which rows a mix by ``weights`` keeps (``_keep_fraction``)."""
    keep = _mix_fractions(prepared, weights)
    masks = []
    for uri in prepared.files("train"):
        table = read_parquet_columns(uri, ["path", "clip_index", "source_id"])
        masks.append(_keep_mask({c: table.column(c).to_numpy() for c in table.column_names}, keep))
    return masks


def clip_datasets(prepared: PreparedData) -> dict[str, Any]:
    """The "train" split and, when there is one, the "val" split, as ``clip_dataset``s.

    Kept per process, Ray job and shard list: creating a Parquet dataset samples its files
    in a Ray task (seconds when it has to start a worker process on a busy machine), and a
    study's trial process (reused by Tune) asks for the same splits trial after trial. A
    Dataset is a lazy plan, so each Ray Train run still executes its own read.
    """
    import ray

    files = tuple(prepared.files("train")) + tuple(prepared.files("val"))
    job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    key = (job, files)
    if key not in _DATASETS:
        datasets = {"train": clip_dataset(prepared, "train")}
        if prepared.num_val:
            datasets["val"] = clip_dataset(prepared, "val")
        _DATASETS.clear()  # one entry: a process works on one data config at a time
        _DATASETS[key] = datasets
    return dict(_DATASETS[key])


_DATASETS: dict[tuple[Any, ...], dict[str, Any]] = {}


def first_clips(prepared: PreparedData, split: str, count: int) -> np.ndarray:
    """The first ``count`` clips of a split as ``(N, T, H, W, 3)`` uint8, read straight from
    its shard files: a handful of clips for a figure is no job for a Ray Data execution
    (whose read tasks start worker processes: seconds on a busy small machine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: list[np.ndarray] = []
    left = count
    for uri in prepared.files(split):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:  # only the rows needed, not the whole shard
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=left, columns=["clip"]), None)
        if batch is not None:
            table = pa.Table.from_batches([batch])
            column = (table.schema.field("clip"), table.column("clip"))
            out.append(np.array(decode_clips(column, prepared.manifest["clip_shape"])))
            left -= len(out[-1])
        if left <= 0:
            break
    return np.concatenate(out)


def read_shards(paths: str | list[str], *, partitioning: Any = None) -> Any:
    """``ray.data.read_parquet`` of our shards, sized to share a small machine.

    Read tasks ask a quarter CPU. Ray Data's V2 reader adds a ListFiles step that always
    asks a whole CPU and takes no remote args; beside a trial driver and training workers
    on 2 cores, two of those deadlock concurrent trials, so these reads use the V1 path
    (the setting is copied into this dataset alone, at creation).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            paths,
            partitioning=partitioning,
            ray_remote_args={"num_cpus": LIGHT_TASK_CPUS},
        )
    finally:
        ctx.use_datasource_v2 = previous


def _mix_fractions(prepared: PreparedData, weights: tuple[float, ...]) -> list[float]:
    """Per-source keep fractions so kept clip counts are proportional to ``weights``."""
    n_sources = len(prepared.manifest["config"]["sources"])
    if len(weights) != n_sources:
        raise ValueError(f"weights={weights!r} must have one entry per source ({n_sources})")
    counts = [0] * n_sources
    for uri in prepared.files("train"):
        for sid in read_parquet_columns(uri, ["source_id"]).column("source_id").to_pylist():
            counts[sid] += 1
    present = [i for i in range(n_sources) if counts[i] and weights[i] > 0]
    scale = min(counts[i] / weights[i] for i in present)
    return [scale * weights[i] / counts[i] if i in present else 0.0 for i in range(n_sources)]


def _keep_mask(batch: dict[str, np.ndarray], keep: list[float]) -> np.ndarray:
    """Rows a mix keeps: a hash of (path, clip index) below its source's keep fraction."""
    score = np.array(
        [
            zlib.crc32(f"{p}:{c}".encode()) / 2**32
            for p, c in zip(batch["path"], batch["clip_index"])
        ]
    )
    return score < np.asarray(keep)[batch["source_id"]]


def _keep_fraction(batch: dict[str, np.ndarray], *, keep: list[float]) -> dict[str, np.ndarray]:
    mask = _keep_mask(batch, keep)
    return {k: v[mask] for k, v in batch.items()}


def to_model_input(
    clips: torch.Tensor | np.ndarray,
    *,
    crop: tuple[int, int] | None,
    flip: bool,
    generator: torch.Generator | None = None,
    random_crop: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 clips ``(B, T, H, W, 3)`` -> model input ``(B, T, h, w, 3)`` in [-1, 1].

    ``crop=(h, w)`` takes a random crop per clip when ``random_crop`` (default: same as
    ``flip``, i.e. training) and the centre crop otherwise; ``flip`` mirrors each clip
    horizontally with probability 1/2. Randomness comes from ``generator``.
    ``dtype=torch.uint8`` keeps the crops and flips in uint8, unscaled: ``pixels_to_unit``
    scales them later (on the device, see ``ClipBatch``), to the same values.
    """
    x = clips if isinstance(clips, torch.Tensor) else torch.from_numpy(np.array(clips))
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    b, t, h, w, _ = x.shape
    ch, cw = (h, w) if crop is None else crop
    if ch > h or cw > w:
        raise ValueError(f"crop={tuple(crop)!r} must fit inside the clips' {h}x{w}")
    random_crop = flip if random_crop is None else random_crop
    if random_crop and (ch, cw) != (h, w):
        top = torch.randint(0, h - ch + 1, (b,), generator=generator).tolist()
        left = torch.randint(0, w - cw + 1, (b,), generator=generator).tolist()
    else:
        top, left = [(h - ch) // 2] * b, [(w - cw) // 2] * b
    mirror = [False] * b
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).tolist()  # (B,)
    # Clip by clip: crop (a view), mirror (a copy of that clip only), copied straight into
    # the output batch and, for a float one, scaled in place while it is in cache (a pass
    # over the whole batch afterwards would go to memory again).
    out = torch.empty((b, t, ch, cw, 3), dtype=dtype)
    for i in range(b):
        clip = x[i, :, top[i] : top[i] + ch, left[i] : left[i] + cw]  # (T, ch, cw, 3)
        into = out[i].copy_(clip.flip(2) if mirror[i] else clip)
        if dtype != torch.uint8:
            _to_unit_range(into)
    return out


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """In place: float pixel values in [0, 255] -> [-1, 1] (x / 127.5 - 1)."""
    return x.div_(127.5).sub_(1.0)


def pixels_to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 crops (``to_model_input(..., dtype=torch.uint8)``) -> ``dtype`` in [-1, 1],
    on whatever device ``x`` is: computed in float32 and then cast, as ``to_model_input``
    and the loop's cast to the worker's dtype do, so the values are the same bits."""
    return _to_unit_range(x.to(torch.float32)).to(dtype)


def model_batches(
    source: Any,
    *,
    batch_size: int,
    crop: tuple[int, int] | None,
    train: bool,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x (B, T, h, w, 3) float in [-1, 1], labels (B,) int64)`` from a Dataset or a
    ``ray.train.get_dataset_shard`` iterator holding ``clip`` and ``label`` columns."""
    generator = torch.Generator().manual_seed(seed)
    for batch in source.iter_torch_batches(
        batch_size=batch_size, dtypes=None, device="cpu", drop_last=drop_last
    ):
        x = to_model_input(batch["clip"], crop=crop, flip=train, generator=generator, dtype=dtype)
        yield x, batch["label"]


@dataclass(frozen=True)
class ClipBatch:
    """Shard batch -> task batch, on the worker: crop/flip for training, centre crop for
    evaluation, in uint8 (in the reader thread, ahead of the step); ``on_device`` scales
    them to [-1, 1] once they are on the worker's device. A uint8 batch is a quarter of
    the float one's bytes through host memory, pinned buffers and the copy to a GPU, and
    writing the float batch was most of a reader's per-clip work (README: the read path)."""

    crop: tuple[int, int] | None

    def __call__(self, batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator):
        x = to_model_input(
            batch["clip"], crop=self.crop, flip=training, generator=gen, dtype=torch.uint8
        )
        return {"x": x, "label": batch["label"]}

    def on_device(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
        return {**batch, "x": pixels_to_unit(batch["x"], dtype)}
