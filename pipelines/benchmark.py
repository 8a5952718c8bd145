"""Benchmarks that print figures (they are not tests).

    python pipelines/benchmark.py data            # prepare: Ray Data vs a process pool
    python pipelines/benchmark.py data --sources videos:/data/UCF-101 --threads 1
    python pipelines/benchmark.py prepare-memory  # peak memory at two corpus sizes
    python pipelines/benchmark.py prepare-resume  # a killed preprocess, rerun
    python pipelines/benchmark.py corpus /tmp/ucf-200 --files 200   # a UCF-shaped corpus
    python pipelines/benchmark.py ingest          # the training read path (bench_read.py)
    python pipelines/benchmark.py faults          # the fault table (vitok.platform.study.faults)
    python pipelines/benchmark.py faults --only claim,shard
    python pipelines/benchmark.py all             # every benchmark with its defaults

Add a benchmark with ``@benchmark("name", help)`` on a function ``(args) -> None`` and an
optional ``<name>_arguments(parser)`` hook registered alongside.
"""

from __future__ import annotations

import argparse
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
# The prepare benchmarks live in bench_prepare.py; these entries dispatch to it.
@benchmark(
    "data",
    "prepare's throughput: Ray Data vs a process pool on every core, CPU use, the ratio",
    lambda p: _prepare_module().data_arguments(p),
)
def bench_data(args: argparse.Namespace) -> None:
    _prepare_module().bench_data(args)


@benchmark(
    "prepare-memory",
    "peak memory of preprocess.py (its whole process tree, Ray included) at corpus sizes",
    lambda p: _prepare_module().memory_arguments(p),
)
def bench_prepare_memory(args: argparse.Namespace) -> None:
    _prepare_module().bench_memory(args)


@benchmark(
    "prepare-resume",
    "a full preprocess.py against one SIGKILLed mid-way and rerun: time, files decoded",
    lambda p: _prepare_module().resume_arguments(p),
)
def bench_prepare_resume(args: argparse.Namespace) -> None:
    _prepare_module().bench_resume(args)


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder to write into (files already there are kept)")
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--classes", type=int, default=10)


@benchmark("corpus", "write a UCF-101-shaped corpus (H.264 320x240, 25 fps)", _corpus_arguments)
def bench_corpus(args: argparse.Namespace) -> None:
    from vitok.pipelines.bench_corpus import write_corpus

    root = write_corpus(args.root, args.files, classes=args.classes)
    size = sum(p.stat().st_size for p in root.rglob("*.mp4"))
    print(f"{args.files} files in {root} ({size / 1e6:.1f} MB)")


def _prepare_module():
    from vitok.pipelines import bench_prepare

    return bench_prepare


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
    from vitok.platform.training.train import TrainConfig

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

    from vitok.platform.data.clips import ClipBatch
    from vitok.platform.training.train import TrainJob, run_training
    from vitok.platform.training.train_data import split_from_arrays

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

    from vitok.platform.data.prepare import to_model_input
    from vitok.platform.training.train import lr_multiplier

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
    from vitok.platform.study.faults import FAULTS, print_table, run_faults

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
    names = [n for n in BENCHMARKS if n != "corpus"] if args.name == "all" else [args.name]
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
