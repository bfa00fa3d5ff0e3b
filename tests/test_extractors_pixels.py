"""RGB as FFmpeg shows it: decode_clip (pyav, torchcodec, decord) against the ffmpeg CLI, bitwise, on every
pixel format the decoders hand over (tiny files made here)."""
from __future__ import annotations

import subprocess

import av
import numpy as np
import pytest
from _extractors_helpers import ffmpeg, ffmpeg_frames, ffmpeg_scaled

from extractors.api import DecodeError
from extractors.config import SamplingConfig
from extractors.decode import REFORMAT_EXACT, decode_clip

X264_ILACE = ["-flags", "+ildct+ilme", "-x264-params", "interlaced=1"]
# file -> (output options, the pixel format the decoder hands over)
FORMATS = {
    "x264.mp4": (["-c:v", "libx264"], "yuv420p"),
    "odd_97x61.avi": (["-map", "1", "-c:v", "rawvideo", "-pix_fmt", "yuv420p"], "yuv420p"),  # chroma rounds up
    "odd_422_97x61.avi": (["-map", "1", "-c:v", "rawvideo", "-pix_fmt", "yuv422p"], "yuv422p"),
    "x264_422.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv422p"], "yuv422p"),
    "x264_444.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv444p"], "yuv444p"),
    "x264_420_10.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv420p10le"], "yuv420p10le"),
    "x264_422_10.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv422p10le"], "yuv422p10le"),
    "x264_444_10.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv444p10le"], "yuv444p10le"),
    "interlaced.mkv": (["-c:v", "libx264", *X264_ILACE], "yuv420p"),
    "interlaced_10.mkv": (["-c:v", "libx264", *X264_ILACE, "-pix_fmt", "yuv420p10le"], "yuv420p10le"),
    "svq1.mov": (["-c:v", "svq1"], "yuv410p"),
    "ffv1_411.mkv": (["-c:v", "ffv1", "-pix_fmt", "yuv411p"], "yuv411p"),
    "ffv1_440.mkv": (["-c:v", "ffv1", "-pix_fmt", "yuv440p"], "yuv440p"),
    "ffv1_gray.mkv": (["-c:v", "ffv1", "-pix_fmt", "gray"], "gray"),
    "ffv1_yuva.mkv": (["-c:v", "ffv1", "-pix_fmt", "yuva420p"], "yuva420p"),
    "mjpeg_420.mov": (["-c:v", "mjpeg", "-pix_fmt", "yuvj420p"], "yuvj420p"),  # full range
    "mjpeg_422.mov": (["-c:v", "mjpeg", "-pix_fmt", "yuvj422p"], "yuvj422p"),
    "mjpeg_444.mov": (["-c:v", "mjpeg", "-pix_fmt", "yuvj444p"], "yuvj444p"),
    "gif.gif": ([], "bgra"),  # palette pictures: FFmpeg's GIF decoder hands over BGRA
    "png.mov": (["-c:v", "png"], "rgb24"),
    "qtrle.mov": (["-c:v", "qtrle"], "rgb24"),
    "bgr.avi": (["-c:v", "rawvideo", "-pix_fmt", "bgr24"], "bgr24"),
    "pal8.nut": (["-c:v", "rawvideo", "-pix_fmt", "pal8"], "pal8"),
    "nv12.avi": (["-c:v", "rawvideo", "-pix_fmt", "nv12"], "nv12"),
    "vp9_alpha.webm": (["-c:v", "libvpx-vp9", "-pix_fmt", "yuva420p"], "yuv420p"),  # FFmpeg's VP9 drops alpha
}
BACKENDS = ("pyav", "torchcodec", "decord")


@pytest.fixture(scope="module")
def pixel_files(tmp_path_factory) -> dict:
    """Every file of FORMATS, 5 frames of 64x48 (input 0) or 97x61 (input 1), made by one ffmpeg run (a
    process start costs ~0.1 s)."""
    root = tmp_path_factory.mktemp("pixels")
    outputs = [arg for name, (args, _) in FORMATS.items()
               for arg in (*([] if "-map" in args else ["-map", "0"]), *args, str(root / name))]
    # testsrc2 rounds sizes down to even; testsrc keeps odd ones
    inputs = [arg for source in ("testsrc2=size=64x48", "testsrc=size=97x61")
              for arg in ("-f", "lavfi", "-i", f"{source}:rate=25:duration=0.2")]
    subprocess.run(["ffmpeg", "-v", "error", *inputs, *outputs], check=True)
    return {name: root / name for name in FORMATS}


def first_format(path) -> tuple[str, bool]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.format.name, bool(frame.interlaced_frame)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_backend_equals_the_ffmpeg_cli_on_each_pixel_format(pixel_files, name):
    path = pixel_files[name]
    pix_fmt, interlaced = first_format(path)
    assert pix_fmt == FORMATS[name][1] and interlaced == name.startswith("interlaced"), (pix_fmt, interlaced)
    cli = list(ffmpeg_frames(path))
    for backend in BACKENDS:
        # refused up front: decord cannot count NUT's frames; a seek skips the palette (below)
        if backend != "pyav" and (pix_fmt == "pal8" or backend == "decord" and path.suffix == ".nut"):
            with pytest.raises(DecodeError, match="use sampling.backend: pyav"):
                decode_clip(str(path), SamplingConfig(num_frames=3, backend=backend))
            continue
        clip = decode_clip(str(path), SamplingConfig(num_frames=3, backend=backend))
        assert clip.indices.tolist() == [0, 2, 4]
        assert (clip.width, clip.height) == ((97, 61) if name.startswith("odd") else (64, 48))
        for i, frame in zip(clip.indices, clip.frames):
            assert np.array_equal(frame, cli[i]), \
                f"{backend}: {name} ({pix_fmt}) frame {i}: mean |diff| {np.abs(frame.astype(int) - cli[i]).mean():.3f}"


def test_the_reformatter_shortcut_is_covered():
    """Every format converted by PyAV's reformatter rather than the filter graph is checked above."""
    assert REFORMAT_EXACT <= {fmt for _, fmt in FORMATS.values()}


@pytest.mark.parametrize("name", ["x264.mp4", "x264_420_10.mkv", "interlaced.mkv", "svq1.mov", "png.mov"])
def test_resized_frames_equal_the_cli_scale_filter(pixel_files, name):
    """short_side: scaled from YUV with the AREA filter, as `ffmpeg -vf scale=W:H:flags=area`."""
    path = pixel_files[name]
    clip = decode_clip(str(path), SamplingConfig(num_frames=2, short_side=24))
    cli = ffmpeg_scaled(path, 32, 24)
    for i, frame in zip(clip.indices, clip.frames):
        assert np.array_equal(frame, cli[i]), f"{name} frame {i}: {np.abs(frame.astype(int) - cli[i]).mean():.3f}"


def test_anamorphic_frames_equal_the_cli_but_the_last_row(tmp_path):
    """SAR 4:3 on 4:2:0 (only the width is scaled): every row equals FFmpeg's but the last, where its
    4:2:0 chroma interpolation (5.1, the CLI's) and that of PyAV's FFmpeg differ; there it stays close."""
    for pix_fmt in ("yuv420p", "yuv420p10le"):
        path = ffmpeg(tmp_path / f"sar_{pix_fmt}.mkv", "-c:v", "libx264", "-pix_fmt", pix_fmt, "-vf", "setsar=4/3",
                      seconds=0.2, size="64x48")
        cli = list(ffmpeg_frames(path))
        clip = decode_clip(str(path), SamplingConfig(num_frames=3))
        assert "anamorphic" in clip.flags and clip.frames[0].shape == (48, 85, 3) == cli[0].shape
        for i, frame in zip(clip.indices, clip.frames):
            assert np.array_equal(frame[:-1], cli[i][:-1]), f"{pix_fmt} frame {i}"
            assert np.abs(frame[-1].astype(int) - cli[i][-1]).mean() < 8, f"{pix_fmt} frame {i}: last row"


@pytest.mark.parametrize("name", ["raw_pal8.avi", "raw_pal8.mov", "smc.mov"])
def test_paletted_video_decodes_from_its_first_packet(tmp_path, name):
    """AVI and MOV give a pal8 stream's palette with its first packet only: a decode that starts at a later
    keyframe (every raw frame is one) has no palette and made black frames, on every backend. PyAV now
    decodes such streams from the first packet; torchcodec and decord, which seek, refuse them."""
    path = tmp_path / name
    codec = ["-c:v", "smc"] if name == "smc.mov" else ["-c:v", "rawvideo"]
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=25:duration=2",
                    *codec, "-pix_fmt", "pal8", str(path)], check=True)
    cli = list(ffmpeg_frames(path))
    for cfg in (SamplingConfig(num_frames=4), SamplingConfig(num_frames=4, buffer_mb=0),
                SamplingConfig(num_frames=4, mode="keyframe")):
        clip = decode_clip(str(path), cfg)
        assert clip.indices.min() > 0  # no target in the first packet's group by chance
        for i, frame in zip(clip.indices, clip.frames):
            assert np.array_equal(frame, cli[i]), f"{name} frame {i}: mean |diff| {np.abs(frame.astype(int) - cli[i]).mean():.1f}"
    for backend in ("torchcodec", "decord"):
        with pytest.raises(DecodeError, match="paletted.*use sampling.backend: pyav"):
            decode_clip(str(path), SamplingConfig(num_frames=4, backend=backend))
