"""PyAV decoding: fixed-shape uint8 clips from any video or image file.

Plain functions on paths and numpy arrays, so the same code runs in a Ray Data task, in the
single-process benchmark loop, in the decoder child process (``decoder_process``) and in
tests. A file that cannot give a clip raises ``Rejected`` with a short, human-readable
reason; callers record it, never drop it.

Clip sampling: ``frames`` frames at ``fps`` (the target rate), the frame stride taken from the
source's real rate. Clip ``c`` starts at source frame ``round(c * stride_s * src_fps)`` and its
frame ``k`` is source frame ``start + round(k * src_fps / fps)`` (rounding half up). Only the
frames a clip needs are converted to RGB, decoding stops after the last needed frame, and a
long gap between clips is crossed with a seek to the previous keyframe.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Seek instead of decoding through a gap longer than this (about two keyframe intervals).
SEEK_GAP_S = 2.0


class Rejected(Exception):
    """A file that yields no usable clip; ``str(err)`` is the reason for the rejects table."""


@dataclass(frozen=True)
class ClipSpec:
    """What one stored clip looks like; the media-level subset of ``DataConfig``."""

    frames: int  # T
    fps: float  # target frames per second
    size: tuple[int, int]  # stored (H, W): resize the short side, then centre crop
    clips_per_video: int  # at most this many clips per file; 0 = as many as fit
    clip_stride_s: float | None  # seconds between clip starts; None = back to back
    max_upscale: float  # reject sources that would need a larger upscale ("too small")
    threads: int = 0  # FFmpeg decoder threads: 0 = FFmpeg's choice (cores + 1), 1 = none

    @property
    def clip_bytes(self) -> int:
        """Bytes of one stored uint8 clip, (T, H, W, 3)."""
        return max(1, self.frames) * self.size[0] * self.size[1] * 3


@dataclass(frozen=True)
class Clip:
    clip: np.ndarray  # (T, H, W, 3) uint8
    start_s: float  # start time in the source, seconds
    fps: float  # the source's real frame rate (0.0 for images)
    clip_index: int  # index of this clip within its source file


def is_video(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def is_image(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def clip_frame_indices(
    clip_index: int, *, frames: int, fps: float, src_fps: float, stride_s: float | None
) -> list[int]:
    """Source frame indices of clip ``clip_index`` (see the module docstring)."""
    stride = stride_s if stride_s is not None else frames / fps
    start = _round_half_up(clip_index * stride * src_fps)
    return [start + _round_half_up(k * src_fps / fps) for k in range(frames)]


def resized_shape(h: int, w: int, size: tuple[int, int]) -> tuple[int, int, float]:
    """``(rh, rw, scale)``: the smallest resize of ``(h, w)`` that covers ``size`` (H, W)."""
    scale = max(size[0] / h, size[1] / w)
    rh = max(size[0], _round_half_up(h * scale))
    rw = max(size[1], _round_half_up(w * scale))
    return rh, rw, scale


def _check_size(h: int, w: int, spec: ClipSpec) -> tuple[int, int]:
    if h < 2 or w < 2:
        raise Rejected(f"too small: {w}x{h}")
    rh, rw, scale = resized_shape(h, w, spec.size)
    if scale > spec.max_upscale:
        raise Rejected(
            f"too small: {w}x{h} needs {scale:.2f}x upscale to cover "
            f"{spec.size[1]}x{spec.size[0]} (max_upscale={spec.max_upscale})"
        )
    return rh, rw


def _to_rgb(frame: av.VideoFrame, rh: int, rw: int, size: tuple[int, int]) -> np.ndarray:
    """Any pixel format and bit depth -> RGB uint8, resized to cover ``size``, centre-cropped.

    Returns ``(H, W, 3)`` uint8.
    """
    shrink = rh <= frame.height and rw <= frame.width
    rgb = frame.to_ndarray(
        format="rgb24", width=rw, height=rh, interpolation="AREA" if shrink else "BICUBIC"
    )  # (rh, rw, 3)
    top = (rh - size[0]) // 2
    left = (rw - size[1]) // 2
    return rgb[top : top + size[0], left : left + size[1]]


def _open(path: str | Path) -> av.container.InputContainer:
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise Rejected(f"unreadable: {err}") from err
    if size == 0:
        raise Rejected("empty file")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise Rejected(f"cannot open: {err}") from err


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        if "audio" in kinds:
            raise Rejected("no video stream (audio-only)")
        raise Rejected(f"no video stream (streams: {kinds or 'none'})")
    return container.streams.video[0]


def _source_fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0 or not math.isfinite(float(rate)):
        raise Rejected("unknown frame rate")
    return float(rate)


def _frame_count_estimate(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """Frames the container claims to hold; 0 when it does not say (then decode until EOF)."""
    if stream.frames:
        return int(stream.frames)
    fps = _source_fps(stream)
    if stream.duration and stream.time_base:
        return int(stream.duration * stream.time_base * fps)
    if container.duration:
        return int(container.duration / av.time_base * fps)
    return 0


def decode_clips(path: str | Path, spec: ClipSpec) -> list[Clip]:
    """All clips of one video file, each ``(T, H, W, 3)`` uint8. Raises ``Rejected``."""
    with _open(path) as container:
        stream = _video_stream(container)
        src_fps = _source_fps(stream)
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise Rejected("cannot open: no frame size in the header")
        rh, rw = _check_size(ctx.height, ctx.width, spec)
        stream.thread_type = "AUTO"  # frame and slice threads...
        stream.codec_context.thread_count = spec.threads  # ...0: FFmpeg picks (cores + 1)

        def indices(c: int) -> list[int]:
            return clip_frame_indices(
                c, frames=spec.frames, fps=spec.fps, src_fps=src_fps, stride_s=spec.clip_stride_s
            )

        n_est = _frame_count_estimate(container, stream)
        cap = spec.clips_per_video or 1_000
        plan: list[list[int]] = []
        while len(plan) < cap:
            idx = indices(len(plan))
            if n_est and idx[-1] > n_est - 1:
                break
            plan.append(idx)
        needed_frames = indices(0)[-1] + 1
        if not plan:
            raise Rejected(
                f"too short: {n_est} frames at {src_fps:.3g} fps; one clip of {spec.frames} "
                f"frames at {spec.fps:g} fps needs {needed_frames}"
            )
        got, last_index = _decode_indices(container, stream, plan, src_fps, rh, rw, spec.size)

    complete = [c for c in range(len(plan)) if c in got]
    # The header's frame count can be off by a frame or two; a larger shortfall is damage.
    shortfall = plan[-1][-1] - last_index
    if n_est and len(complete) < len(plan) and shortfall > max(2, 0.02 * n_est):
        raise Rejected(f"truncated: header says {n_est} frames, decoded only {last_index + 1}")
    if not complete:
        raise Rejected(
            f"too short: decoded {last_index + 1} frames at {src_fps:.3g} fps; one clip needs "
            f"{needed_frames}"
        )
    return [
        Clip(
            clip=got[c],
            start_s=plan[c][0] / src_fps,
            fps=src_fps,
            clip_index=c,
        )
        for c in complete
    ]


def _decode_indices(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    plan: list[list[int]],
    src_fps: float,
    rh: int,
    rw: int,
    size: tuple[int, int],
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames ``plan`` asks for; returns ``({clip: (T, H, W, 3)}, last index seen)``.

    A wanted index is filled by the first decoded frame at or after it, which is exact for
    constant-rate video and the nearest later frame for variable-rate or dropped frames.
    """
    wanted: dict[int, list[tuple[int, int]]] = {}
    for c, idx in enumerate(plan):
        for k, i in enumerate(idx):
            wanted.setdefault(i, []).append((c, k))
    order = sorted(wanted)
    clips: dict[int, np.ndarray] = {}  # allocated on first use: the plan may overshoot EOF
    filled = dict.fromkeys(range(len(plan)), 0)
    ptr = 0
    t0: float | None = None  # time of the first frame: index 0
    counter = -1  # fallback index when frames carry no timestamps (then no seeking)
    last = -1
    seek_to: int | None = None
    try:
        while ptr < len(order):
            if seek_to is not None:
                assert t0 is not None and stream.time_base is not None
                pts = int((t0 + seek_to / src_fps) / stream.time_base)
                container.seek(pts, stream=stream, backward=True, any_frame=False)
                seek_to = None
            resumed = False
            for frame in container.decode(stream):
                counter += 1
                if frame.time is not None and (t0 is not None or counter == 0):
                    t0 = frame.time if t0 is None else t0
                    i = _round_half_up((frame.time - t0) * src_fps)
                else:
                    i = counter
                last = max(last, i)
                rgb = None
                while ptr < len(order) and order[ptr] <= i:
                    rgb = _to_rgb(frame, rh, rw, size) if rgb is None else rgb
                    for c, k in wanted[order[ptr]]:
                        if c not in clips:
                            clips[c] = np.empty((len(plan[c]), *size, 3), np.uint8)
                        clips[c][k] = rgb
                        filled[c] += 1
                    ptr += 1
                if ptr >= len(order):
                    break
                gap_s = (order[ptr] - i) / src_fps
                if gap_s > SEEK_GAP_S and t0 is not None and frame.time is not None:
                    seek_to = order[ptr]
                    resumed = True
                    break
            if not resumed:
                break
    except (av.FFmpegError, ValueError) as err:
        raise Rejected(f"decode error after frame {last}: {err}") from err
    got = {c: a for c, a in clips.items() if filled[c] == a.shape[0]}
    return got, last


def decode_image(path: str | Path, spec: ClipSpec) -> list[Clip]:
    """One image file as a single clip ``(1, H, W, 3)`` uint8. Raises ``Rejected``."""
    with _open(path) as container:
        stream = _video_stream(container)
        try:
            frame = next(container.decode(stream), None)
        except (av.FFmpegError, ValueError) as err:
            raise Rejected(f"decode error: {err}") from err
        if frame is None:
            raise Rejected("decode error: no image data")
        rh, rw = _check_size(frame.height, frame.width, spec)
        rgb = _to_rgb(frame, rh, rw, spec.size)
    return [Clip(clip=rgb[None], start_s=0.0, fps=0.0, clip_index=0)]


def decode_file(path: str | Path, spec: ClipSpec) -> list[Clip]:
    """Clips of a video or image file, chosen by extension. Raises ``Rejected``."""
    if is_image(path):
        return decode_image(path, spec)
    return decode_clips(path, spec)
