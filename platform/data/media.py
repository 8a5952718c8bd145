"""Media files in and out: decode clips from any video or image file, encode a video.

``vitok.platform.data.media`` is where the rest of the code imports these from:

- ``clip_decode``: PyAV decoding of fixed-shape uint8 clips (``decode_file``), the clip
  sampling arithmetic, and ``Rejected`` (a file that yields no clip, with the reason).
- ``decoder_process``: the same decode in an abandonable child process
  (``decode_file_isolated``), for files that hang or crash the decoder.
- here: ``encode_video`` (frames to an mp4 with PyAV, for synthetic data and previews).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from vitok.platform.data.clip_decode import (
    IMAGE_EXTENSIONS,
    SEEK_GAP_S,
    VIDEO_EXTENSIONS,
    Clip,
    ClipSpec,
    Rejected,
    clip_frame_indices,
    decode_clips,
    decode_file,
    decode_image,
    is_image,
    is_video,
    resized_shape,
)
from vitok.platform.data.decoder_process import IsolatedDecoder, decode_file_isolated

__all__ = [
    "IMAGE_EXTENSIONS",
    "SEEK_GAP_S",
    "VIDEO_EXTENSIONS",
    "Clip",
    "ClipSpec",
    "IsolatedDecoder",
    "Rejected",
    "clip_frame_indices",
    "decode_clips",
    "decode_file",
    "decode_file_isolated",
    "decode_image",
    "encode_video",
    "is_image",
    "is_video",
    "resized_shape",
]


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
