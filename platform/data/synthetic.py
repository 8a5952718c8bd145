"""Procedural labelled clips, rendered by Ray tasks and written as real mp4 files with PyAV.

A class is a (shape, motion) pair: a textured square, disc or triangle moving right, left,
up or down, orbiting, or pulsing in size, over a textured background that drifts slowly (a
camera pan). Textures (a two-colour checkerboard on the shape, random gratings plus smooth
noise behind it) keep reconstruction from being trivial. Files land in
``<root>/<class name>/syn_<index>.mp4``, so the parent folder is the label, as in UCF-101.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import ray

from vitok.platform import storage
from vitok.platform.data.media import encode_video

SHAPES = ("square", "disc", "triangle")
MOTIONS = ("right", "left", "up", "down", "orbit", "pulse")
# lcm(3, 6) = 6 would repeat; pair them so consecutive classes differ in shape and motion.
CLASSES: tuple[tuple[str, str], ...] = tuple(
    (SHAPES[i % len(SHAPES)], MOTIONS[(i + i // len(MOTIONS)) % len(MOTIONS)])
    for i in range(len(SHAPES) * len(MOTIONS))
)
CLASS_NAMES = tuple(f"{shape}_{motion}" for shape, motion in CLASSES)
assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)

SYNTHETIC_VERSION = 1  # bump when rendering changes: part of the cache key


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """``(h, w, 3)`` float in [0, 1]: coarse noise upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw, 3))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy  # (h, w, 3)


def render_clip(class_index: int, n_frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """One synthetic video ``(n_frames, h, w, 3)`` uint8 of class ``CLASSES[class_index]``."""
    shape, motion = CLASSES[class_index]
    rng = np.random.default_rng(seed)
    # Background twice the frame size so it can pan; gratings plus smooth noise.
    bh, bw = 2 * h, 2 * w
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    background = 0.5 * _smooth_noise(rng, bh, bw, cell=max(4, h // 6))
    for _ in range(2):
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
        background += 0.25 * (0.5 + 0.5 * np.sin(phase))[..., None] * rng.random(3)
    background = np.clip(background, 0, 1)
    pan = rng.uniform(-0.3, 0.3, size=2)  # pixels per frame

    bright = rng.random(3)
    bright = 0.35 + 0.65 * bright / bright.max()  # a saturated colour...
    colours = np.stack([bright, 0.2 * bright])  # ...checkered with a dark shade of itself
    checker = max(2, int(rng.integers(2, 5)))
    radius = rng.uniform(0.18, 0.28) * min(h, w)
    speed = rng.uniform(0.6, 1.2) * min(h, w) / 24.0  # pixels per frame
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    fy, fx = np.mgrid[0:h, 0:w].astype(np.float32)

    out = np.empty((n_frames, h, w, 3), np.uint8)
    for t in range(n_frames):
        oy = int(np.floor(h / 2 + pan[0] * t)) % h
        ox = int(np.floor(w / 2 + pan[1] * t)) % w
        frame = background[oy : oy + h, ox : ox + w].copy()  # (h, w, 3)
        y, x, r = cy, cx, radius
        if motion == "right":
            x = (cx + speed * t) % w
        elif motion == "left":
            x = (cx - speed * t) % w
        elif motion == "down":
            y = (cy + speed * t) % h
        elif motion == "up":
            y = (cy - speed * t) % h
        elif motion == "orbit":
            angle = speed * t / (0.25 * min(h, w))
            y, x = h / 2 + 0.25 * h * np.sin(angle), w / 2 + 0.25 * w * np.cos(angle)
        elif motion == "pulse":
            r = radius * (0.75 + 0.35 * np.sin(2 * np.pi * t / 12.0))
        dy, dx = fy - y, fx - x
        if shape == "square":
            mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        elif shape == "disc":
            mask = dy**2 + dx**2 <= r**2
        else:  # triangle pointing up
            mask = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        parity = ((np.floor(dy / checker) + np.floor(dx / checker)) % 2).astype(int)
        frame[mask] = colours[parity[mask]]
        out[t] = (frame * 255 + 0.5).astype(np.uint8)
    return out


@ray.remote(num_cpus=1)
def _render_files(jobs: list[tuple[int, int, str]], n_frames: int, h: int, w: int, fps: float):
    """Render and encode ``[(class_index, seed, uri), ...]`` on any node: each file is encoded
    into local scratch, then written to its place under the storage root in one piece."""
    written = []
    for class_index, seed, uri in jobs:
        frames = render_clip(class_index, n_frames, h, w, seed)
        with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as tmp:
            local = Path(tmp) / "clip.mp4"
            encode_video(local, frames, fps)
            storage.write_bytes(uri, local.read_bytes())
        written.append(uri)
    return written


def make_synthetic(
    root: str,
    *,
    classes: int,
    videos: int,
    n_frames: int,
    height: int,
    width: int,
    fps: float,
    seed: int,
) -> list[Path]:
    """Render ``videos`` mp4 files (round-robin over ``classes``) into ``root`` (a folder or URI
    under the storage root) with Ray tasks; returns their paths relative to ``root``
    (``<class>/syn_00000.mp4``).

    ``root`` is keyed by the caller on these arguments; a finished ``root`` (``done.json``,
    written last) is reused without rendering.
    """
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"synthetic classes={classes} must lie in [1, {len(CLASSES)}]")
    done = storage.join(root, "done.json")
    if storage.is_file(done):
        return list(storage.read_json(done)["files"])
    files = [f"{CLASS_NAMES[i % classes]}/syn_{i:05d}.mp4" for i in range(videos)]
    jobs = [
        (i % classes, seed * 1_000_003 + i, storage.join(root, rel)) for i, rel in enumerate(files)
    ]
    chunks = [jobs[i::8] for i in range(min(8, len(jobs)))]
    refs = [_render_files.remote(chunk, n_frames, height, width, fps) for chunk in chunks]
    ray.get(refs, timeout=1800)
    storage.write_json(done, {"files": files})
    return files
