"""WebVid-like H.264 test clips made with PyAV (libx264 defaults unless told), for the benchmark and tests.

Smooth motion (drifting sinusoidal patterns) lets x264 choose B-frames the way it does on real footage.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def smooth_frame(width: int, height: int, t: float) -> np.ndarray:
    """[H, W, 3] uint8 RGB: drifting interference patterns at time t (seconds)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin((xx + 40 * t) / 37.0) * np.cos((yy - 25 * t) / 23.0)
    g = 127 + 100 * np.sin((xx * 0.7 - yy * 0.3 + 60 * t) / 29.0)
    b = 127 + 100 * np.cos((yy + 30 * t) / 41.0)
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def make_clip(
    path: str | Path,
    width: int = 596,
    height: int = 336,
    seconds: float = 20.0,
    fps: int = 30,
    x264_params: str = "",
    frame_times: list[float] | None = None,
    codec: str = "libx264",
) -> Path:
    """Write a clip (default H.264 with x264 defaults: GOP 250, 3 B-frames; x264_params e.g. "bframes=0").

    frame_times: explicit presentation times in seconds, for a variable-frame-rate clip.
    codec: another FFmpeg encoder (libx265, libvpx-vp9, mpeg4) for the container that `path` names.
    """
    path = Path(path)
    times = frame_times if frame_times is not None else [i / fps for i in range(int(round(seconds * fps)))]
    options = {"x264-params": x264_params} if x264_params else {}
    if codec == "libx265":
        options = {"x265-params": "log-level=error"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        time_base = Fraction(1, 90000)
        stream.codec_context.time_base = time_base
        for t in times:
            frame = av.VideoFrame.from_ndarray(smooth_frame(width, height, t), format="rgb24")
            frame.pts, frame.time_base = int(round(t / time_base)), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
