"""The decode stage of ``prepare``: Ray Data tasks decode each file into clips (in an
isolated decoder process with a timeout), reject what cannot be decoded with a reason, and
stop a source whose files are mostly rejected (a wrong path or codec, not bad luck).

``VITOK_INJECT_FAULTS`` (tests and the fault table only) makes named files hang, crash
the decoder, or kill the task."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import os
import signal
import warnings
import zlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from vitok.platform import storage
from vitok.platform.media import ClipSpec, Rejected, decode_file, decode_file_isolated
from vitok.platform.shard_checks import scan_all
from vitok.platform.shard_layout import write_shards

if TYPE_CHECKING:
    from vitok.platform.data import DataConfig

SHARD_BYTES = 64 * 2**20  # target Parquet file size
FAULTS_ENV = "VITOK_INJECT_FAULTS"


FAULT_ACTIONS = ("hang", "crash", "die")


def injected_faults() -> tuple[tuple[str, str], ...]:
    """Fault injection for tests, read on the driver: ``VITOK_INJECT_FAULTS`` holds
    ``action=glob`` entries (``"hang=*slow*,crash=*segv*,die=*oom*"``) matched against file
    names. ``hang`` stalls the decoder inside native code, ``crash`` kills it with SIGSEGV,
    ``die`` SIGKILLs the Ray worker running the decode task (as the OOM killer would)."""
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULTS_ENV, "").split(","))):
        action, _, pattern = entry.partition("=")
        if action not in FAULT_ACTIONS or not pattern:
            raise ValueError(
                f"{FAULTS_ENV} entry {entry!r} must be action=glob with action in "
                f"{list(FAULT_ACTIONS)}"
            )
        out.append((action, pattern))
    return tuple(out)


def _fault_for(path: str, faults: tuple[tuple[str, str], ...]) -> str | None:
    name = storage.name(path)
    return next((action for action, pattern in faults if fnmatch.fnmatch(name, pattern)), None)


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: ClipSpec,
    reject_dir: str,
    timeout_s: float = 0.0,
    faults: tuple[tuple[str, str], ...] = (),
    decoded_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row per source file in, one row per clip out; rejects go to storage.

    A rejected file writes ``reject_dir/<crc>.json`` (idempotent under task retries). A source
    under a remote storage root is read through a temporary local copy. With ``timeout_s``,
    each file is decoded in a child process that is abandoned after that long (see
    ``media.IsolatedDecoder``). ``decoded_dir`` (the retry pass) gets a marker per file
    whose decode finished, so a file whose task died can be told from a failed write.
    """
    out: dict[str, list[Any]] = {k: [] for k in ("clip", "label", "path", "start_s", "fps")}
    out.update(clip_index=[], source_id=[], split=[])
    for path, label, sid, split in zip(
        batch["path"], batch["label"], batch["source_id"], batch["split"]
    ):
        fault = _fault_for(str(path), faults) if faults else None
        if fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            with storage.readable_file(str(path)) as local:
                if timeout_s > 0:
                    clips = decode_file_isolated(str(local), spec, timeout_s, fault=fault)
                else:
                    clips = decode_file(str(local), spec)
        except Rejected as err:
            _write_reject(reject_dir, str(path), str(err))
            clips = []
        except Exception as err:  # noqa: BLE001 - a bad file must never end the run
            _write_reject(reject_dir, str(path), f"error: {type(err).__name__}: {err}")
            clips = []
        if decoded_dir is not None:
            storage.write_text(storage.join(decoded_dir, _file_key(str(path))), "")
        for c in clips:
            out["clip"].append(c.clip)
            out["label"].append(int(label))
            out["path"].append(str(path))
            out["start_s"].append(c.start_s)
            out["fps"].append(c.fps)
            out["clip_index"].append(c.clip_index)
            out["source_id"].append(int(sid))
            out["split"].append(str(split))
    t = 1 if spec.frames == 1 else spec.frames
    empty = np.zeros((0, t, *spec.size, 3), np.uint8)
    return {
        "clip": np.stack(out["clip"]) if out["clip"] else empty,  # (N, T, H, W, 3) uint8
        "label": np.asarray(out["label"], np.int64),
        "path": np.asarray(out["path"], dtype=object),
        "start_s": np.asarray(out["start_s"], np.float32),
        "fps": np.asarray(out["fps"], np.float32),
        "clip_index": np.asarray(out["clip_index"], np.int32),
        "source_id": np.asarray(out["source_id"], np.int32),
        "split": np.asarray(out["split"], dtype=object),
    }


def _file_key(path: str) -> str:
    return f"{zlib.crc32(path.encode()):08x}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _write_reject(reject_dir: str, path: str, reason: str) -> None:
    storage.write_json(
        storage.join(reject_dir, f"{_file_key(path)}.json"), {"path": path, "reason": reason}
    )


class RejectedSourceError(RuntimeError):
    """Most files of a source were rejected: a wrong path or codec, not bad luck."""


def redecode_lost(
    cfg: DataConfig,
    missing: list[dict[str, Any]],
    folder: str,
    prefix: str,
    faults: Any,
    progress: bool,
) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
    """Files whose decode task died (a worker killed: out of memory, a native crash) on both
    tries: decoded again one file per task, so only the culprit is lost (and rejected).
    Returns the attempt's shards and labels, scanned again."""
    work = storage.join(folder, prefix)
    reject_dir = storage.join(work, "rejects.d")
    print(
        f"[vitok.data] {len(missing)} file(s) lost with a decode task that died; decoding "
        "them again one per task"
    )
    decoded_dir = storage.join(work, "decoded.d")
    decode_pass(cfg, missing, work, reject_dir, faults, progress=progress, retry=True)
    shards, labels_seen, produced = scan_all(folder, prefix)
    decoded = set(storage.listdir(decoded_dir))
    accounted = produced | rejected_paths(reject_dir)
    for it in missing:
        if it["path"] in accounted:
            continue
        if _file_key(it["path"]) in decoded:  # decoded, then the write failed
            raise RuntimeError(
                f"prepare: writing the clips of {it['path']} to {work}/shards failed; "
                "see the Ray Data log above"
            )
        _write_reject(
            reject_dir,
            it["path"],
            "crashed: the decode task died on this file, alone and with others (its "
            "worker was killed: out of memory, or a native crash)",
        )
    storage.delete(decoded_dir)
    return shards, labels_seen


def write_rejects_table(reject_dir: str, work: str) -> tuple[list[dict[str, str]], str]:
    """The per-file reject records gathered into ``work/rejects.csv`` (path, reason)."""
    rejects = sorted(
        (
            storage.read_json(storage.join(reject_dir, n))
            for n in storage.listdir(reject_dir)
            if n.endswith(".json")
        ),
        key=lambda r: r["path"],
    )
    storage.delete(reject_dir)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["path", "reason"])
    writer.writeheader()
    writer.writerows(rejects)
    rejects_uri = storage.join(work, "rejects.csv")
    storage.write_text(rejects_uri, table.getvalue())
    return rejects, rejects_uri


def decode_pass(
    cfg: DataConfig,
    items: list[dict[str, Any]],
    work: str,
    reject_dir: str,
    faults: tuple[tuple[str, str], ...],
    *,
    progress: bool,
    retry: bool,
) -> None:
    """Decode ``items`` into ``work/shards`` (Ray Data tasks writing Parquet).

    A task whose worker dies is retried once, then its block is dropped rather than failing
    the whole dataset (Ray Data would otherwise retry it forever); the caller finds the
    files that produced neither clips nor a reject. The ``retry`` pass decodes one file per
    task, is not retried, and leaves a marker per decoded file.
    """
    import ray
    import ray.data

    spec = cfg.clip_spec()
    clip_bytes = max(1, cfg.frames) * cfg.size[0] * cfg.size[1] * 3
    if retry:
        blocks = len(items)
    else:
        # A few files per block: enough blocks to keep every CPU busy and stream, few
        # enough that per-task overhead stays small next to decoding.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = min(len(items), max(4 * cpus, len(items) // 16), 4096)
    fn_kwargs = {
        "spec": spec,
        "reject_dir": reject_dir,
        "timeout_s": cfg.decode_timeout_s,
        "faults": faults,
        "decoded_dir": storage.join(work, "decoded.d") if retry else None,
    }
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.max_errored_blocks
    ctx.enable_progress_bars, ctx.max_errored_blocks = progress, -1
    try:
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # Ray Data retries a task whose worker died forever (max_retries=-1): a file that
        # kills its worker would stall prepare. Ray 2.60 takes max_retries only through the
        # deprecated ray_remote_args (its named parameters cover scheduling, not retries).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                _decode_batch,
                batch_size=1,
                fn_kwargs=fn_kwargs,
                num_cpus=1,
                max_retries=0 if retry else 1,
            )
        write_shards(
            ds,
            storage.join(work, "shards"),
            encoding=cfg.clip_encoding,
            quality=cfg.clip_quality,
            remote_args={"num_cpus": 1, "max_retries": 0 if retry else 1},
            partition_cols=["split"],
            mode="append" if retry else "overwrite",
            min_rows_per_file=None if retry else max(1, SHARD_BYTES // clip_bytes),
        )
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved


def rejected_paths(reject_dir: str) -> set[str]:
    return {
        storage.read_json(storage.join(reject_dir, n))["path"]
        for n in storage.listdir(reject_dir)
        if n.endswith(".json")
    }


def check_reject_fraction(
    cfg: DataConfig, files: list[Any], rejects: list[dict[str, str]], rejects_uri: str
) -> None:
    """Stop when a source lost more than ``cfg.max_reject_fraction`` of its files."""
    source_of = {f.path: f.source_id for f in files}
    total = Counter(f.source_id for f in files)
    lost = Counter(source_of[r["path"]] for r in rejects if r["path"] in source_of)
    bad = [sid for sid, n in sorted(total.items()) if lost[sid] > cfg.max_reject_fraction * n]
    if not bad:
        return
    lines = []
    for sid in bad:
        reasons = Counter(
            r["reason"].split(":", 1)[0] for r in rejects if source_of.get(r["path"]) == sid
        )
        top = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(3))
        lines.append(
            f"source {cfg.sources[sid]!r}: {lost[sid]} of {total[sid]} files rejected "
            f"(top reasons: {top})"
        )
    raise RejectedSourceError(
        f"prepare stopped: {'; '.join(lines)}, above data.max_reject_fraction="
        f"{cfg.max_reject_fraction:g}. That means a wrong path or an unsupported codec rather "
        f"than a few bad files. Rejects table (path, reason): {rejects_uri}. Nothing was "
        "committed; fix the source, or raise data.max_reject_fraction to keep the good files."
    )
