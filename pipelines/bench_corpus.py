"""A UCF-101-shaped corpus on disk, for measuring ``prepare`` at scale: H.264 files at
320x240 and 25 fps, 4-7 s each, in class folders named like UCF-101's
(``<Class>/v_<Class>_g<group>_c<clip>.mp4``, so clips of one group share a split).

The frames are the synthetic source's procedural scenes (``platform/data/synthetic.py``: textured
shapes moving over a panning background), written with PyAV as that source writes them.
A file's content is a function of its index alone, so two corpora of different
sizes share their first files.

    python pipelines/benchmark.py corpus /tmp/ucf-200 --files 200
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS = 320, 240, 25.0
SECONDS = (4.0, 7.0)
CLIPS_PER_GROUP = 4  # UCF-101 cuts each long video into 4-7 clips (c01..); here 4


def corpus_files(files: int, classes: int) -> list[tuple[int, str, float]]:
    """``[(class index, relative path, seconds), ...]``: round-robin over classes, groups of
    ``CLIPS_PER_GROUP`` clips, each file's length drawn from its index."""
    from vitok.platform.data.synthetic import CLASS_NAMES

    out = []
    for i in range(files):
        cls = i % classes
        name = CLASS_NAMES[cls].title().replace("_", "")
        k = i // classes  # this file's number within its class
        group, clip = k // CLIPS_PER_GROUP + 1, k % CLIPS_PER_GROUP + 1
        seconds = float(np.random.default_rng(i).uniform(*SECONDS))
        out.append((cls, f"{name}/v_{name}_g{group:02d}_c{clip:02d}.mp4", seconds))
    return out


def _write_one(job: tuple[int, int, str, float, str]) -> str:
    from vitok.platform.data.media import encode_video
    from vitok.platform.data.synthetic import render_clip

    index, cls, rel, seconds, root = job
    path = Path(root) / rel
    if path.exists():
        return rel
    frames = render_clip(cls, round(seconds * FPS), HEIGHT, WIDTH, seed=index)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part.mp4")  # not listed by a source: '.part.'
    encode_video(part, frames, FPS, crf=23)
    os.replace(part, path)
    return rel


def write_corpus(root: str | Path, files: int, *, classes: int = 10, workers: int = 0) -> Path:
    """Write (or complete) a corpus of ``files`` videos under ``root``; returns ``root``."""
    root = Path(root).resolve()
    plan = corpus_files(files, classes)
    jobs = [(i, cls, rel, s, str(root)) for i, (cls, rel, s) in enumerate(plan)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_write_one, jobs, chunksize=4))
    return root
