"""Test-only region sources (regions.plugin = "tests/_fault_regions.py:NAME"): the built-in source of the
config, except on the frames of a marked video (solid magenta, see magenta_video), where the process
fails the way a GPU model can: a segfault, a hang, a bug of ours."""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import numpy as np


def magenta_video(path: Path, frames: int = 24, size: tuple[int, int] = (96, 64)) -> Path:
    """A real H.264 mp4 whose every frame is magenta: the mark the sources below look for."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[..., 0] = image[..., 2] = 255
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def is_marked(frame: np.ndarray) -> bool:
    r, g, b = (float(frame[..., c].mean()) for c in range(3))
    return r > 200 and b > 200 and g < 60


class _Faulty:
    def __init__(self, inner, fault) -> None:
        self.inner, self.fault = inner, fault
        self.dim, self.max_boxes = inner.dim, inner.max_boxes

    def __call__(self, frames, given_boxes=None):
        if any(is_marked(f) for f in frames):
            self.fault()
        return self.inner(frames, given_boxes)


def _built_in(cfg, device, **options):
    from extractors.regions import build_region_source

    return build_region_source(dataclasses.replace(cfg, plugin=""), device, **options)


def segfault(cfg, device, **options):
    return _Faulty(_built_in(cfg, device, **options), lambda: os.kill(os.getpid(), signal.SIGSEGV))


def hang(cfg, device, **options):
    return _Faulty(_built_in(cfg, device, **options), lambda: time.sleep(10**6))


def bug(cfg, device, **options):
    def fault():
        raise TypeError("unsupported operand (injected bug)")

    return _Faulty(_built_in(cfg, device, **options), fault)
