"""``python pipelines/benchmark.py ingest``: the training read path against the machine's
limit, from local disk and from an S3 storage root (a moto server on 127.0.0.1).

For each clip size it writes a UCF-shaped corpus (videos of 2-3 clips, stored video by
video, as prepare writes them: ``shard_layout``), times a plain single-thread pyarrow loop
over the files (``ParquetFile.iter_batches``, the clip column viewed as uint8 and copied
into a torch tensor: the machine's limit), then ``world`` reader processes at once (the
worker's ``SplitReader`` over its share of an epoch, clips and labels, each batch cropped
and flipped in the reader thread by the tokenizer's batch function, ``ClipBatch``, as the
training loop runs it: uint8 crops, scaled to [-1, 1] on the device in the step).
Per row: MB read per worker against its share, clips/s and MB/s per worker and all
together, time to the first batch and its floor (the storage serving the same requests
bare, in every worker at once: ``first_reads``), the most Arrow memory a worker held at
once (its buffer, against its share), the same-video pair share of the plan's global
batches against a uniform permutation's, and what one GPU consumes (clips/s of the variant
at 40% MFU on an H100, from ``model_stats``).
Then the clip encodings (raw, JPEG, WebP per frame) on real clips: bytes per clip and
decode clips/s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

SHARD_BYTES = 64 * 2**20  # as the writer (ingest.SHARD_BYTES)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="16x64x64,16x128x128", help="TxHxW, comma-separated")
    p.add_argument("--clips", default="10000,2500", help="clips per size (local: 2 GB each)")
    p.add_argument("--s3-clips", default="2000,1000", help="clips per size (S3, in memory)")
    p.add_argument("--worlds", default="1,2,4,8")
    p.add_argument("--sources", default="local,s3")
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--read-threads", type=int, default=0, help="reader threads (0: auto)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead")
    p.add_argument("--read-span", type=int, default=0, help="row groups a read (0: auto)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each row; the best counts")
    p.add_argument("--variant", default="S-B/4x8", help="the GPU demand column's tokenizer")
    p.add_argument("--encodings", default="raw,jpeg,webp", help="'' to skip that table")
    p.add_argument("--json", default=None, help="write the rows as a JSON list here")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")


# ----------------------------------------------------------------------------- corpus
def ucf_videos(n: int, seed: int = 0) -> np.ndarray:
    """Video id of each of ``n`` clips in stored order: 2-3 clips per video, back to back."""
    per_video = np.random.default_rng(seed).integers(2, 4, n)
    return np.repeat(np.arange(n), per_video)[:n]


def write_corpus(folder: Path, n: int, shape: tuple[int, ...]) -> tuple[list[str], np.ndarray]:
    """``n`` random clips in shards of about 64 MB, with the writer's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitok.platform.data.shard_layout import encode_clips, parquet_write_options

    videos = ucf_videos(n)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = max(1, SHARD_BYTES // int(np.prod(shape)))
    rng, files = np.random.default_rng(0), []
    for i, start in enumerate(range(0, n, per_file)):
        rows = np.arange(start, min(n, start + per_file))
        clips = rng.integers(0, 256, (len(rows), *shape), dtype=np.uint8)
        table = pa.table(
            {
                "clip": pa.array(list(encode_clips(clips)), pa.binary()),
                "label": pa.array(videos[rows] % 101),
                "path": pa.array([f"/data/UCF-101/v_{v:05d}.avi" for v in videos[rows]]),
            }
        )
        files.append(str(folder / f"part-{i:04d}.parquet"))
        pq.write_table(table, files[-1], **parquet_write_options())
    return files, videos


def plain_loop(files: list[str], shape: tuple[int, ...]) -> tuple[int, float]:
    """(clips, seconds): one thread, whole files, as fast as pyarrow hands them over."""
    import pyarrow.parquet as pq
    import torch

    from vitok.platform import storage
    from vitok.platform.data.shard_layout import decode_clips

    n, started = 0, time.perf_counter()
    for uri in files:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(batch_size=32, columns=["clip"]):
                clips = torch.from_numpy(decode_clips(batch.column(0), shape).copy())
                n += len(clips)
    return n, time.perf_counter() - started


# ----------------------------------------------------------------------------- workers
def _rchar() -> int:
    """Bytes this process read through system calls (local files; Linux)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


_WARM: list[bool] = []  # whether this process has read once


def _warm(_: int = 0) -> int:
    """A pool process made ready to read, once: a worker's whole read path run over a tiny
    local corpus, so that no row times a process's first-use costs (0.17 s to the first
    batch in a fresh process, 0.016 s after; a whole 2000-clip epoch at world 1 takes 0.3
    s). Storage stays cold: the S3 client is first used in the timed read."""
    if not _WARM:
        from vitok.platform.data.shard_splits import ShardSplit

        shape = (2, 8, 8, 3)
        with tempfile.TemporaryDirectory(prefix="vitok-warm-") as folder:
            files, _ = write_corpus(Path(folder), 4, shape)
            split = ShardSplit.from_files(files, ("clip", "label"), shape)
            opts = {"batch_size": 2, "threads": 0, "prefetch": 1, "span": 1}
            _epoch(split, 1, 0, opts)
        _WARM.append(True)
    return os.getpid()


def _config(opts: dict[str, Any]) -> Any:
    from vitok.platform.training.train import TrainConfig

    return TrainConfig(
        batch_size=opts["batch_size"],
        cache_mb=0,
        read_threads=opts["threads"],
        prefetch_batches=opts["prefetch"],
        read_span=opts["span"],
    )


def read_share(split: Any, world: int, rank: int, opts: dict[str, Any]) -> dict[str, Any]:
    """One worker's epoch, as the training loop reads it (``WorkerData``), each batch made by
    the tokenizer's batch function in the reader thread, in a process that has read before."""
    _warm()
    return _epoch(split, world, rank, opts)


def _epoch(split: Any, world: int, rank: int, opts: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa
    import torch

    from vitok.platform.data.clips import ClipBatch
    from vitok.platform.training.train_data import WorkerData

    torch.set_num_threads(1)
    _, h, w, _ = split.clip_shape
    data = WorkerData({"train": split}, _config(opts), rank, world)

    batch_fn = ClipBatch((h * 7 // 8, w * 7 // 8))

    def augment(batch: dict[str, Any], i: int) -> dict[str, torch.Tensor]:  # reader thread
        gen = torch.Generator().manual_seed(i)  # as the loop seeds it, by micro step
        return batch_fn(batch, True, gen)

    io_before, begin, clips, first, held = _rchar(), time.time(), 0, None, 0
    for x in data.train_batches(0, transform=augment):
        clips += len(x["x"])
        first = first or time.time() - begin
        held = max(held, pa.total_allocated_bytes())  # Arrow buffers the reader holds
    end = time.time()
    reader = data.readers["train"]
    data.close()
    return {
        "clips": clips,
        "begin": begin,
        "end": end,
        "first_batch_s": first,
        "bytes": reader.bytes_read + reader.footer_bytes,
        "rchar": _rchar() - io_before,
        "arrow_mb": held / 1e6,
    }


def first_reads(split: Any, world: int, rank: int, opts: dict[str, Any]) -> float:
    """Seconds the storage takes to serve the requests of this worker's first batch with no
    reader around them: for each unit the first batch needs, a handle opened on the file and
    one ranged read of the unit's bytes, on as many threads as the reader has. Run in all
    ``world`` processes at once, it is the floor under the reader's time to first batch
    (on moto, whose requests cost it time in proportion to the whole object, the floor)."""
    from concurrent.futures import ThreadPoolExecutor

    from vitok.platform import storage
    from vitok.platform.training.train_data import WorkerData

    data = WorkerData({"train": split}, _config(opts), rank, world)
    reader = data.readers["train"]
    rows = data.order(0)[: opts["batch_size"]]
    units = np.unique(np.searchsorted(reader.starts, rows, side="right") - 1)
    requests = []
    for unit in units:
        index, first, count = reader.units.spans[unit]
        meta = reader.units._metadata(index)
        chunk = meta.row_group(first).column(0)
        offset = min(chunk.data_page_offset, chunk.dictionary_page_offset or chunk.file_offset)
        nbytes = int(reader.units._sizes[index][first : first + count].sum())  # as read
        requests.append((split.files[index], offset, nbytes))
    data.close()

    def fetch(request: tuple[str, int, int]) -> int:
        uri, offset, nbytes = request
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            return len(f.read_at(nbytes, offset))

    started = time.perf_counter()
    with ThreadPoolExecutor(reader.threads) as pool:
        list(pool.map(fetch, requests))
    return time.perf_counter() - started


def shuffle_ratio(split: Any, videos: np.ndarray, world: int, opts: dict[str, Any]) -> float:
    """Same-video pair share of the plan's global batches over a uniform permutation's
    (three epochs; the plan alone, no reads)."""
    from vitok.platform.data.read_plan import same_group_pair_share, uniform_pair_share
    from vitok.platform.training.train_data import WorkerData

    bs = opts["batch_size"]
    workers = [WorkerData({"train": split}, _config(opts), r, world) for r in range(world)]
    shares = []
    for epoch in range(3):
        orders = [w.order(epoch).reshape(-1, bs) for w in workers]
        shares.append(same_group_pair_share(list(videos[np.concatenate(orders, axis=1)])))
    return float(np.mean(shares)) / uniform_pair_share(videos)


def measure(pool, split, videos, shape, source: str, args, plain: tuple[int, float]) -> list:
    """One row per world size."""
    from vitok.pipelines.model_stats import gpu_demand

    rows, clip_mb = [], int(np.prod(shape)) / 1e6
    total_mb = sum(b for rows_ in split.group_rows for b in rows_) * clip_mb
    demand = gpu_demand(args.variant, shape)
    opts = {"batch_size": args.batch_size, "threads": args.read_threads}
    opts.update(prefetch=args.prefetch, span=args.read_span)
    for world in (int(w) for w in args.worlds.split(",")):
        runs = []
        for _ in range(args.repeat):  # the best of a few runs: the machine is shared
            futures = [pool.submit(read_share, split, world, r, opts) for r in range(world)]
            out = [f.result() for f in futures]
            runs.append((max(o["end"] for o in out) - min(o["begin"] for o in out), out))
        seconds, out = min(runs, key=lambda run: run[0])
        floors = []
        for _ in range(args.repeat):
            futures = [pool.submit(first_reads, split, world, r, opts) for r in range(world)]
            floors.append(max(f.result() for f in futures))
        clips = sum(o["clips"] for o in out)
        per_worker = [o["clips"] / (o["end"] - o["begin"]) for o in out]
        row = {
            "world": world,
            "clip": "x".join(map(str, shape[:3])),
            "source": source,
            "mb_read_per_worker": max(o["bytes"] for o in out) / 1e6,
            "mb_share_per_worker": total_mb / world,
            "rchar_mb_per_worker": max(o["rchar"] for o in out) / 1e6
            if source == "local"
            else None,
            "clips_per_s": clips / seconds,
            "mb_per_s": clips * clip_mb / seconds,
            "clips_per_s_per_worker": float(np.mean(per_worker)),
            "mb_per_s_per_worker": float(np.mean(per_worker)) * clip_mb,
            "plain_clips_per_s": plain[0] / plain[1],
            "first_batch_s": max(o["first_batch_s"] for o in out),
            "first_batch_floor_s": min(floors),
            "peak_arrow_mb_per_worker": max(o["arrow_mb"] for o in out),
            "same_video_pair_ratio": shuffle_ratio(split, videos, world, opts),
            "gpu_clips_per_s": demand,
            "gpu_mb_per_s": demand * clip_mb,
        }
        row["of_plain"] = row["clips_per_s"] / row["plain_clips_per_s"]
        rows.append(row)
        print_row(row)
    return rows


HEADER = (
    f"{'source':<6} {'clip':<10} {'world':>5} {'MB read/worker':>14} {'share':>7} "
    f"{'clips/s':>8} {'MB/s':>6} {'per worker':>10} {'plain':>7} {'of plain':>8} "
    f"{'1st batch s':>11} {'floor s':>7} {'held MB':>7} {'pairs/unif':>10} {'GPU clips/s':>11} "
    f"{'GPU MB/s':>8}"
)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['source']:<6} {r['clip']:<10} {r['world']:>5} {r['mb_read_per_worker']:>14.1f} "
        f"{r['mb_share_per_worker']:>7.1f} {r['clips_per_s']:>8.0f} {r['mb_per_s']:>6.0f} "
        f"{r['clips_per_s_per_worker']:>10.0f} {r['plain_clips_per_s']:>7.0f} "
        f"{r['of_plain']:>7.0%} {r['first_batch_s']:>11.2f} {r['first_batch_floor_s']:>7.2f} "
        f"{r['peak_arrow_mb_per_worker']:>7.0f} {r['same_video_pair_ratio']:>10.2f} "
        f"{r['gpu_clips_per_s']:>11.0f} {r['gpu_mb_per_s']:>8.0f}",
        flush=True,
    )


# ----------------------------------------------------------------------------- S3
class MotoServer:
    """``moto_server`` on 127.0.0.1 and a free port (in-memory S3), with its client env."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = Path(sys.executable).parent / "moto_server"
        log = open(workdir / "moto.log", "ab")  # noqa: SIM115 - kept for the server's life
        cmd = [str(exe), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("moto_server did not start in 60 s")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def upload(files: list[str], bucket: str, prefix: str) -> list[str]:
    import pyarrow.fs

    from vitok.platform import storage

    endpoint = urlsplit(os.environ["AWS_ENDPOINT_URL"])
    maker = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc, scheme=endpoint.scheme, allow_bucket_creation=True
    )
    if maker.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
        maker.create_dir(bucket)
    fs, _ = storage.filesystem(f"s3://{bucket}/")
    out = []
    for f in files:
        out.append(f"s3://{bucket}/{prefix}/{Path(f).name}")
        pyarrow.fs.copy_files(f, f"{bucket}/{prefix}/{Path(f).name}", destination_filesystem=fs)
    return out


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import multiprocessing

    from vitok.platform.data.shard_splits import ShardSplit

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitok-bench-read-"))
    shapes = [tuple(int(v) for v in s.split("x")) + (3,) for s in args.sizes.split(",")]
    counts = dict(local=args.clips.split(","), s3=args.s3_clips.split(","))
    sources = args.sources.split(",")
    moto = MotoServer(work) if "s3" in sources else None
    if moto:
        os.environ.update(moto.env())  # the reader processes inherit it
    workers = max(int(w) for w in args.worlds.split(","))
    context = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_warm, range(workers * 2)))
            print(HEADER, flush=True)
            for i, shape in enumerate(shapes):
                for source in sources:
                    n = int(counts[source][i])
                    name = "x".join(map(str, shape[:3]))
                    files, videos = write_corpus(work / f"{name}-{n}", n, shape)
                    if source == "s3":
                        files = upload(files, "bench", f"{name}-{n}")
                    split = ShardSplit.from_files(files, ("clip", "label"), shape)
                    plain = min(
                        (plain_loop(files, shape) for _ in range(args.repeat)), key=lambda r: r[1]
                    )
                    rows += measure(pool, split, videos, shape, source, args, plain)
    finally:
        if moto:
            moto.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.encodings:
        from vitok.pipelines.bench_encoding import encoding_table

        encoding_table(shapes + [(16, 256, 256, 3)], args.encodings.split(","), args.variant)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")
    return rows
