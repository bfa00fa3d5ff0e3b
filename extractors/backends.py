"""Frame decoders other than PyAV, picked by `sampling.backend`: torchcodec and decord.

The file is indexed and the frames planned by PyAV (extractors/decode.py) whatever the backend, so a
backend only decodes the planned frames, by display index, and must return the very frames PyAV
does (tested on the demo corpus and the real sample files). Each maps its own exceptions to a
DecodeError naming the file. A backend that is not installed is a BackendUnavailable at the first
decode, naming the package to install: the job never falls back to another decoder on its own.

Both return frames turned upright at the coded size (they read the display matrix themselves); the
caller applies the sample aspect ratio and the resize policy. decord 3.4 mangles rotated video (4
channels, size errors, or scaled pictures, depending on the size and angle), and seeks to the wrong frame
in open-GOP streams, so rotated and open-GOP files are a DecodeError under decord rather than wrong frames.
"""
from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING

import numpy as np

from extractors.api import DecodeError

if TYPE_CHECKING:
    from extractors.decode import StreamIndex

# backend -> (module to import, what to install)
PACKAGES = {"torchcodec": ("torchcodec.decoders", "torchcodec (pip install torchcodec; it needs FFmpeg's shared "
                                                  "libraries, e.g. apt-get install ffmpeg)"),
            "decord": ("decord", "decord (pip install decord, or decord2 where decord has no wheel)")}


class BackendUnavailable(RuntimeError):
    """sampling.backend names a decoder that cannot be imported here: no video can be decoded."""


def require_backend(name: str) -> None:
    """Raise BackendUnavailable naming the package to install if backend `name` cannot be imported."""
    if name == "pyav":
        return
    module, install = PACKAGES[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a missing shared library (OSError / RuntimeError)
        raise BackendUnavailable(
            f"sampling.backend is {name!r} but it cannot be imported ({type(e).__name__}: {e}); "
            f"install {install}, or set sampling.backend: pyav"
        ) from e


def decode_with_backend(
    name: str, path: str, index: StreamIndex, targets: list[int], threads: int, upright: tuple[int, int], rotation: int
) -> tuple[dict[int, np.ndarray], str]:
    """Frames at display indices `targets`: {index: [H, W, 3] uint8 RGB, upright, coded size}, and "targets".

    upright: (width, height) the frames must have once upright before any resize (a check).
    """
    if index.sequential or index.no_keyflags:  # frames only the decoder can number: no index to address them by
        why = "its timestamps are decode times" if index.sequential else "its container flags no keyframe"
        raise DecodeError(f"{path}: {name} cannot address this stream's frames ({why}); use sampling.backend: pyav")
    decode = {"torchcodec": _torchcodec, "decord": _decord}[name]
    try:
        frames = decode(path, index, targets, threads, rotation)
    except DecodeError:
        raise
    except _library_errors(name) as e:  # what the library raises for anything FFmpeg reports; others are bugs
        raise DecodeError(f"{path}: {name}: {type(e).__name__}: {e}") from e
    coded = (index.height, index.width) if rotation in (90, 270) else (index.width, index.height)
    for i, frame in frames.items():
        if frame.shape != (coded[1], coded[0], 3) or frame.dtype != np.uint8:
            raise DecodeError(f"{path}: {name} returned frame {i} as {frame.dtype} {frame.shape}, expected uint8 "
                              f"{(coded[1], coded[0], 3)} (shown as {upright[0]}x{upright[1]})")
    return frames, "targets"


def _library_errors(name: str) -> tuple[type[BaseException], ...]:
    """The exceptions a backend raises for a file it cannot decode (torchcodec: RuntimeError and ValueError
    from its C++ core; decord: its own DECORDError, which is no RuntimeError)."""
    if name == "decord":
        from decord._ffi.base import DECORDError

        return (DECORDError, RuntimeError, ValueError, OSError)
    return (RuntimeError, ValueError, OSError)


def _torchcodec(path: str, index: StreamIndex, targets: list[int], threads: int, rotation: int) -> dict[int, np.ndarray]:
    """torchcodec in exact mode on our frame table (custom_frame_mappings: no second scan of the file)."""
    from torchcodec.decoders import VideoDecoder

    shown = index.order  # [N] packet position of each frame, display order
    key = np.zeros(len(index.pts), dtype=bool)
    key[index.key_positions] = True
    duration = np.asarray(index.packets.duration, dtype=np.int64)[shown]
    mappings = json.dumps({"frames": [
        {"pts": int(p), "duration": int(d), "key_frame": int(k)}
        for p, d, k in zip(index.pts[shown], duration, key[shown])
    ]})
    decoder = VideoDecoder(path, stream_index=index.stream_index, dimension_order="NHWC",
                           num_ffmpeg_threads=threads, custom_frame_mappings=mappings)
    batch = decoder.get_frames_at(targets)
    wanted = index.pts[shown[targets]] * float(index.time_base)  # [n] seconds
    got = batch.pts_seconds.numpy()
    if not np.allclose(got, wanted, atol=1e-6):
        raise DecodeError(f"{path}: torchcodec returned frames at {got.tolist()} s, asked for {wanted.tolist()} s")
    data = batch.data.numpy()  # [n, H, W, 3] uint8
    return {i: data[j] for j, i in enumerate(targets)}


def _decord(path: str, index: StreamIndex, targets: list[int], threads: int, rotation: int) -> dict[int, np.ndarray]:
    """decord by frame index, after checking that its frame table is ours (count and start times)."""
    import decord

    if rotation:
        raise DecodeError(f"{path}: decord does not decode rotated video correctly (display rotation {rotation} "
                          "degrees); use sampling.backend: pyav or torchcodec")
    if _open_gop(index):
        raise DecodeError(f"{path}: decord returns other frames after seeking in an open-GOP stream (frames after a "
                          "keyframe in decode order are shown before it); use sampling.backend: pyav or torchcodec")
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    if len(reader) != len(index.times):
        raise DecodeError(f"{path}: decord counts {len(reader)} frames where the demuxed stream holds "
                          f"{len(index.times)}; use sampling.backend: pyav for this file")
    starts = reader.get_frame_timestamp(targets)[:, 0]  # [n] seconds
    wanted = index.times[targets] + index.pts[index.order[0]] * float(index.time_base)
    if not np.allclose(starts, wanted, atol=5e-4):  # decord keeps timestamps as float32 seconds
        raise DecodeError(f"{path}: decord's frames {targets} start at {starts.tolist()} s, ours at {wanted.tolist()} s")
    data = reader.get_batch(targets).asnumpy()  # [n, H, W, 3] uint8
    return {i: data[j] for j, i in enumerate(targets)}


def _open_gop(index: StreamIndex) -> bool:
    """Some keyframe after the first is followed, in decode order, by a frame shown before it (leading
    B-frames, as MPEG-2 and MPEG-4 part 2 encoders make by default): after a seek there, decord's frame
    count is off by the leading frames (it returned frame 36 for 34 in an MPEG-2 mp4 with 2 B-frames)."""
    keys = list(index.key_positions) + [len(index.pts)]
    return any(index.pts[a + 1 : b].min(initial=index.pts[a]) < index.pts[a] for a, b in zip(keys[1:-1], keys[2:]))
