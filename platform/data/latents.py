"""Latent extraction as Ray Data batch inference, and the latents' per-channel statistics.

``extract_latents(datasets, encoder_factory, out_dir)`` runs a frozen encoder over clip
datasets on an actor pool (``map_batches`` with ``ActorPoolStrategy``; each actor builds its
encoder once from a picklable factory) and writes ``latent`` + ``label`` rows to Parquet,
one folder per split. The per-channel mean and std of the *training* latents go to
``latent_stats.json`` beside them; a generator trains on ``stats.normalise(z)``.

The platform never imports a model: the caller passes ``encoder_factory``, a picklable
callable ``factory(device) -> encode`` where ``encode(clips)`` maps a uint8 batch
``(B, T, H, W, 3)`` to latents ``(B, ..., c)`` (channels last).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitok.platform import storage
from vitok.platform.data.clips import LIGHT_TASK_CPUS, read_shards
from vitok.platform.data.shard_layout import parquet_write_options
from vitok.platform.data.shard_splits import ShardSplit

MANIFEST_FILE = "latents.json"
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
EncoderFactory = Callable[[str], EncodeFn]


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of latents (channels last), from ``count`` vectors."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean ({len(self.mean)}) and std ({len(self.std)}) must match")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std={self.std!r} must be > 0 in every channel")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _vectors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.channels:
            raise ValueError(f"latents have {z.shape[-1]} channels, stats {self.channels}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=z.device)  # (c,)
        std = torch.tensor(self.std, dtype=torch.float32, device=z.device)  # (c,)
        return mean, std

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., c) -> (z - mean) / std, float32."""
        mean, std = self._vectors(z)
        return (z.float() - mean) / std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalise``: (..., c) -> z * std + mean, float32."""
        mean, std = self._vectors(z)
        return z.float() * std + mean

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["count"]))


@dataclass(frozen=True)
class LatentBatch:
    """Ray Data batch -> task batch on the worker: normalised latents and labels."""

    stats: LatentStats

    def __call__(self, batch: dict[str, torch.Tensor], training: bool, gen: torch.Generator):
        return {"z": self.stats.normalise(batch["latent"]), "label": batch["label"]}


class ChannelMoments:
    """Exact float64 sums per channel (n, sum z, sum z^2), mergeable across batches."""

    def __init__(self) -> None:
        self.count = 0
        self.total: np.ndarray | None = None  # (c,)
        self.squares: np.ndarray | None = None  # (c,)

    def update(self, z: np.ndarray | torch.Tensor) -> None:
        """z: (..., c), every leading position one vector."""
        x = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z, np.float64)
        x = x.reshape(-1, x.shape[-1])  # (N, c)
        if self.total is None:
            self.total, self.squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.squares += np.square(x).sum(axis=0)

    def stats(self, eps: float = 1e-6) -> LatentStats:
        """Mean and population std (floored at ``eps``) per channel."""
        if self.total is None or self.count == 0:
            raise ValueError("no latents were seen; cannot compute statistics")
        mean = self.total / self.count
        var = np.clip(self.squares / self.count - mean**2, 0.0, None)
        std = np.maximum(np.sqrt(var), eps)
        return LatentStats(tuple(mean.tolist()), tuple(std.tolist()), self.count)


# ----------------------------------------------------------------------------- inference
class LatentEncoder:
    """Ray Data callable class: builds the encoder once per actor, encodes each batch.

    {clip: (B, T, H, W, 3) uint8, label: (B,), ...} -> {latent: (B, ..., c) float32, label: (B,),
    ...}; other columns pass through.
    """

    def __init__(
        self,
        factory: EncoderFactory,
        device: str = "cpu",
        column: str = "clip",
        num_threads: int = 0,
    ) -> None:
        if num_threads > 0 and device == "cpu":
            torch.set_num_threads(num_threads)
        self.encode = factory(device)
        self.device = device
        self.column = column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch[self.column]
        if column.dtype == object:  # ragged tensor column: one array per row
            column = np.stack(list(column))
        clips = torch.from_numpy(np.array(column)).to(self.device)  # Ray hands read-only views
        with torch.no_grad():
            latents = self.encode(clips).float().cpu().numpy()
        out = {"latent": latents, "label": np.asarray(batch["label"], np.int64)}
        for key in batch.keys() - {self.column, "label"}:  # pass-through columns (split)
            out[key] = batch[key]
        return out


@dataclass(frozen=True)
class LatentSet:
    """The latents committed by one ``extract_latents`` call (``root/latents.json`` lists
    every file; readers use exactly those)."""

    root: str  # a local folder or a URI under the storage root
    splits: dict[str, list[str]]  # split -> its Parquet files
    counts: dict[str, int]  # split -> rows
    latent_shape: tuple[int, ...]  # one row's latent, channels last
    stats: LatentStats  # over the training split
    reused: bool
    pooled_files: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> .npy

    def pooled(self, split: str) -> np.ndarray:
        """(N, c) float32: each latent's mean over its tokens (the split's rows, any order)."""
        return np.load(io.BytesIO(storage.read_bytes(self.pooled_files[split])))

    def dataset(self, split: str) -> Any:
        """One split as a ``ray.data.Dataset`` with ``latent`` and ``label`` columns."""
        ds = read_shards(self._files(split))
        return ds.select_columns(["latent", "label"])

    def split(self, split: str) -> ShardSplit:
        """One split as a training job reads it (``latent`` and ``label``; each worker its
        share, straight from the files)."""
        return ShardSplit.from_files(self._files(split), ("latent", "label"))

    def _files(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not allowed; choose one of {list(self.splits)}")
        return self.splits[split]


def load_latent_set(root: str) -> LatentSet | None:
    """The committed latents under ``root``, or None when nothing was committed there."""
    manifest_uri = storage.join(root, MANIFEST_FILE)
    if not storage.is_file(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    files = manifest["files"]
    return LatentSet(
        root=root,
        splits={s: [storage.join(root, p) for p in files[s]] for s in manifest["counts"]},
        counts={s: int(n) for s, n in manifest["counts"].items()},
        latent_shape=tuple(manifest["latent_shape"]),
        stats=LatentStats(
            tuple(manifest["stats"]["mean"]),
            tuple(manifest["stats"]["std"]),
            int(manifest["stats"]["count"]),
        ),
        reused=True,
        pooled_files={s: storage.join(root, p) for s, p in manifest["pooled"].items()},
    )


def keyed_dir(out_root: str, info: Mapping[str, Any]) -> str:
    """``out_root/<key>``: a folder keyed by a hash of ``info`` (encoder checkpoint, config,
    data hash ...), so other inputs never reuse stale latents."""
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(out_root, key)


def extract_latents(
    datasets: Mapping[str, Any],
    encoder_factory: EncoderFactory,
    out_dir: str,
    *,
    num_actors: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    column: str = "clip",
    stats_split: str = "train",
    info: Mapping[str, Any] | None = None,
) -> LatentSet:
    """Encode every split of ``datasets`` into Parquet under ``out_dir``, or reuse them.

    ``datasets``: split name -> Ray Dataset with ``column`` (uint8 clips) and ``label``.
    The caller keys ``out_dir`` (a folder or URI under the storage root; for example by
    encoder checkpoint and data hash). Files go under ``out_dir/attempts/<id>/`` and are
    committed by ``latents.json`` written last (with the per-channel statistics over
    ``stats_split`` and ``info``); a committed ``out_dir`` is reused untouched.
    """
    out = storage.resolve_root(str(out_dir))  # actors run in another directory
    existing = load_latent_set(out)
    if existing is not None:
        return existing
    if stats_split not in datasets:
        raise ValueError(f"stats_split={stats_split!r} is not among {list(datasets)}")
    t0 = time.perf_counter()
    prefix = f"attempts/{storage.attempt_id()}"
    encode = {
        "factory": encoder_factory,
        "device": "cuda" if num_gpus > 0 else "cpu",
        "column": column,
        "num_threads": max(1, int(num_cpus)),
    }
    pool = {"num_actors": num_actors, "batch_size": batch_size, "cpus": num_cpus, "gpus": num_gpus}
    _write_encoded(datasets, column, encode, pool, storage.join(out, prefix))
    files = {}
    for split in datasets:
        folder = storage.join(out, prefix, "shards", f"split={split}")
        rels = storage.list_files(folder, ".parquet")
        if not rels:
            raise ValueError(f"split={split!r} holds no clips; pass only non-empty splits")
        files[split] = [f"{prefix}/shards/split={split}/{rel}" for rel, _ in rels]
    manifest = _summarise(out, prefix, files, stats_split)
    manifest.update(info=dict(info or {}), seconds=round(time.perf_counter() - t0, 3))
    storage.write_json(storage.join(out, MANIFEST_FILE), manifest)  # the commit
    counts, shape = manifest["counts"], tuple(manifest["latent_shape"])
    print(
        f"[vitok.latents] wrote {out}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f" latents of {shape}, {time.perf_counter() - t0:.1f} s"
    )
    return dataclasses.replace(load_latent_set(out), reused=False)


def _write_encoded(
    datasets: Mapping[str, Any],
    column: str,
    encode: dict[str, Any],
    pool: dict[str, Any],
    work: str,
) -> None:
    """Encode every split with one actor pool (rows tagged with their split) and write the
    latents as Parquet under ``work/shards/split=<split>/``."""
    from ray.data import ActorPoolStrategy

    tagged = [
        ds.select_columns([column, "label"]).map_batches(
            _tag_split,
            fn_kwargs={"split": split},
            batch_format="numpy",
            num_cpus=LIGHT_TASK_CPUS,
        )
        for split, ds in datasets.items()
    ]
    union = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    latents = union.map_batches(
        LatentEncoder,
        fn_constructor_kwargs=encode,
        compute=ActorPoolStrategy(size=pool["num_actors"]),
        batch_size=pool["batch_size"],
        batch_format="numpy",
        num_cpus=pool["cpus"],
        num_gpus=pool["gpus"],
    )
    latents.write_parquet(
        storage.join(work, "shards"),
        partition_cols=["split"],
        mode="overwrite",
        ray_remote_args={"num_cpus": LIGHT_TASK_CPUS},
        **parquet_write_options(),  # one latent per row group: the training shuffle's unit
    )


def _summarise(
    out: str, prefix: str, files: dict[str, list[str]], stats_split: str
) -> dict[str, Any]:
    """One pass back over the written latents: counts, per-channel moments over
    ``stats_split``, and token-pooled features per split (saved as .npy beside them)."""
    counts = {split: 0 for split in files}
    pooled: dict[str, list[np.ndarray]] = {split: [] for split in files}
    moments = ChannelMoments()
    latent_shape: tuple[int, ...] = ()
    for split in files:
        reader = read_shards([storage.join(out, p) for p in files[split]])
        for batch in reader.iter_batches(batch_size=256, batch_format="numpy"):
            z = _stack(batch["latent"])  # (N, ..., c)
            latent_shape = tuple(z.shape[1:])
            counts[split] += z.shape[0]
            pooled[split].append(pool_tokens(z))
            if split == stats_split:
                moments.update(z)
    pooled_files = {}
    for split, parts in pooled.items():
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(parts).astype(np.float32))
        pooled_files[split] = f"{prefix}/pooled_{split}.npy"
        storage.write_bytes(storage.join(out, pooled_files[split]), buffer.getvalue())
    return {
        "counts": counts,
        "latent_shape": list(latent_shape),
        "stats_split": stats_split,
        "stats": asdict(moments.stats()),
        "files": files,
        "pooled": pooled_files,
    }


def pool_tokens(latents: np.ndarray) -> np.ndarray:
    """(N, ..., c) -> (N, c): the mean over every token position (float64)."""
    z = np.asarray(latents, np.float64)
    return z.reshape(z.shape[0], -1, z.shape[-1]).mean(axis=1)


def _tag_split(batch: dict[str, np.ndarray], *, split: str) -> dict[str, np.ndarray]:
    n = len(batch["label"])
    return {**batch, "split": np.array([split] * n, dtype=object)}


def _stack(column: np.ndarray) -> np.ndarray:
    if column.dtype == object:
        column = np.stack(list(column))
    return np.asarray(column)


__all__ = [
    "ChannelMoments",
    "EncoderFactory",
    "LatentBatch",
    "LatentEncoder",
    "LatentSet",
    "LatentStats",
    "extract_latents",
    "keyed_dir",
    "load_latent_set",
    "pool_tokens",
]
