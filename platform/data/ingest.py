"""The decode stage of ``prepare``: Ray Data tasks decode the units of ``ingest_units``
(each file in an isolated decoder process with a timeout), reject what cannot be decoded
with a reason, and stop a source whose files are mostly rejected (a wrong path or codec,
not bad luck).

``VITOK_INJECT_FAULTS`` (tests and the fault table only) makes named files hang, crash
the decoder, or kill the task."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from vitok.platform import storage
from vitok.platform.data.ingest_units import (
    Unit,
    decode_unit,
    marker_uri,
    merge_single_files,
    read_markers,
)
from vitok.platform.data.progress import PrepareProgress
from vitok.platform.data.shard_checks import check_entries

if TYPE_CHECKING:
    from vitok.platform.data.config import DataConfig

FAULTS_ENV = "VITOK_INJECT_FAULTS"


FAULT_ACTIONS = ("hang", "crash", "die", "slow")


def injected_faults() -> tuple[tuple[str, str], ...]:
    """Fault injection for tests, read on the driver: ``VITOK_INJECT_FAULTS`` holds
    ``action=glob`` entries (``"hang=*slow*,crash=*segv*,die=*oom*"``) matched against file
    names. ``hang`` stalls the decoder inside native code, ``crash`` kills it with SIGSEGV,
    ``die`` SIGKILLs the Ray worker running the decode task (as the OOM killer would),
    ``slow`` adds a second to the file's decode (a long file: room to kill a run mid-way)."""
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


def _unit_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """Ray Data UDF: a task's units in (a JSON list per row), one marker out per unit
    (JSON), after ``decode_unit`` has written its shard and marker, unit after unit. Clips
    never travel through the object store."""
    markers = [
        json.dumps(decode_unit(Unit.from_row(unit), **kwargs))
        for row in batch["units"]
        for unit in json.loads(str(row))
    ]
    return {"marker": np.asarray(markers, dtype=object)}


def _quiet_ray_data() -> Any:
    """Ray Data's per-execution INFO lines off the console while units run (the progress
    line is ours); its warnings stay."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    return lambda: logger.setLevel(level)


def _task_groups(units: list[Unit], retries: int) -> list[list[Unit]]:
    """The units each Ray task decodes, one after another (each still committed on its own).

    Between two tasks a CPU waits for the driver to see the first one end and start the
    next: 0.14-0.15 s measured (Ray Data's scheduling loop waits up to 0.1 s per round for
    its tasks), against 0.4 s for a unit of 2 UCF files on this machine. Consecutive small
    units (a small split's) are packed up to the size of the plan's largest unit; the
    single-file retry pass (``retries=0``) keeps one unit per task.
    """
    if retries == 0 or not units:
        return [[u] for u in units]
    target = max(len(u.files) for u in units)
    groups: list[list[Unit]] = []
    for unit in units:
        if groups and sum(len(u.files) for u in groups[-1]) + len(unit.files) <= target:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def run_units(
    cfg: DataConfig,
    units: list[Unit],
    folder: str,
    attempt: str,
    faults: tuple[tuple[str, str], ...],
    *,
    retries: int,
    on_done: Callable[[dict[str, Any]], None],
) -> dict[str, dict[str, Any]]:
    """Decode ``units`` in Ray Data tasks (``_task_groups``, one CPU each); ``on_done`` gets
    the markers of a task's units when it ends. Returns the markers by unit name.

    A task whose worker dies is retried ``retries`` times, then its units are left out
    rather than failing the whole dataset (Ray Data would otherwise retry it forever): the
    caller finds them missing. A unit whose shard could not be written stops prepare here.
    """
    import ray.data

    fn_kwargs = {
        "spec": cfg.clip_spec(),
        "folder": folder,
        "attempt": attempt,
        "timeout_s": cfg.decode_timeout_s,
        "faults": faults,
        "encoding": cfg.clip_encoding,
        "quality": cfg.clip_quality,
    }
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.max_errored_blocks
    ctx.enable_progress_bars, ctx.max_errored_blocks = False, -1
    restore_logging = _quiet_ray_data()
    markers: dict[str, dict[str, Any]] = {}
    try:
        groups = _task_groups(units, retries)
        rows = [{"units": json.dumps([u.to_row() for u in group])} for group in groups]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Ray 2.60 takes max_retries only through the deprecated ray_remote_args (its named
        # parameters cover scheduling, not retries).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                _unit_batch,
                batch_size=1,
                fn_kwargs=fn_kwargs,
                num_cpus=1,
                max_retries=retries,
            )
        for row in ds.iter_rows():
            marker = json.loads(row["marker"])
            if "error" in marker:
                raise RuntimeError(
                    f"prepare: writing unit {marker['unit']} (its shard or marker) under "
                    f"{folder} failed: {marker['error']}"
                )
            markers[marker["unit"]] = marker
            on_done(marker)
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved
        restore_logging()
    return markers


def redecode_lost(
    cfg: DataConfig,
    lost: list[Unit],
    folder: str,
    attempt: str,
    faults: tuple[tuple[str, str], ...],
    on_done: Callable[[dict[str, Any]], None],
) -> dict[str, dict[str, Any]]:
    """Units whose decode task died (a worker killed: out of memory, a native crash) on both
    tries: decoded again one file per task, so only the culprit is lost (and rejected).
    Returns each lost unit's marker, merged from its files' and committed."""
    print(
        f"[vitok.data] {len(lost)} unit(s) lost with a decode task that died; decoding "
        f"their {sum(len(u.files) for u in lost)} files again one per task"
    )
    parts = [p for u in lost for p in u.single_files()]
    done = read_markers(folder, parts)  # a resumed run: parts committed before the kill
    todo = [p for p in parts if p.name not in done]
    if todo:
        done.update(
            run_units(cfg, todo, folder, attempt, faults, retries=0, on_done=lambda m: None)
        )
    merged = {}
    for unit in lost:
        marker = merge_single_files(unit, done, attempt)
        storage.write_json(marker_uri(folder, unit.name), marker)
        for part in unit.single_files():
            storage.delete(marker_uri(folder, part.name))
        merged[unit.name] = marker
        on_done(marker)
    return merged


def decode_units(
    cfg: DataConfig, units: list[Unit], folder: str, attempt: str, total: int, progress: bool
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every unit's marker: the committed ones kept (their shards' checksums checked), the
    others decoded now. Returns the markers by unit name and the files decoded here."""
    markers = read_markers(folder, units)
    entries = [e for m in markers.values() for e in m["shards"]]
    damaged = set(check_entries(folder, entries)) if entries else set()
    markers = {
        name: m for name, m in markers.items() if not {e["path"] for e in m["shards"]} & damaged
    }
    done_files = sum(len(m["files"]) for m in markers.values())
    meter = PrepareProgress(
        total,
        done_files=done_files,
        done_clips=sum(e["rows"] for m in markers.values() for e in m["shards"]),
        done_rejects=sum(len(m["rejects"]) for m in markers.values()),
        enabled=progress,
    )

    def on_done(marker: dict[str, Any]) -> None:
        clips = sum(e["rows"] for e in marker["shards"])
        meter.update(len(marker["files"]), clips, len(marker["rejects"]))

    todo = [u for u in units if u.name not in markers]
    meter.start()
    faults = injected_faults()
    if todo:
        markers.update(run_units(cfg, todo, folder, attempt, faults, retries=1, on_done=on_done))
    lost = [u for u in todo if u.name not in markers]
    if lost:
        markers.update(read_markers(folder, lost))  # committed, then the task died
        lost = [u for u in lost if u.name not in markers]
    if lost:
        markers.update(redecode_lost(cfg, lost, folder, attempt, faults, on_done))
    meter.close()
    return markers, total - done_files


def write_rejects_table(rejects: list[dict[str, str]], uri: str) -> None:
    """The rejects (path, reason) as a CSV table at ``uri``, sorted by path."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["path", "reason"])
    writer.writeheader()
    writer.writerows(sorted(rejects, key=lambda r: r["path"]))
    storage.write_text(uri, table.getvalue())


class RejectedSourceError(RuntimeError):
    """Most files of a source were rejected: a wrong path or codec, not bad luck."""


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
        f"than a few bad files. Rejects table (path, reason): {rejects_uri}. No manifest was "
        "written; fix the source, or raise data.max_reject_fraction to keep the good files "
        "(the files decoded so far are not decoded again)."
    )
