"""Ray Data ingestion: videos, images, synthetic and sample clips to Parquet clip shards.

``prepare(cfg)`` lists the sources, splits them by source file, decodes every file into
fixed-shape uint8 clips ``(T, H, W, 3)`` in Ray Data tasks (``vitok.platform.data.media``), and
writes Parquet shards plus a rejects table under ``<storage root>/data/<hash>/``, where the
hash covers the source listing and the preprocessing config, committed by a manifest written
last: a rerun with the same inputs reuses them without touching them.

``clip_dataset(prepared, split)`` reads the shards back as a Ray Dataset for
``ray.train.get_dataset_shard``; ``to_model_input`` turns a uint8 batch into the model's
float input in [-1, 1] with random crop and flip (training) or a centre crop (evaluation).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from typing import Any

from vitok.platform import storage
from vitok.platform.config import to_dict
from vitok.platform.data.clips import (
    LIGHT_TASK_CPUS,
    TENSOR_COLUMNS,
    clip_dataset,
    clip_datasets,
    first_clips,
    model_batches,
    read_shards,
    to_model_input,
)
from vitok.platform.data.config import DataConfig, PreparedData, tiny_synthetic_data
from vitok.platform.data.ingest import (
    FAULTS_ENV,
    RejectedSourceError,
    check_reject_fraction,
    decode_units,
    write_rejects_table,
)
from vitok.platform.data.ingest_units import Unit, plan_units, remove_leftovers
from vitok.platform.data.shard_checks import (
    ATTEMPTS,
    CHECKSUM,
    read_parquet_columns,
    remember_verified,
    verify_shards,
)
from vitok.platform.data.sources import SourceFile, assign_splits, digest, list_sources

PIPELINE_VERSION = 2  # bump when the stored clips change for the same config: part of the key
# (2: one clip per row group, the clip as raw bytes; shard_layout)
MANIFEST = "manifest.json"  # written last: a folder without one holds nothing committed


# ----------------------------------------------------------------------------- decode stage


def ensure_ray(log_to_driver: bool = True) -> None:
    """Use the running Ray; else attach to ``RAY_ADDRESS`` (a job) or start a local one.

    Workers run the code this driver runs (``ray_runtime_env``), and the dashboard stays
    on: Tune's placement-group cleanup after an early stop needs its state API.
    ``log_to_driver=False`` keeps the workers' output in Ray's log files (``ray logs``) and
    off this console (a study shows its own status table instead).
    """
    import ray

    from vitok.platform.runtime import ray_runtime_env

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=ray_runtime_env(), log_to_driver=log_to_driver)
    else:
        # One machine is never preempted: no watcher actor per Train run (a process each).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Each trial starts about six processes at once (its driver, Train's controller,
        # sync actor, placement-group cleaner, dataset manager, worker); Ray's default of
        # one concurrent start per CPU queues them and warns on the console.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "8")
        ray.init(address="local", runtime_env=ray_runtime_env(), log_to_driver=log_to_driver)


# ----------------------------------------------------------------------------- committed shards
def _manifest_attempt(folder: str) -> str | None:
    uri = storage.join(folder, MANIFEST)
    return storage.read_json(uri)["attempt"] if storage.is_file(uri) else None


def _committed(folder: str, key: str) -> PreparedData | None:
    """The committed shards under ``folder``, or None; a manifest whose files are missing,
    resized or fail their checksum (a crashed writer, a damaged disk or bucket) is reported
    and ignored, so they get rebuilt."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.is_file(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    problems = verify_shards(folder, manifest)
    if problems:
        listed = sum(len(manifest["files"][split]) for split in ("train", "val"))
        print(
            f"[vitok.data] cached shards at {folder} are incomplete or damaged "
            f"({len(problems)} of {listed} files, e.g. {problems[0]}): rebuilding"
        )
        return None
    return PreparedData(
        root=folder,
        manifest=manifest,
        label_map={k: int(v) for k, v in manifest["labels"].items()},
        rejects_path=storage.join(folder, manifest["rejects"]),
        num_rejects=int(manifest["counts"]["files_rejected"]),
        num_train=int(manifest["counts"]["clips_train"]),
        num_val=int(manifest["counts"]["clips_val"]),
        config_hash=key,
        reused=True,
    )


# ----------------------------------------------------------------------------- prepare


def data_key(cfg: DataConfig, prints: list[dict[str, Any]]) -> str:
    """The hash that names the shards' folder: the preprocessing config (operational
    settings left out) and the sources' fingerprints (``list_sources``)."""
    preprocessing = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_KEY}
    return digest({"version": PIPELINE_VERSION, "config": preprocessing, "sources": prints})


def shards_folder(cfg: DataConfig, root: str) -> tuple[str, str]:
    """``(hash, folder)`` of the shards ``prepare(cfg, root)`` writes or reuses, found by
    listing the sources only (nothing is decoded or rendered)."""
    _, prints = list_sources(cfg, "", render=False)
    key = data_key(cfg, prints)
    return key, storage.join(storage.resolve_root(root), "data", key)


def prepare(cfg: DataConfig, root: str, *, progress: bool = True) -> PreparedData:
    """Decode the sources of ``cfg`` into Parquet clip shards under the storage ``root``
    (``<root>/data/<hash>``), or reuse the committed ones (after checking their checksums).

    The files are cut into units (``ingest_units``), each decoded and committed on its own:
    a run killed at any point and run again keeps the committed units and decodes the rest,
    ending with the shards an uninterrupted run writes. The manifest, written last, commits
    the whole; files no manifest or unit lists (a killed write) are removed then. A file that
    hangs the decoder past ``cfg.decode_timeout_s``, or crashes it, is rejected; so is one
    whose decode task dies (its worker killed) on a second try alone. Raises
    ``RejectedSourceError`` (committing no manifest) when a source has more than
    ``cfg.max_reject_fraction`` of its files rejected. ``progress`` prints files done, clips/s,
    rejects and the time left. Returns the manifest, label map and rejects table.
    """
    ensure_ray()
    t_start, started_ns = time.perf_counter(), time.time_ns()
    data_root = storage.join(storage.resolve_root(root), "data")
    files, prints = list_sources(cfg, data_root)
    key = data_key(cfg, prints)
    folder = storage.join(data_root, key)
    prepared = _committed(folder, key)
    if prepared is not None:
        if progress:
            _summary(prepared, time.perf_counter() - t_start)
        return prepared
    damaged = _manifest_attempt(folder)

    split_of, label_map, units = plan_files(cfg, files)
    attempt = storage.attempt_id()
    markers, decoded = decode_units(cfg, units, folder, attempt, len(files), progress)
    rejects = [r for m in markers.values() for r in m["rejects"]]
    rejects_rel = f"{ATTEMPTS}/{attempt}/rejects.csv"
    write_rejects_table(rejects, storage.join(folder, rejects_rel))
    check_reject_fraction(cfg, files, rejects, storage.join(folder, rejects_rel))
    shards: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    labels_seen: Counter[int] = Counter()
    for unit in units:  # the plan's order: the same manifest however the run went
        shards[unit.split] += markers[unit.name]["shards"]
        labels_seen.update({int(k): v for k, v in markers[unit.name]["labels"].items()})
    manifest = {
        "hash": key,
        "pipeline_version": PIPELINE_VERSION,
        "attempt": attempt,
        "config": to_dict(cfg),
        "sources": prints,
        "labels": label_map,
        "rejects": rejects_rel,
        "files": shards,
        "units": len(units),
        "counts": _counts(
            files, split_of, {r["path"] for r in rejects}, shards, labels_seen, label_map
        ),
        "clip_shape": [cfg.frames, *cfg.size, 3],
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    prepared = _commit(folder, key, manifest, decoded, damaged)
    remove_leftovers(folder, prepared.manifest, units, attempt, started_ns)
    if progress:
        _summary(prepared, time.perf_counter() - t_start)
    return prepared


# Operational settings: they change how files are decoded, never the stored clips.
NOT_IN_KEY = ("weights", "crop", "decode_timeout_s", "decode_threads", "max_reject_fraction")


def plan_files(
    cfg: DataConfig, files: list[SourceFile]
) -> tuple[dict[str, str], dict[str, int], list[Unit]]:
    """The listed files' splits (by split key), the label map, and the units ``prepare``
    decodes them in: a function of the listing and the config alone."""
    split_of = assign_splits(files, cfg.val_fraction, cfg.split_seed)
    label_map = {name: i for i, name in enumerate(sorted({f.label for f in files}))}
    items = [
        {
            "path": f.path,
            "label": label_map[f.label],
            "source_id": f.source_id,
            "split": split_of[f.split_key],
        }
        for f in files
    ]
    return split_of, label_map, plan_units(items, cfg.clip_spec().clip_bytes, cfg.clips_per_video)


def _commit(
    folder: str, key: str, manifest: dict[str, Any], decoded: int, damaged: str | None
) -> PreparedData:
    """Write the manifest unless another writer committed first; the committed shards.
    ``damaged``: the attempt of the manifest found damaged at the start (its units rebuilt
    under the same names may make it whole again; it is replaced all the same)."""
    fresh = {e["path"]: e[CHECKSUM] for split in manifest["files"].values() for e in split}
    remember_verified(folder, fresh)  # as written by the tasks: not read back
    prepared = _committed(folder, key)
    if prepared is not None and prepared.manifest["attempt"] == damaged:
        prepared = None
    if prepared is None:  # nobody committed meanwhile: commit ours (the manifest goes last)
        storage.write_json(storage.join(folder, MANIFEST), manifest)
        prepared = dataclasses.replace(_committed(folder, key), reused=False)
    return dataclasses.replace(prepared, decoded_files=decoded)


def _counts(
    files: list[Any],
    split_of: dict[str, str],
    rejected: set[str],
    shards: dict[str, list[dict[str, Any]]],
    labels_seen: Counter[int],
    label_map: dict[str, int],
) -> dict[str, Any]:
    """The manifest's counts: files (total, ok, rejected, per split), clips per split and
    per label."""
    return {
        "files_total": len(files),
        "files_ok": len(files) - len(rejected),
        "files_rejected": len(rejected),
        "files_train": sum(split_of[f.split_key] == "train" for f in files),
        "files_val": sum(split_of[f.split_key] == "val" for f in files),
        "clips_train": sum(e["rows"] for e in shards["train"]),
        "clips_val": sum(e["rows"] for e in shards["val"]),
        "clips_per_label": {name: labels_seen[i] for name, i in label_map.items()},
    }


def _summary(p: PreparedData, seconds: float) -> None:
    c = p.manifest["counts"]
    how = "reused" if p.reused else "wrote"
    if not p.reused and p.decoded_files < c["files_total"]:
        how = f"resumed ({p.decoded_files} files decoded now, the rest committed before) and wrote"
    print(
        f"[vitok.data] {how} {p.root}: {c['files_total']} files "
        f"({c['files_rejected']} rejected) -> {p.num_train} train / {p.num_val} val clips "
        f"of {tuple(p.manifest['clip_shape'])}, {len(p.label_map)} labels, "
        f"{seconds:.1f} s; rejects: {p.rejects_path}"
    )


# ----------------------------------------------------------------------------- reading


# The public names of ingestion (reading, decoding and checks live in clips.py, ingest.py and
# shard_checks.py; importers use them from here).
__all__ = [
    "FAULTS_ENV",
    "LIGHT_TASK_CPUS",
    "TENSOR_COLUMNS",
    "DataConfig",
    "PreparedData",
    "RejectedSourceError",
    "clip_dataset",
    "clip_datasets",
    "data_key",
    "ensure_ray",
    "first_clips",
    "model_batches",
    "prepare",
    "read_parquet_columns",
    "shards_folder",
    "read_shards",
    "tiny_synthetic_data",
    "to_model_input",
]
