"""Frame decoders other than PyAV, picked by `sampling.backend`: torchcodec and decord.

The file is indexed and the frames planned by PyAV (extractors/decode.py) whatever the backend, so a
backend only decodes the planned frames, by display index, and must return the very frames PyAV
does. Both address a frame by its timestamp: they seek to the keyframe before it and decode up to the
frame whose timestamp is the one asked for. That is exact only where the container stores each frame's
timestamp and its seek lands on the keyframe asked for; elsewhere they return other pictures whose
timestamps still match (ASF and FLV seeks land on another keyframe; AVI stores no presentation times and
FFmpeg versions guess them differently) or fail (MPEG-TS, DV). Neither library lets us see which
picture it decoded, so each backend decodes only from the containers it is proven exact on
(CONTAINERS: every plan, picture identity against a full decode, in tests/test_extractors_matrix.py);
any other file is a DecodeError up front naming the reason and `use sampling.backend: pyav`. Each maps
its own exceptions to such a DecodeError too. A backend that is not installed is a BackendUnavailable at
the first decode, naming the package to install: the job never falls back to another decoder on its own.

Both return frames turned upright at the coded size (they read the display matrix themselves); the
caller applies the sample aspect ratio and the resize policy. decord 3.4 mangles rotated video (4
channels, size errors, or scaled pictures, depending on the size and angle), and seeks to the wrong frame
in open-GOP streams, so rotated and open-GOP files are a DecodeError under decord rather than wrong frames.
"""
from __future__ import annotations

import importlib
import json
import re
from typing import TYPE_CHECKING

import numpy as np

from extractors.api import DecodeError

if TYPE_CHECKING:
    from extractors.decode import StreamIndex

# backend -> (module to import, what to install)
PACKAGES = {"torchcodec": ("torchcodec.decoders", "torchcodec (pip install torchcodec; it needs FFmpeg's shared "
                                                  "libraries, e.g. apt-get install ffmpeg)"),
            "decord": ("decord", "decord (pip install decord, or decord2 where decord has no wheel)")}
FIX = "use sampling.backend: pyav"
MOV = "mov,mp4,m4a,3gp,3g2,mj2"
# Demuxers (PyAV's names) each backend returns exact frames from, in every plan (tests/test_extractors_matrix.py:
# torchcodec 0.17 on FFmpeg 5.1, decord2 3.4). Each stores every frame's timestamp and seeks to a keyframe exactly.
CONTAINERS = {
    "torchcodec": {MOV, "matroska,webm", "avi", "ogg", "nut", "gif", "yuv4mpegpipe", "asf"},
    "decord": {MOV, "matroska,webm", "avi", "gif", "yuv4mpegpipe", "dv"},
}
# Why a container is not in CONTAINERS, where the matrix found out (other containers: not tried)
NOT_EXACT = {
    ("torchcodec", "mpegts"): "every request ends in 'no more frames left to decode': its FFmpeg's seek in "
                              "MPEG-TS lands past the frames",
    ("torchcodec", "dv"): "every request ends in 'no more frames left to decode': its FFmpeg cannot seek in DV",
    ("torchcodec", "flv"): "FLV has no seek index, and its FFmpeg's seek to the last keyframe finds no frame ('no "
                           "more frames left to decode')",
    ("torchcodec", "mpeg"): "its seek in MPEG program streams lands on other frames",
    ("torchcodec", "apng"): "it cannot measure the stream's duration",
    ("decord", "asf"): "ASF seeks land a keyframe early or late and decord does not check where it landed, so it "
                       "returns pictures of another GOP with the asked timestamps",
    ("decord", "flv"): "FLV has no seek index: a seek to the last keyframe lands on another keyframe and decord "
                       "does not check where it landed, so it returns a picture of another GOP",
    ("decord", "mpegts"): "its seeks in MPEG-TS run to the end of the file ('Unable to handle EOF')",
    ("decord", "ogg"): "it cannot count the frames ('broken metadata')",
    ("decord", "nut"): "it cannot count the frames ('broken metadata')",
    ("decord", "apng"): "it cannot count the frames ('broken metadata')",
}

# What a library's error means, where the matrix met it (a substring of its message -> the reason)
LIBRARY_ERRORS = (
    ("maximum pts value in seconds is unknown", "the header gives no duration (a live-recorded WebM, APNG), which "
                                                "torchcodec needs before it takes our frame table"),
    ("broken metadata", "the header gives no frame count or duration, which decord needs"),
    ("from_size == to_size", "decord's copy of a decoded picture into its array found other sizes than it "
                             "expected (met with Dirac in Matroska, where it cannot seek, and with H.264 frames 8, 16, "
                             "24, 48 or 72 pixels wide)"),
    ("Error sending packet", "decord's decoder refused a packet: corrupt data there, or (HEVC after a seek) a "
                             "decoder holding more frames than decord's one frame out per packet in"),
)


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
    name: str, path: str, index: StreamIndex, targets: list[int], threads: int, upright: tuple[int, int], rotation: int,
    container: str, start_time: int | None,
) -> tuple[dict[int, np.ndarray], str]:
    """Frames at display indices `targets`: {index: [H, W, 3] uint8 RGB, upright, coded size}, and "targets".

    upright: (width, height) the frames must have once upright before any resize (a check).
    container: PyAV's demuxer name; start_time: the stream's start time (time_base units) as FFmpeg reads it.
    """
    why = _refusal(name, container, index, rotation)
    if why:
        raise DecodeError(f"{path}: {name} cannot return exact frames from this file: {why}; {FIX}")
    decode = {"torchcodec": _torchcodec, "decord": _decord}[name]
    try:
        frames = decode(path, index, targets, threads, start_time)
    except DecodeError:
        raise
    except _library_errors(name) as e:  # what the library raises for anything FFmpeg reports; others are bugs
        # one line, without the libraries' source locations ("[01:27:53] /project/src/video/video_reader.cc:285: ",
        # "maybe_seek_to_before_desired_pts, /__w/.../SingleStreamDecoder.cpp:1390, "): torchcodec's span lines
        text = re.sub(r"(\[\d\d:\d\d:\d\d\] |\w+, )?\S+\.(cc|cpp|h):\d+[:,] ", "", " ".join(str(e).split()))
        text = text.split(" This should never happen.")[0][:300]  # torchcodec's plea for a bug report
        meaning = next((f"{meaning} (" for known, meaning in LIBRARY_ERRORS if known in text), "")
        raise DecodeError(f"{path}: {name} failed: {meaning}{type(e).__name__}: {text}{')' if meaning else ''}; "
                          f"{FIX}") from e
    coded = (index.height, index.width) if rotation in (90, 270) else (index.width, index.height)
    for i, frame in frames.items():
        if frame.shape != (coded[1], coded[0], 3) or frame.dtype != np.uint8:
            raise DecodeError(f"{path}: {name} returned frame {i} as {frame.dtype} {frame.shape}, expected uint8 "
                              f"{(coded[1], coded[0], 3)} (shown as {upright[0]}x{upright[1]}); {FIX}")
    return frames, "targets"


def _refusal(name: str, container: str, index: StreamIndex, rotation: int) -> str | None:
    """Why backend `name` would return other frames than PyAV from this stream, or None if it is proven exact."""
    if index.sequential or index.no_keyflags:  # frames only the decoder can number: no index to address them by
        return ("it cannot address this stream's frames: " +
                ("its timestamps are decode times" if index.sequential else "its container flags no keyframe"))
    if index.packets.mpeg4 is not None and index.packets.mpeg4.packed:
        # it decodes the file itself, packed: FFmpeg's decoder gives frames the wrong packets' timestamps
        return ("it returns frames one off in MPEG-4 with packed B-frames (or unpack the file once: "
                "`ffmpeg -i IN -c copy -bsf:v mpeg4_unpack_bframes OUT`)")
    if len(index.keyframes) and index.keyframes[0] > 0:  # leading frames kept at the start (HEVC RADL)
        return (f"{name} returns other frames where the video starts with frames shown before its first keyframe "
                "(torchcodec did, silently)")
    if index.palette:
        return ("its pictures are paletted and the palette comes with the first packet only, which a seek "
                "skips (black frames)")
    if container not in CONTAINERS[name]:
        return NOT_EXACT.get((name, container), f"it is not proven exact on {container!r} files, only on "
                                                f"{'; '.join(sorted(CONTAINERS[name]))}")
    if name == "torchcodec" and container == "avi" and bool(np.any(np.diff(index.pts) < 0)):
        return ("AVI stores no presentation times: with B-frames FFmpeg guesses them, and torchcodec's FFmpeg "
                "guesses others than ours, so a timestamp names another picture")
    if name == "decord" and rotation:
        return f"it does not decode rotated video correctly (display rotation {rotation} degrees)"
    if name == "decord" and _open_gop(index):
        return ("it returns other frames after seeking in an open-GOP stream (frames after a keyframe in decode "
                "order are shown before it)")
    return None


def _library_errors(name: str) -> tuple[type[BaseException], ...]:
    """The exceptions a backend raises for a file it cannot decode (torchcodec: RuntimeError and ValueError
    from its C++ core; decord: its own DECORDError, which is no RuntimeError)."""
    if name == "decord":
        from decord._ffi.base import DECORDError

        return (DECORDError, RuntimeError, ValueError, OSError)
    return (RuntimeError, ValueError, OSError)


def _torchcodec(path: str, index: StreamIndex, targets: list[int], threads: int, start_time: int | None
                ) -> dict[int, np.ndarray]:
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
        raise DecodeError(f"{path}: torchcodec returned frames at {got.tolist()} s, asked for {wanted.tolist()} s; "
                          f"{FIX}")
    data = batch.data.numpy()  # [n, H, W, 3] uint8
    return {i: data[j] for j, i in enumerate(targets)}


def _decord(path: str, index: StreamIndex, targets: list[int], threads: int, start_time: int | None
            ) -> dict[int, np.ndarray]:
    """decord by frame index, after checking that its frame table is ours (count and start times)."""
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    if len(reader) != len(index.times):
        raise DecodeError(f"{path}: decord counts {len(reader)} frames where the demuxed stream holds "
                          f"{len(index.times)}; {FIX}")
    # decord's times are (pts - the stream's start time) in seconds (video_reader.cc, IndexKeyframes), ours are
    # from the first shown frame: every frame's time is compared from decord's first frame, and that frame's
    # from the start time where PyAV read one (its short probe of mp4 may not)
    starts = reader.get_frame_timestamp(list(range(len(reader))))[:, 0]  # [N] seconds
    first = None if start_time is None else (int(index.pts[index.order[0]]) - start_time) * float(index.time_base)
    # decord keeps float32 seconds: its rounding, and no more (numpy's default rtol would pass a neighbour at 1 h)
    same = np.isclose(starts - starts[0], index.times, rtol=2e-7, atol=5e-4)  # [N]
    if not same.all() or (first is not None and abs(starts[0] - first) > 5e-4):
        bad = np.flatnonzero(~same)[:8].tolist() or [0]
        raise DecodeError(f"{path}: decord's frames {bad} start at {starts[bad].tolist()} s, ours at "
                          f"{(index.times[bad] + (first or 0.0)).tolist()} s (from the stream's start time); {FIX}")
    data = reader.get_batch(targets).asnumpy()  # [n, H, W, 3] uint8
    return {i: data[j] for j, i in enumerate(targets)}


def _open_gop(index: StreamIndex) -> bool:
    """Some keyframe after the first is followed, in decode order, by a frame shown before it (leading
    B-frames, as MPEG-2 and MPEG-4 part 2 encoders make by default): after a seek there, decord's frame
    count is off by the leading frames (it returned frame 36 for 34 in an MPEG-2 mp4 with 2 B-frames)."""
    keys = list(index.key_positions) + [len(index.pts)]
    return any(index.pts[a + 1 : b].min(initial=index.pts[a]) < index.pts[a] for a, b in zip(keys[1:-1], keys[2:]))
