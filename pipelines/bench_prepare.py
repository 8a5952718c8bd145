"""Benchmarks of ``prepare`` (run through ``pipelines/benchmark.py``), on the same files and
the same unit code (``ingest_units.decode_unit``: decode, write the shard, commit):

- ``data``: Ray Data's prepare against a process pool over every core, and one process;
  CPU use beside each row (the run's own processes, and the whole machine), the ratio;
  each with FFmpeg's own threads on (0: its choice) and off (1).
- ``prepare-memory``: peak memory (PSS of the preprocess process tree: driver, Ray's
  daemons and workers, decoder children, Ray's object store) at several corpus sizes.
- ``prepare-resume``: a full preprocess against one SIGKILLed mid-way, then rerun.

A source ``ucf:N`` is a UCF-101-shaped corpus of N files (``bench_corpus``), written once
under ``--corpus-dir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vitok.pipelines.bench_corpus import write_corpus
from vitok.pipelines.bench_sampler import TreeSampler, tree

REPO = Path(__file__).resolve().parents[1]


def corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", type=int, default=144, help="stored clips are size x size")
    p.add_argument("--clips-per-video", type=int, default=0, help="0: every clip that fits")
    p.add_argument(
        "--corpus-dir",
        default=os.path.join(tempfile.gettempdir(), "vitok-bench-corpus"),
        help="where ucf:N corpora are written once and reused",
    )
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")


def data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", default="ucf:200", help="comma-separated: ucf:N or a source")
    p.add_argument("--threads", default="1,0", help="FFmpeg threads per decode to compare")
    p.add_argument("--repeats", type=int, default=2, help="Ray / pool pairs per setting")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs, pool size")
    p.add_argument("--synthetic-videos", type=int, default=48, help="for a synthetic source")
    corpus_arguments(p)


def resolve_source(source: str, corpus_dir: str) -> str:
    """``ucf:N`` -> ``videos:<corpus_dir>/ucf-N`` (written if missing); others unchanged."""
    if not source.startswith("ucf:"):
        return source
    files = int(source.split(":", 1)[1])
    folder = Path(corpus_dir) / f"ucf-{files}"
    done = folder / ".complete"
    if not done.exists():
        print(f"writing a UCF-shaped corpus of {files} files to {folder} ...", flush=True)
        write_corpus(folder, files)
        done.write_text("")
    return f"videos:{folder}"


def _config(args: argparse.Namespace, source: str, threads: int = 0):
    from vitok.platform.data.prepare import DataConfig

    return DataConfig(
        sources=(source,),
        frames=args.frames,
        fps=args.fps,
        size=(args.size, args.size),
        clips_per_video=args.clips_per_video,
        synthetic_videos=args.synthetic_videos,
        decode_threads=threads,
    )


def _units(cfg) -> list:
    """The units ``prepare`` plans for ``cfg`` (the same listing, split and plan)."""
    from vitok.platform.data.prepare import plan_files
    from vitok.platform.data.sources import list_sources

    files, _ = list_sources(cfg, "")
    return plan_files(cfg, files)[2]


def _unit_clips(job: tuple) -> int:
    from vitok.platform.data.ingest_units import decode_unit

    unit, cfg, folder = job
    marker = decode_unit(
        unit,
        spec=cfg.clip_spec(),
        folder=folder,
        attempt="pool",
        timeout_s=cfg.decode_timeout_s,
        encoding=cfg.clip_encoding,
        quality=cfg.clip_quality,
    )
    return sum(e["rows"] for e in marker["shards"])


def _warm(_: object = None) -> int:
    """Import what ``decode_unit`` uses (a worker's first unit should not pay for it)."""
    import av  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from ray.data.extensions import ArrowTensorArray  # noqa: F401

    import vitok.platform.data.ingest_units  # noqa: F401

    return os.getpid()


def _warm_batch(batch: dict) -> dict:
    _warm()
    return batch


def _pool_rate(cfg, folder: str, pool: ProcessPoolExecutor | None) -> tuple[int, TreeSampler]:
    """The sources of ``cfg`` listed and planned as prepare does, then its units through
    ``decode_unit`` on ``pool``'s processes (None: in this process, one after another)."""
    with TreeSampler() as sampler:
        jobs = [(u, cfg, folder) for u in _units(cfg)]
        if pool is None:
            clips = sum(_unit_clips(job) for job in jobs)
        else:
            clips = sum(pool.map(_unit_clips, jobs))
    return clips, sampler


def _row(method: str, threads: int, clips: int, s: TreeSampler, ratio: str = "") -> None:
    print(
        f"{method:<24} {threads:>7} {clips:>6} {s.seconds:>8.1f} {clips / s.seconds:>8.1f} "
        f"{s.cpu_s:>6.1f} {s.cores:>6.2f} {100 * s.machine_busy:>7.0f}% {ratio:>6}",
        flush=True,
    )


def bench_data(args: argparse.Namespace) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
    # Both sides start their processes and imports before any timing (not their decoders).
    ray.data.range(8, override_num_blocks=8).map_batches(_warm_batch, num_cpus=1).count()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-bench-data-"))
    print(
        f"clips of {args.frames} frames at {args.fps:g} fps, {args.size}x{args.size}, "
        f"clips_per_video={args.clips_per_video}; {args.num_cpus} CPUs for Ray and the pool; "
        f"Ray and the pool alternate, {args.repeats} times. CPU s = CPU seconds of this "
        "run's processes (Ray's daemons and workers or the pool's, decoders included); "
        "cores = CPU s / seconds; machine = share of all cores busy (anyone's work); "
        "ratio = clips/s against the pool run just before"
    )
    for source in args.sources.split(","):
        resolved = resolve_source(source, args.corpus_dir)
        for unit in _units(_config(args, resolved)):  # the files in the page cache first
            for path, _, _ in unit.files:
                if "://" not in path:
                    Path(path).read_bytes()
        print(f"\nsource {source} ({resolved})")
        print(
            f"{'method':<24} {'threads':>7} {'clips':>6} {'seconds':>8} {'clips/s':>8} "
            f"{'CPU s':>6} {'cores':>6} {'machine':>8} {'ratio':>6}"
        )
        crcs, ratios = set(), {}
        # One pool for the whole run, its processes started first: like Ray's workers,
        # they keep their decoder child from one run to the next.
        with ProcessPoolExecutor(args.num_cpus) as pool:
            list(pool.map(_warm, range(args.num_cpus * 4)))
            for threads in (int(t) for t in args.threads.split(",")):
                cfg, ratios[threads] = _config(args, resolved, threads), []
                for _ in range(args.repeats):
                    folder = work / f"{len(os.listdir(work))}"
                    ratio, crc = _ray_against_pool(args, cfg, folder, pool)
                    ratios[threads].append(ratio)
                    crcs.add(crc)
                clips, sampler = _pool_rate(cfg, str(work / f"{len(os.listdir(work))}"), None)
                _row("one process", threads, clips, sampler)
        for threads, got in ratios.items():
            print(f"threads={threads}: Ray Data / pool = {', '.join(f'{r:.2f}x' for r in got)}")
        print(f"shards identical across runs and thread settings (crc32): {len(crcs) == 1}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _ray_against_pool(
    args: argparse.Namespace, cfg, work: Path, pool: ProcessPoolExecutor
) -> tuple[float, tuple]:
    """One pool run, then one prepare, on the same units; their rows; the ratio of their
    clips/s and the shards' checksums."""
    from vitok.platform.data.prepare import prepare

    pool_clips, pool_s = _pool_rate(cfg, str(work / "pool"), pool)
    with TreeSampler() as ray_s:
        prepared = prepare(cfg, str(work / "ray"), progress=False)
    ray_clips = prepared.num_train + prepared.num_val
    assert ray_clips == pool_clips, (ray_clips, pool_clips)
    ratio = (ray_clips / ray_s.seconds) / (pool_clips / pool_s.seconds)
    threads = cfg.decode_threads
    _row(f"process pool ({args.num_cpus} procs)", threads, pool_clips, pool_s, "1.00x")
    _row("ray data (prepare)", threads, ray_clips, ray_s, f"{ratio:.2f}x")
    files = prepared.manifest["files"]
    return ratio, tuple(e["crc32"] for split in ("train", "val") for e in files[split])


# ----------------------------------------------------------------------------- subprocesses
def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper-video-ucf", help="the preset whose data is prepared")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="the local Ray's CPUs")
    p.add_argument(
        "--corpus-dir",
        default=os.path.join(tempfile.gettempdir(), "vitok-bench-corpus"),
        help="where ucf:N corpora are written once and reused",
    )
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")


def memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="80,320", help="corpus sizes in files (ucf:N each)")
    run_arguments(p)


def resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", type=int, default=300, help="corpus size (ucf:N)")
    p.add_argument("--kill-at", type=float, default=0.5, help="committed share at the kill")
    run_arguments(p)


def _command(args: argparse.Namespace, folder: str, root: Path) -> list[str]:
    script = REPO / "pipelines" / "preprocess.py"
    return [
        *(sys.executable, str(script), "--preset", args.preset, "--data", folder),
        *("--storage", str(root), "--num-cpus", str(args.num_cpus)),
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return env


def _manifest(root: Path) -> dict:
    (path,) = root.glob("data/*/manifest.json")
    return json.loads(path.read_text())


def bench_memory(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-bench-memory-"))
    print(
        f"preprocess.py --preset {args.preset} --data <corpus> --num-cpus {args.num_cpus}, each "
        "in a fresh process with its own local Ray. peak PSS = the largest sum, over one "
        "sample (every 0.1 s), of the proportional set size of every process of the run: "
        "driver, Ray's GCS, raylet, dashboard and workers, decoder children, and Ray's "
        "object store (shared memory, counted once)"
    )
    print(
        f"{'files':>6} {'clips':>6} {'seconds':>8} {'CPU s':>7} {'peak PSS MB':>12}   "
        "peak in each quarter of the run   at the peak: MB (processes) by role"
    )
    for i, files in enumerate(int(n) for n in args.sizes.split(",")):
        folder = resolve_source(f"ucf:{files}", args.corpus_dir).split(":", 1)[1]
        root = work / f"mem-{i}-{files}"  # a fresh storage root: every run decodes
        with open(work / f"mem-{i}-{files}.log", "w") as log:
            proc = subprocess.Popen(
                _command(args, folder, root), env=_env(), stdout=log, stderr=subprocess.STDOUT
            )
            with TreeSampler(proc.pid, interval_s=0.1, memory=True) as sampler:
                proc.wait()
        if proc.returncode:
            raise SystemExit(
                f"preprocess failed ({proc.returncode}): see {work}/mem-{i}-{files}.log"
            )
        counts = _manifest(root)["counts"]
        clips = counts["clips_train"] + counts["clips_val"]
        parts = ", ".join(
            f"{role} {mb:.0f} ({n})" for role, (mb, n) in sorted(sampler.peak_parts.items())
        )
        quarters = [0.0] * 4
        for t, mb in sampler.history:
            q = min(3, int(4 * t / sampler.seconds))
            quarters[q] = max(quarters[q], mb)
        print(
            f"{files:>6} {clips:>6} {sampler.seconds:>8.1f} {sampler.cpu_s:>7.0f} "
            f"{sampler.peak_pss_mb:>12.0f}   {' / '.join(f'{q:.0f}' for q in quarters)}   "
            f"{parts}",
            flush=True,
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _kill_when_committed(proc: subprocess.Popen, root: Path, files: int) -> tuple[float, int]:
    """SIGKILL ``proc``'s process group once ``files`` source files are in committed units;
    wait until every process of it is gone. Returns (seconds to the kill, files committed)."""
    t0 = time.perf_counter()
    while proc.poll() is None:
        done = 0
        for marker in root.glob("data/*/units/*.json"):
            try:
                done += len(json.loads(marker.read_text())["files"])
            except (OSError, ValueError):
                pass
        if done >= files:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit("preprocess finished before the kill: raise --files or lower --kill-at")
    killed_at = time.perf_counter() - t0
    procs = tree(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() and tree(pid) for pid in procs):
        time.sleep(0.2)  # Ray's workers (process groups of their own) exit by themselves
    committed = sum(
        len(json.loads(m.read_text())["files"]) for m in root.glob("data/*/units/*.json")
    )
    return killed_at, committed


def _timed(command: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, env=_env(), stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"preprocess failed ({code}): see {log}")
    return time.perf_counter() - t0


def _shards(manifest: dict) -> list:
    return [
        (e["path"], e["rows"], e["crc32"]) for s in ("train", "val") for e in manifest["files"][s]
    ]


def bench_resume(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-bench-resume-"))
    folder = resolve_source(f"ucf:{args.files}", args.corpus_dir).split(":", 1)[1]
    full_s = _timed(_command(args, folder, work / "full"), work / "full.log")
    full = _manifest(work / "full")

    root = work / "killed"
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen(
            _command(args, folder, root),
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        killed_at, committed = _kill_when_committed(proc, root, int(args.kill_at * args.files))
    rerun_s = _timed(_command(args, folder, root), work / "rerun.log")
    rerun = _manifest(root)
    markers = [json.loads(m.read_text()) for m in root.glob("data/*/units/*.json")]
    decoded = sum(len(m["files"]) for m in markers if m["attempt"] == rerun["attempt"])
    print(
        f"preprocess.py --preset {args.preset} --data <{args.files} UCF-shaped files> "
        f"--num-cpus {args.num_cpus}; each run a fresh process with its own local Ray"
    )
    print(f"full prepare:        {full_s:6.1f} s, {args.files} files decoded")
    print(
        f"killed (SIGKILL of its process group) at {killed_at:.1f} s, {committed} files committed"
    )
    print(
        f"rerun (same command): {rerun_s:6.1f} s, {decoded} files decoded "
        f"({rerun_s / full_s:.0%} of the full prepare's time)"
    )
    same = rerun["counts"] == full["counts"] and _shards(rerun) == _shards(full)
    print(f"counts and shards (path, rows, crc32) identical to the full prepare's: {same}")
    counts = {k: v for k, v in rerun["counts"].items() if k != "clips_per_label"}
    print(f"counts: {json.dumps(counts)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
