"""PyAV decode and encode: fixed-shape uint8 clips from any video or image file.

Everything here is plain functions on paths and numpy arrays, so the same code runs in a Ray
Data task, in the single-process benchmark loop and in tests. A file that cannot give a clip
raises ``Rejected`` with a short, human-readable reason; callers record it, never drop it.

``IsolatedDecoder`` runs ``decode_file`` in a child process that can be abandoned: a file
that hangs the decoder (inside FFmpeg, where no Python exception reaches) is cut off after a
timeout, and one that crashes it (a segfault, the OOM killer) is rejected, not fatal.

Clip sampling: ``frames`` frames at ``fps`` (the target rate), the frame stride taken from the
source's real rate. Clip ``c`` starts at source frame ``round(c * stride_s * src_fps)`` and its
frame ``k`` is source frame ``start + round(k * src_fps / fps)`` (rounding half up). Only the
frames a clip needs are converted to RGB, decoding stops after the last needed frame, and a
long gap between clips is crossed with a seek to the previous keyframe.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
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
        stream.thread_type = "AUTO"

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


def encode_video(
    path: str | Path, frames: np.ndarray, fps: float, *, codec: str = "libx264", crf: int = 18
) -> None:
    """Write ``frames`` ``(N, H, W, 3)`` uint8 (H, W even) as a video file with PyAV."""
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frames shape {frames.shape}: H and W must be even for yuv420p")
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


# ----------------------------------------------------------------------------- isolation
DECODER_IDLE_EXIT_S = 300.0  # a decoder child with no work for this long leaves
_IDLE_EXIT = 3  # its exit code then (the parent just starts another)
_CHILD = """
import json, os, sys
sys.path[:] = json.loads(os.environ.pop("VITOK_DECODER_SYS_PATH"))
from vitok.platform.runtime import use_shipped_code
use_shipped_code(os.environ.pop("VITOK_DECODER_ROOT", None) or None)
from vitok.platform.media import serve_decoder
serve_decoder(int(sys.argv[1]), int(sys.argv[2]))
"""


def serve_decoder(fd_in: int, fd_out: int) -> None:
    """The decoder child's loop: ``(path, spec, timeout_s, fault)`` in, one reply out:
    ``("ok", [(clip, start_s, fps, clip_index), ...])``, ``("rejected", reason)`` or
    ``("error", text)``. ``fault`` ("hang", "crash") stands in for a broken decoder in tests."""
    import faulthandler
    from multiprocessing.connection import Connection

    requests, replies = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    while True:
        if not requests.poll(DECODER_IDLE_EXIT_S):
            os._exit(_IDLE_EXIT)
        try:
            path, spec, timeout_s, fault = requests.recv()
        except (EOFError, OSError):  # the parent is gone
            os._exit(0)
        # Should the parent die while a decode hangs, the child still ends: faulthandler's
        # watchdog is a C thread that needs no GIL (it also prints where it hung).
        faulthandler.dump_traceback_later(timeout_s + 30.0, exit=True)
        try:
            _inject(fault)
            clips = decode_file(path, spec)
            reply = ("ok", [(c.clip, c.start_s, c.fps, c.clip_index) for c in clips])
        except Rejected as err:
            reply = ("rejected", str(err))
        except Exception as err:  # noqa: BLE001 - reported as the file's reject reason
            reply = ("error", f"{type(err).__name__}: {err}")
        faulthandler.cancel_dump_traceback_later()
        try:
            replies.send(reply)
        except OSError:
            os._exit(0)


def _inject(fault: str | None) -> None:
    if fault == "hang":  # native code holding the GIL: no Python signal handler runs
        import ctypes

        ctypes.PyDLL(None).sleep(10**6)
    elif fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class IsolatedDecoder:
    """``decode_file`` in a long-lived child process (one per calling process, reused).

    A file with no result after ``timeout_s`` is rejected with a reason starting
    ``timeout``, a file during which the child dies with one starting ``crashed``; the child
    is replaced for the next file. The cost is a pipe round trip per file (clips are pickled
    back) and one interpreter start per calling process.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._requests = self._replies = None
        self._lock = threading.Lock()

    def decode(
        self, path: str | Path, spec: ClipSpec, timeout_s: float, fault: str | None = None
    ) -> list[Clip]:
        with self._lock:
            for attempt in range(2):
                self._start()
                try:
                    self._requests.send((str(path), spec, timeout_s, fault))
                except OSError:  # it had left for lack of work: start another
                    self._stop()
                    continue
                if not self._replies.poll(timeout_s):
                    self._stop()
                    raise Rejected(
                        f"timeout: no result after {timeout_s:g} s (data.decode_timeout_s); "
                        "the decoder was stopped"
                    )
                try:
                    kind, payload = self._replies.recv()
                except (EOFError, OSError):
                    code = self._stop()
                    if code == _IDLE_EXIT and attempt == 0:
                        continue
                    raise Rejected(
                        f"crashed: the decoder process died ({_exit_reason(code)})"
                    ) from None
                if kind == "rejected":
                    raise Rejected(payload)
                if kind == "error":  # as an in-process decode reports it
                    raise Rejected(f"error: {payload}")
                return [Clip(clip=c, start_s=s, fps=f, clip_index=i) for c, s, f, i in payload]
        raise Rejected("crashed: the decoder process could not be started")

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # The child runs exactly this process's code: same interpreter, sys.path and, in a
        # Ray job, the same shipped copy of vitok.
        roots = [str(f.vitok_root) for f in sys.meta_path if hasattr(f, "vitok_root")]
        env = {**os.environ, "VITOK_DECODER_SYS_PATH": json.dumps(sys.path)}
        env["VITOK_DECODER_ROOT"] = roots[0] if roots else ""
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._requests = Connection(req_w, readable=False)
        self._replies = Connection(rep_r, writable=False)

    def _stop(self) -> int | None:
        """End the child (SIGKILL: a hung decode ignores anything gentler); its exit code."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            code = self._proc.wait()
            self._proc = None
        for conn in (self._requests, self._replies):
            if conn is not None:
                conn.close()
        self._requests = self._replies = None
        return code

    def close(self) -> None:
        with self._lock:
            self._stop()


_DECODER: IsolatedDecoder | None = None
_DECODER_LOCK = threading.Lock()


def decode_file_isolated(
    path: str | Path, spec: ClipSpec, timeout_s: float, *, fault: str | None = None
) -> list[Clip]:
    """``decode_file`` in this process's decoder child, cut off after ``timeout_s``."""
    global _DECODER
    with _DECODER_LOCK:
        if _DECODER is None:
            _DECODER = IsolatedDecoder()
    return _DECODER.decode(path, spec, timeout_s, fault)
