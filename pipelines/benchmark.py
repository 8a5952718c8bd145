"""Benchmarks that print figures (they are not tests).

    python pipelines/benchmark.py data            # preprocessing: Ray Data vs a plain loop
    python pipelines/benchmark.py data --synthetic-videos 48 --size 128
    python pipelines/benchmark.py ingest          # the training read path (bench_read.py)
    python pipelines/benchmark.py faults          # the fault table (vitok.platform.faults)
    python pipelines/benchmark.py faults --only claim,shard
    python pipelines/benchmark.py all             # every benchmark with its defaults

Add a benchmark with ``@benchmark("name", help)`` on a function ``(args) -> None`` and an
optional ``<name>_arguments(parser)`` hook registered alongside.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def benchmark(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Callable[[argparse.Namespace], None]) -> Callable:
        BENCHMARKS[name] = (help, arguments, fn)
        return fn

    return register


# ----------------------------------------------------------------------------- data
def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", default="samples,synthetic", help="comma-separated sources")
    p.add_argument("--synthetic-videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", type=int, default=64, help="stored clips are size x size")
    p.add_argument("--clips-per-video", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")


def _plain_loop(files: list, spec, out: Path, timeout_s: float = 0.0) -> int:
    """Single process: decode every file with the same PyAV code, write one Parquet file.
    With ``timeout_s``, each file goes through the isolated decoder child (as prepare does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitok.platform.media import Rejected, decode_file, decode_file_isolated

    clips, labels = [], []
    for f in files:
        try:
            if timeout_s:
                decoded = decode_file_isolated(f.path, spec, timeout_s)
            else:
                decoded = decode_file(f.path, spec)
        except Rejected:
            continue
        clips += [c.clip.tobytes() for c in decoded]
        labels += [f.label] * len(decoded)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"clip": pa.array(clips, pa.binary()), "label": pa.array(labels)})
    pq.write_table(table, out / "clips.parquet")
    return len(clips)


def _row(name: str, method: str, clips: float, seconds: float, in_mb: float, out_mb: float):
    print(
        f"{name:<10} {method:<26} {clips:>7.0f} {seconds:>8.2f} {clips / seconds:>9.1f} "
        f"{in_mb / seconds:>10.2f} {out_mb / seconds:>11.2f}"
    )


@benchmark("data", "preprocessing throughput: Ray Data vs a plain PyAV loop", _data_arguments)
def bench_data(args: argparse.Namespace) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-bench-"))
    try:
        import decord  # noqa: F401

        has_decord = True
    except ImportError:
        has_decord = False
    ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b).count()  # warm workers

    print(
        f"clips of {args.frames} frames at {args.fps:g} fps, {args.size}x{args.size}, "
        f"<= {args.clips_per_video} per video, {args.num_cpus} CPUs; MB/s in = source file "
        "bytes, out = uint8 clip bytes"
    )
    print(
        f"{'source':<10} {'method':<26} {'clips':>7} {'seconds':>8} {'clips/s':>9} "
        f"{'in MB/s':>10} {'out MB/s':>11}"
    )
    for source in args.sources.split(","):
        _bench_source(args, source, work, has_decord)
    if not has_decord:
        print(
            "note: ray.data.read_videos: skipped, decord is not installed (pip install "
            "decord); it yields single frames (stride round(src/target fps), squashing "
            "resize), not clips"
        )
    else:
        print(
            "note: read_videos yields single frames (integer stride, squashing resize, every "
            "file decoded in full): 'clips' = frames / T, no clip assembly, no Parquet write"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _bench_source(args: argparse.Namespace, source: str, work: Path, has_decord: bool) -> None:
    """One source, five ways: prepare (isolated and in-process decode), a plain PyAV loop
    (in-process and isolated), and Ray Data's read_videos when decord is installed."""
    import ray

    from vitok.platform.data import DataConfig, prepare
    from vitok.platform.sources import list_sources

    cfg = DataConfig(
        sources=(source,),
        frames=args.frames,
        fps=args.fps,
        size=(args.size, args.size),
        clips_per_video=args.clips_per_video,
        synthetic_videos=args.synthetic_videos,
    )
    root = str((work / f"ray-{source}").resolve())
    files, _ = list_sources(cfg, f"{root}/data")  # renders synthetic (as prepare would)
    in_mb = sum(os.path.getsize(f.path) for f in files) / 1e6
    clip_mb = args.frames * args.size * args.size * 3 / 1e6

    # Each file decoded in an isolated child (as prepare does), then in the task's own
    # process (no timeout, no protection from a hung or crashing decoder): what isolation costs.
    for method, run_cfg, folder in (
        ("ray data (prepare)", cfg, f"ray-{source}"),
        (
            "prepare, in-process decode",
            dataclasses.replace(cfg, decode_timeout_s=0.0),
            f"ray-inproc-{source}",
        ),
    ):
        t = time.perf_counter()
        prepared = prepare(run_cfg, str((work / folder).resolve()), progress=False)
        n = prepared.num_train + prepared.num_val
        _row(source, method, n, time.perf_counter() - t, in_mb, n * clip_mb)

    spec, timeout = cfg.clip_spec(), cfg.decode_timeout_s
    t = time.perf_counter()
    n_plain = _plain_loop(files, spec, work / f"plain-{source}")
    _row(
        source,
        "plain PyAV loop (1 proc)",
        n_plain,
        time.perf_counter() - t,
        in_mb,
        n_plain * clip_mb,
    )
    _plain_loop(files[:1], spec, work / f"isolated-warm-{source}", timeout)  # child up
    t = time.perf_counter()
    n_iso = _plain_loop(files, spec, work / f"isolated-{source}", timeout)
    _row(source, "same, isolated decoder", n_iso, time.perf_counter() - t, in_mb, n_iso * clip_mb)

    if has_decord:
        t = time.perf_counter()
        ds = ray.data.read_videos(
            [f.path for f in files], fps=round(args.fps), resize=(args.size, args.size)
        )
        equiv = ds.count() / args.frames
        _row(
            source, "read_videos (frames/T)", equiv, time.perf_counter() - t, in_mb, equiv * clip_mb
        )


# ----------------------------------------------------------------------------- train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants",
        default="N-N/2x8@4x32x32,S-S/16@1x256x256",
        help="comma-separated VARIANT@TxHxW",
    )
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (half are warm-up)")
    p.add_argument("--batch-size", type=int, default=2, help="per worker")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")


@benchmark("train", "tokenizer training throughput through Ray Train + DeepSpeed", _train_arguments)
def bench_train(args: argparse.Namespace) -> None:
    """s/step of the real worker loop on random clips (no eval, no data I/O) and, with one
    worker, of a bare PyTorch loop of the same model on the same machine, and their ratio."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="vitok-bench-train-"))
    print(
        f"{'variant':<10} {'input':<11} {'workers':>7} {'steps/s':>8} {'samples/s':>9} "
        f"{'tokens/s':>9} {'s/step':>7} {'bare s/step':>11} {'ratio':>6}"
    )
    for spec in args.variants.split(","):
        variant, _, size = spec.partition("@")
        t, h, w = (int(v) for v in size.split("x"))
        for workers in (int(n) for n in args.workers.split(",")):
            rate, m = _platform_rate(args, variant, (t, h, w), workers, work)
            bare = (
                _bare_seconds_per_step(args, variant, (t, h, w), workers) if workers == 1 else None
            )
            shown = f"{bare:>11.3f} {(1 / rate) / bare:>5.2f}x" if bare else f"{'-':>11} {'-':>6}"
            print(
                f"{variant:<10} {size:<11} {workers:>7} {rate:>8.3f} "
                f"{m.get('perf/samples_per_s', float('nan')):>9.2f} "
                f"{m.get('perf/tokens_per_s', float('nan')):>9.0f} {1 / rate:>7.3f} {shown}",
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)


def _bench_model(args: argparse.Namespace, variant: str, size: tuple[int, int, int]):
    from vitok.tokenizer.config import TokenizerConfig
    from vitok.tokenizer.losses import LossConfig
    from vitok.tokenizer.task import TokenizerTask

    model = TokenizerConfig.from_variant(variant, channels=args.channels, input_size=size)
    return model, TokenizerTask(model, LossConfig(lpips_weight=0.0))


def _bench_train_config(args: argparse.Namespace, workers: int):
    from vitok.platform.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        num_workers=workers,
        cpus_per_worker=0.9 * args.num_cpus / workers,
        checkpoint_every=0,
        log_every=max(1, args.steps // 2),
        warmup_steps=1,
        shuffle_buffer=0,
        zero_stage=args.zero_stage,
        max_failures=0,
    )


def _platform_rate(args, variant: str, size: tuple[int, int, int], workers: int, work: Path):
    """steps/s of the last logging window (steady state, warm-up excluded) and the metrics."""
    import numpy as np

    from vitok.platform.clips import ClipBatch
    from vitok.platform.train import TrainJob, run_training
    from vitok.platform.train_data import split_from_arrays

    model, task = _bench_model(args, variant, size)
    rows = args.batch_size * workers * (args.steps + 2)
    clips = np.random.default_rng(0).integers(0, 256, (rows, *size, 3), dtype=np.uint8)
    job = TrainJob(
        name=f"bench-{variant.replace('/', '_')}-{workers}w",
        task=task,
        train=_bench_train_config(args, workers),
        batch_fn=ClipBatch(None),
        tokens_per_sample=model.num_tokens,
    )
    train = split_from_arrays({"clip": clips, "label": np.zeros(rows, np.int64)})
    result = run_training(job, {"train": train}, storage_path=work)
    return result.metrics.get("perf/steps_per_s", float("nan")), result.metrics


def _bare_seconds_per_step(args, variant: str, size: tuple[int, int, int], workers: int) -> float:
    """The same model, batch, loss, AdamW, LR schedule and grad clip in a plain loop, on as
    many threads as the platform's worker gets; timed over the same last half of the steps."""
    import torch

    from vitok.platform.data import to_model_input
    from vitok.platform.train import lr_multiplier

    cfg = _bench_train_config(args, workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    try:
        torch.manual_seed(cfg.seed)
        _, task = _bench_model(args, variant, size)
        model = task.build_model()
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg))
        clips = torch.randint(0, 256, (cfg.batch_size, *size, 3), dtype=torch.uint8)
        timed_from = args.steps - max(1, args.steps // 2)
        for step in range(args.steps):
            if step == timed_from:
                started = time.perf_counter()
            x = to_model_input(clips, crop=None, flip=True)
            loss, _ = task.training_step(model, {"x": x}, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
        return (time.perf_counter() - started) / (args.steps - timed_from)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- ingest
def _ingest_arguments(p: argparse.ArgumentParser) -> None:
    from vitok.pipelines.bench_read import arguments

    arguments(p)


@benchmark(
    "ingest",
    "the training read path against a plain pyarrow loop, local and S3, and clip encodings",
    _ingest_arguments,
)
def bench_ingest(args: argparse.Namespace) -> None:
    from vitok.pipelines.bench_read import run

    run(args)


# ----------------------------------------------------------------------------- faults
def _faults_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=None, help="comma-separated faults (default: all)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")


@benchmark(
    "faults", "inject each fault for real; what survived and what it cost", _faults_arguments
)
def bench_faults(args: argparse.Namespace) -> None:
    from vitok.platform.faults import FAULTS, print_table, run_faults

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-faults-"))
    rows = run_faults(args.only.split(",") if args.only else list(FAULTS), work)
    print("\nfault table (each figure measured on the run it describes):")
    print_table(rows)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = [row.fault for row in rows if row.survived is False]
    if failed:
        raise SystemExit(f"not survived: {', '.join(failed)}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name, (help, arguments, _) in BENCHMARKS.items():
        arguments(sub.add_parser(name, help=help))
    sub.add_parser("all", help="every benchmark with its defaults")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        help, arguments, fn = BENCHMARKS[name]
        run_args = args
        if args.name == "all":
            sub_parser = argparse.ArgumentParser()
            arguments(sub_parser)
            run_args = sub_parser.parse_args([])
        print(f"== {name}: {help}")
        fn(run_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
