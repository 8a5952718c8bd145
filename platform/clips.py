"""Clip shards read back: ``clip_dataset(prepared, split)`` as a Ray Dataset for
``ray.train.get_dataset_shard``, and ``to_model_input``, which turns a uint8 batch into the
model's float input in [-1, 1] with random crop and flip (training) or a centre crop
(evaluation)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.pixel_metrics import to_unit_float
from vitok.platform.shard_checks import read_parquet_columns

if TYPE_CHECKING:
    from vitok.platform.data import PreparedData

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
    return ds


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
            out.append(_clip_array(pa.Table.from_batches([batch])))
            left -= len(out[-1])
        if left <= 0:
            break
    return np.concatenate(out)


def _clip_array(table: Any) -> np.ndarray:
    """A shard's ``clip`` column (Ray Data's tensor extension: a list of uint8 per row, the
    shape in the type, or in the field's metadata where Ray has not registered the type)."""
    import pyarrow as pa

    column = table.column("clip").combine_chunks()
    shape = getattr(column.type, "shape", None)
    if shape is None:
        meta = table.schema.field("clip").metadata or {}
        shape = json.loads(meta[b"ARROW:extension:metadata"])
    lists = column.storage if isinstance(column.type, pa.ExtensionType) else column
    return lists.flatten().to_numpy().reshape(len(column), *shape)


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


def _keep_fraction(batch: dict[str, np.ndarray], *, keep: list[float]) -> dict[str, np.ndarray]:
    score = np.array(
        [
            zlib.crc32(f"{p}:{c}".encode()) / 2**32
            for p, c in zip(batch["path"], batch["clip_index"])
        ]
    )
    mask = score < np.asarray(keep)[batch["source_id"]]
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
    """
    x = clips if isinstance(clips, torch.Tensor) else torch.from_numpy(np.array(clips))
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    b, _, h, w, _ = x.shape
    random_crop = flip if random_crop is None else random_crop
    if crop is not None and tuple(crop) != (h, w):
        ch, cw = crop
        if ch > h or cw > w:
            raise ValueError(f"crop={tuple(crop)!r} must fit inside the clips' {h}x{w}")
        if random_crop:
            top = torch.randint(0, h - ch + 1, (b,), generator=generator).tolist()
            left = torch.randint(0, w - cw + 1, (b,), generator=generator).tolist()
            x = torch.stack(
                [x[i, :, t : t + ch, s : s + cw] for i, (t, s) in enumerate(zip(top, left))]
            )  # (B, T, ch, cw, 3)
        else:
            t, s = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, t : t + ch, s : s + cw]  # (B, T, ch, cw, 3)
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5  # (B,)
        x = torch.where(mirror[:, None, None, None, None], x.flip(3), x)
    return to_unit_float(x, dtype)


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
    """Ray Data batch -> task batch, on the worker: crop/flip for training, centre crop for
    evaluation, values in [-1, 1]."""

    crop: tuple[int, int] | None

    def __call__(self, batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator):
        x = to_model_input(batch["clip"], crop=self.crop, flip=training, generator=gen)
        return {"x": x, "label": batch["label"]}
