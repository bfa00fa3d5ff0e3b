"""Codec x container matrix for the decode backends (slow: ~35 small files made by ffmpeg here).

For each file, each backend (torchcodec, decord) and each plan: the frames are the very pictures a full
PyAV decode shows at those indices, or a DecodeError that starts with the file's path and ends with
`use sampling.backend: pyav`; never another exception, never other pictures. EXPECT says which backends
must decode each file (so refusing everything would fail too): extractors/backends.py CONTAINERS and its
refusals are what this matrix proved. "Same picture" is frame identity, not bitwise equality: the RGB
conversion of 10-bit, 4:1:0, interlaced or anamorphic video differs between PyAV and the libraries by a few
levels, while neighbouring pictures of the moving test pattern differ by far more.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from _extractors_helpers import ffmpeg_frames

from extractors.api import DecodeError
from extractors.config import SamplingConfig
from extractors.decode import decode_clip

pytestmark = pytest.mark.slow

BACKENDS = ("torchcodec", "decord")
TC, DC, BOTH, NONE = ("torchcodec",), ("decord",), BACKENDS, ()
PLANS = {
    "uniform": dict(num_frames=8),
    "clips": dict(plan="clips", num_clips=3, frames_per_clip=3),
    "fps": dict(plan="fps", fps=3.0, max_frames=10),
    "keyframe": dict(num_frames=5, mode="keyframe"),
    "seek": dict(num_frames=8, buffer_mb=0),  # packets re-read by seeking: the other index path
}
GOP = ("-g", "12")
X264 = ("-c:v", "libx264", "-bf", "2", *GOP)
# name -> (ffmpeg output options, size, seconds, backends that must decode it exactly; the others refuse it)
# and backend -> files it may fail on loudly (a library error, mapped) or decode exactly
MAY_FAIL = {"decord": {"hevc.mp4"}, "torchcodec": set()}
FILES = {
    "h264.mp4": (X264, "160x96", 2, BOTH),
    "h264.mov": (X264, "160x96", 2, BOTH),
    "h264.mkv": (X264, "160x96", 2, BOTH),
    "h264_frag.mp4": ((*X264, "-movflags", "frag_keyframe+empty_moov"), "160x96", 2, BOTH),
    "h264_offset.mp4": ((*X264, "-output_ts_offset", "3"), "160x96", 2, BOTH),
    "h264.flv": (X264, "160x96", 2, NONE),  # the last keyframe: decord lands elsewhere, torchcodec finds no frame
    "h264.3gp": (X264, "160x96", 2, BOTH),
    # no cues, no duration (as a browser's MediaRecorder writes): neither library opens it without a duration
    "vp9_live.webm": (("-c:v", "libvpx-vp9", "-b:v", "200k", *GOP, "-live", "1", "-f", "webm"), "160x96", 2, NONE),
    "h264_10bit.mkv": ((*X264, "-pix_fmt", "yuv420p10le"), "160x96", 2, BOTH),
    "h264.ts": (X264, "160x96", 2, NONE),  # torchcodec: no frame after a seek; decord: 'Unable to handle EOF'
    "h264.m2ts": ((*X264, "-f", "mpegts", "-mpegts_m2ts_mode", "1"), "160x96", 2, NONE),
    "h264.avi": (X264, "160x96", 2, NONE),  # B-frames in AVI: decode-order timestamps
    # decord may fail loudly ('Error sending packet': its decoder thread takes one frame out per packet in)
    "hevc.mp4": (("-c:v", "libx265", "-x265-params", "log-level=error:keyint=12:open-gop=0", "-tag:v", "hvc1"),
                 "160x96", 2, TC),
    "hevc_open_gop.mkv": (("-c:v", "libx265", "-x265-params", "log-level=error:keyint=12"), "160x96", 2, TC),
    "vp8.webm": (("-c:v", "libvpx", "-b:v", "200k", *GOP), "160x96", 2, BOTH),
    "vp9.webm": (("-c:v", "libvpx-vp9", "-b:v", "200k", *GOP), "160x96", 2, BOTH),
    "av1.mkv": (("-c:v", "libsvtav1", "-preset", "12", "-svtav1-params", "keyint=12"), "160x96", 2, BOTH),
    "mpeg4.avi": (("-c:v", "mpeg4", *GOP), "160x96", 2, BOTH),
    "mpeg4_bf.mp4": (("-c:v", "mpeg4", "-bf", "2", *GOP), "160x96", 2, TC),  # open GOPs: decord refuses
    "mpeg4.nut": (("-c:v", "mpeg4", *GOP), "160x96", 2, TC),  # decord: 'broken metadata'
    "xvid_unpacked.avi": (("-c:v", "libxvid", "-bf", "2", *GOP), "160x96", 2, NONE),  # remuxed below
    "mpeg2.mpg": (("-c:v", "mpeg2video", "-bf", "2", *GOP), "160x96", 2, NONE),
    "mjpeg.avi": (("-c:v", "mjpeg",), "160x96", 1, BOTH),
    "mjpeg.mov": (("-c:v", "mjpeg",), "160x96", 1, BOTH),
    "prores.mov": (("-c:v", "prores_ks",), "160x96", 1, BOTH),
    "ffv1.mkv": (("-c:v", "ffv1", *GOP), "160x96", 2, BOTH),
    "vc2.mkv": (("-c:v", "vc2",), "160x96", 0.6, NONE),  # Dirac in Matroska: neither library can seek in it
    "theora.ogv": (("-c:v", "libtheora", *GOP), "160x96", 2, TC),  # decord: 'broken metadata'
    "wmv2.wmv": (("-c:v", "wmv2", *GOP), "160x96", 2, TC),  # decord: ASF seeks land on another keyframe
    "wmv1.asf": (("-c:v", "wmv1", *GOP), "160x96", 2, TC),
    "h263.3gp": (("-c:v", "h263", *GOP), "176x144", 2, BOTH),
    "raw.y4m": (("-pix_fmt", "yuv420p",), "160x96", 1, BOTH),
    "dv.dv": (("-c:v", "dvvideo", "-pix_fmt", "yuv420p"), "720x576", 0.6, DC),  # torchcodec: no frame after a seek
    "gif.gif": ((), "160x96", 1, BOTH),
    "mpeg2.mxf": (("-c:v", "mpeg2video", "-b:v", "20M", *GOP), "720x576", 1, NONE),  # decode-order timestamps
}
FIX = "use sampling.backend: pyav"


def _make(tmp_path, name: str) -> str:
    args, size, seconds, _ = FILES[name]
    out = tmp_path / name
    source = f"testsrc2=size={size}:rate=25:duration={seconds}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, *args, str(out)], check=True)
    if name == "xvid_unpacked.avi":  # Xvid's packed B-frames unpacked: AVI B-frames whose pts FFmpeg guesses
        packed = out.rename(tmp_path / "xvid_packed.avi")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(packed), "-c", "copy", "-bsf:v",
                        "mpeg4_unpack_bframes", str(out)], check=True)
    return str(out)


def _full(path: str) -> list[np.ndarray]:
    """Every frame as the ffmpeg CLI shows it (pixels stretched by the sample aspect ratio), RGB."""
    return list(ffmpeg_frames(Path(path)))


def _other_picture(frame: np.ndarray, full: list[np.ndarray], i: int) -> bool:
    """True unless `frame` is full[i]: nearer to it than 0.8 x its distance to any frame that differs from it."""
    if frame.shape != full[i].shape:
        return True
    distance = np.array([np.abs(f.astype(np.int16) - frame).mean() if f.shape == frame.shape else np.inf
                         for f in full])  # [N] mean |difference|, 0..255
    others = [j for j, f in enumerate(full) if f.shape != full[i].shape or not np.array_equal(f, full[i])]
    return bool(others) and not distance[i] < 0.8 * distance[others].min()


@pytest.mark.parametrize("name", sorted(FILES))
def test_backend_frames_are_the_pictures_pyav_shows_or_refused(tmp_path, name):
    path = _make(tmp_path, name)
    full = _full(path)
    must = FILES[name][3]
    for backend in BACKENDS:
        outcomes = {}
        for plan, kw in PLANS.items():
            try:
                clip = decode_clip(path, SamplingConfig(backend=backend, **kw))
            except DecodeError as e:
                message = str(e)
                assert message.startswith(f"{path}: ") and message.endswith(FIX), f"{backend} {plan}: {message}"
                outcomes[plan] = message
                continue
            ref = decode_clip(path, SamplingConfig(**kw))  # PyAV: the same plan
            assert clip.indices.tolist() == ref.indices.tolist() and clip.flags == ref.flags, f"{backend} {plan}"
            other = [int(i) for i, f in zip(clip.indices, clip.frames) if i >= 0 and _other_picture(f, full, int(i))]
            assert not other, f"{backend} {plan}: frames {other} of {name} are other pictures than PyAV shows there"
            outcomes[plan] = "exact"
        if name in MAY_FAIL[backend]:
            continue
        if backend in must:
            assert all(o == "exact" for o in outcomes.values()), f"{backend} must decode {name}: {outcomes}"
        else:
            assert all(o != "exact" for o in outcomes.values()), f"{backend} must refuse {name}: {outcomes}"
