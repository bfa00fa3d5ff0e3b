"""sampling.backend: torchcodec and decord return the frames PyAV returns, under the same Clip contract,
error mapping and timeout handling; a backend that is not installed is refused, never replaced."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from _extractors_helpers import ffmpeg, full_decode_digests, digest, made_videos, real_videos  # noqa: F401 (fixtures)

from extractors.api import DecodeError
from extractors.backends import BackendUnavailable
from extractors.config import SamplingConfig
from extractors.decode import KillableDecoder, decode_clip

BACKENDS = ("torchcodec", "decord")
PLANS = {
    "uniform": SamplingConfig(num_frames=8),
    "clips": SamplingConfig(plan="clips", num_clips=3, frames_per_clip=3),
    "keyframe": SamplingConfig(num_frames=6, mode="keyframe"),
}


def with_backend(cfg: SamplingConfig, backend: str, **kw) -> SamplingConfig:
    return SamplingConfig(**{**cfg.__dict__, "backend": backend, **kw})


def assert_same_as_pyav(path, cfg, backend, rotation_k=0):
    """Same indices, times, flags, sizes as the PyAV path, and frames identical to a full decode's."""
    ref = decode_clip(str(path), cfg)
    clip = decode_clip(str(path), with_backend(cfg, backend))
    assert clip.indices.tolist() == ref.indices.tolist() and clip.flags == ref.flags
    assert np.array_equal(clip.times, ref.times) and np.array_equal(clip.valid, ref.valid)
    assert (clip.width, clip.height) == (ref.width, ref.height)
    full = full_decode_digests(path, rotation_k)
    for i, frame in zip(clip.indices, clip.frames):
        assert i < 0 or digest(frame) == full[i], f"{backend}: {path} frame {i} differs from the full decode"
    return clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_frames_equal_pyav_on_real_files(real_videos, backend):
    for path in real_videos:
        if "carphone" in path.name:
            continue  # anamorphic: compared below
        assert_same_as_pyav(path, PLANS["uniform"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_frames_equal_pyav_on_demo_corpus(demo_corpus, backend):
    videos = sorted((demo_corpus["root"] / "videos").glob("*.mp4"))[:3]
    assert videos, f"no demo videos under {demo_corpus['root']}"
    for path in videos:
        for cfg in PLANS.values():
            assert_same_as_pyav(path, cfg, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_rotation_and_aspect_ratio(made_videos, real_videos, backend, tmp_path):
    """Rotated: identical frames (decord: refused, it mangles them). Anamorphic (carphone, SAR 128:117 in
    the container; a made clip with SAR 2:1 in the H.264 headers only) and resized: the same shapes, and
    pixels close (PyAV scales from YUV in one swscale call, the others from RGB)."""
    if backend == "decord":
        with pytest.raises(DecodeError, match="decord cannot return exact frames.*does not decode rotated video"):
            decode_clip(str(made_videos["rot90"]), with_backend(PLANS["uniform"], backend))
    else:
        assert_same_as_pyav(made_videos["rot90"], PLANS["uniform"], backend, rotation_k=1)
    carphone = next(p for p in real_videos if p.name == "carphone_pristine.mp4")
    for extra in ({}, {"short_side": 100}):
        cfg = SamplingConfig(num_frames=4, **extra)
        ref, clip = decode_clip(str(carphone), cfg), decode_clip(str(carphone), with_backend(cfg, backend))
        assert "anamorphic" in clip.flags and (clip.width, clip.height) == (ref.width, ref.height) == (193, 144)
        for a, b in zip(ref.frames, clip.frames):
            assert a.shape == b.shape and np.abs(a.astype(np.int16) - b).mean() < 2.5
    bitstream_sar = tmp_path / "sar2.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(made_videos["pheavy"]), "-c", "copy", "-bsf:v",
                    "h264_metadata=sample_aspect_ratio=2/1", str(bitstream_sar)], check=True)
    cfg = SamplingConfig(num_frames=3)
    ref, clip = decode_clip(str(bitstream_sar), cfg), decode_clip(str(bitstream_sar), with_backend(cfg, backend))
    assert "anamorphic" in clip.flags and (clip.width, clip.height) == (ref.width, ref.height) == (320, 96)
    for a, b in zip(ref.frames, clip.frames):
        assert a.shape == b.shape == (96, 320, 3) and np.abs(a.astype(np.int16) - b).mean() < 2.5


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_every_plan_on_real_and_made_files(made_videos, real_videos, backend):
    for path in [p for p in real_videos if "carphone" not in p.name] + [made_videos["bheavy"], made_videos["pheavy"]]:
        for cfg in PLANS.values():
            assert_same_as_pyav(path, cfg, backend)
    for cfg in PLANS.values():
        assert_same_as_pyav(made_videos["vfr"], cfg, "torchcodec")


def test_backend_errors_are_decode_errors_naming_the_file(tmp_path):
    # decord cannot index Theora in Ogg ("broken metadata"): refused before decord opens it; PyAV and torchcodec
    # decode it. torchcodec cannot seek in Dirac (VC-2) in Matroska: its own error, mapped, with what to do.
    ogv = ffmpeg(tmp_path / "theora.ogv", "-c:v", "libtheora", "-g", "10")
    with pytest.raises(DecodeError, match=r"decord cannot .* \('broken metadata'\); use sampling.backend: pyav$") as info:
        decode_clip(str(ogv), SamplingConfig(num_frames=4, backend="decord"))
    assert str(info.value).startswith(str(ogv))
    vc2 = ffmpeg(tmp_path / "vc2.mkv", "-c:v", "vc2", seconds=0.4)
    with pytest.raises(DecodeError, match=r"torchcodec failed: RuntimeError: .*Could not seek.*; use sampling.backend: "
                                          r"pyav$") as info:
        decode_clip(str(vc2), SamplingConfig(num_frames=4, backend="torchcodec"))
    assert str(info.value).startswith(str(vc2)) and "\n" not in str(info.value)
    assert decode_clip(str(ogv), SamplingConfig(num_frames=4, backend="torchcodec")).indices.tolist() == [6, 18, 31, 43]
    # decord's array copy fails on H.264 frames 16 pixels wide: its check's words, explained, with what to do
    narrow = ffmpeg(tmp_path / "narrow.mp4", "-c:v", "libx264", "-vf", "scale=16:32", seconds=0.4)
    with pytest.raises(DecodeError, match=r"decord failed: decord's copy of a decoded picture .* 16, 24, 48 or 72 "
                                          r"pixels wide\) \(DECORDError: .*from_size == to_size.*; use sampling.backend: "
                                          r"pyav$") as info:
        decode_clip(str(narrow), SamplingConfig(num_frames=4, backend="decord"))
    assert str(info.value).startswith(str(narrow)) and "\n" not in str(info.value)
    assert len(decode_clip(str(narrow), SamplingConfig(num_frames=4)).frames) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_not_installed_is_refused_naming_the_package(monkeypatch, made_videos, backend):
    """A real failed import (the module is blocked in sys.modules): no fallback to another decoder."""
    for name in [m for m in sys.modules if m == backend or m.startswith(backend + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    with pytest.raises(BackendUnavailable, match=f"sampling.backend is '{backend}'.*install {backend}"):
        decode_clip(str(made_videos["pheavy"]), SamplingConfig(num_frames=2, backend=backend))
    assert not issubclass(BackendUnavailable, DecodeError), "a missing backend must stop a job, not fail one video"
    from pipeline.work import Decoder

    with pytest.raises(BackendUnavailable, match=f"install {backend}"):  # the job refuses to start
        Decoder(SamplingConfig(backend=backend), timeout_s=30, need_boxes=False)


def test_backend_through_the_killable_decoder(tmp_path, made_videos):
    """Same timeout handling: the backend runs in the killable child; a hang is killed, then it restarts."""
    cfg = SamplingConfig(num_frames=4, backend="decord")  # decord: the child need not import torch
    decoder = KillableDecoder()
    try:
        clip = decoder(str(made_videos["pheavy"]), cfg, None, timeout_s=60)
        assert clip.indices.tolist() == decode_clip(str(made_videos["pheavy"]), SamplingConfig(num_frames=4)).indices.tolist()
        fifo = tmp_path / "hangs.mp4"
        os.mkfifo(fifo)
        with pytest.raises(DecodeError, match="did not finish within 2 s"):
            decoder(str(fifo), cfg, None, timeout_s=2)
        with pytest.raises(DecodeError, match="decord"):  # a backend's error crosses the process boundary
            decoder(str(ffmpeg(tmp_path / "t.ogv", "-c:v", "libtheora")), cfg, None, timeout_s=60)
    finally:
        decoder.close()


def test_bench_decode_runs_every_method_and_reports_every_goal(tmp_path, capsys):
    """`make bench-decode` code on two tiny made clips (the figures themselves live in the bench, not here)."""
    from extractors import bench

    assert bench.main(["--frames", "2", "--repeats", "1", "--seconds", "0.5", "--clips", str(tmp_path), "--no-real"]) == 0
    out = capsys.readouterr().out
    for method in bench.METHODS:
        assert method in out
    for goal in ("exact / torchcodec, every clip <= 1.0", "exact / torchcodec, webvid_bheavy <= 0.6",
                 "exact / limit, every clip <= 1.1", "keyframe / full, every clip <= 0.1"):
        assert goal in out
    assert out.count("webvid_") >= 4 and sorted(p.name for p in tmp_path.iterdir()) == [
        "webvid_bheavy_0s.mp4", "webvid_pheavy_0s.mp4"]
    with pytest.raises(SystemExit):  # --only names a clip that is not there: refused, naming the clips
        bench.main(["--only", "webvid_bheavy,nope", "--seconds", "0.5", "--clips", str(tmp_path), "--no-real"])
    assert "no clip named nope; the clips are webvid_bheavy, webvid_pheavy" in capsys.readouterr().err
    assert bench.main(["--fixed-costs", "--only", "webvid_pheavy", "--frames", "2", "--repeats", "1", "--seconds", "0.5",
                       "--clips", str(tmp_path), "--no-real"]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("webvid_pheavy") and all(part in out for part in ("open+close", "demux", "fresh decoder", "ours"))


def test_open_gop_stream_is_exact_in_torchcodec_and_refused_by_decord(tmp_path):
    """MPEG-2 in mp4 with 2 B-frames, open GOPs (ffmpeg's default): decord seeks to other frames (36 for 34)."""
    path = ffmpeg(tmp_path / "mpeg2_bf.mp4", "-c:v", "mpeg2video", "-bf", "2", "-g", "12")
    for cfg in PLANS.values():
        assert_same_as_pyav(path, cfg, "torchcodec")
    with pytest.raises(DecodeError, match="decord cannot return exact frames from this file: it returns other frames "
                                          "after seeking in an open-GOP stream") as info:
        decode_clip(str(path), with_backend(PLANS["uniform"], "decord"))
    assert str(path) in str(info.value)


def test_backends_refuse_streams_they_cannot_address(made_videos, tmp_path):
    """AVI with B-frames (decode-order timestamps) and FLV1 in SWF (no keyframe flags): PyAV decodes
    them from the start; the other backends would return other frames, so they refuse them."""
    swf = ffmpeg(tmp_path / "flv1.swf", "-c:v", "flv1", "-g", "12")
    for path in (made_videos["overreported"], swf):
        assert "sequential" in decode_clip(str(path), SamplingConfig(num_frames=4)).flags
        for backend in BACKENDS:
            with pytest.raises(DecodeError, match=f"{backend} cannot .* cannot address this stream's frames") as info:
                decode_clip(str(path), SamplingConfig(num_frames=4, backend=backend))
            assert str(path) in str(info.value)


def test_backend_key_is_strict():
    with pytest.raises(ValueError, match=r"sampling.backend must be one of \['pyav', 'torchcodec', 'decord'\]"):
        SamplingConfig(backend="ffmpeg")
    assert SamplingConfig().backend == "pyav" and SamplingConfig().allow_still_images is False


def test_backends_refuse_containers_where_they_return_other_pictures(tmp_path):
    """decord on ASF: its seek lands a keyframe early and it returns pictures of another GOP (frame 28 was 16)
    with the asked timestamps; torchcodec on AVI whose B-frames' presentation times FFmpeg guesses (an
    unpacked Xvid): frames after the second keyframe were other pictures with the asked pts; decord on FLV (no
    seek index): the last keyframe was a picture of another GOP; both on MPEG-TS (torchcodec: 'no more frames';
    decord: 'Unable to handle EOF'). Each is refused up front, naming the file, the reason and the fix;
    torchcodec is exact on the ASF file and PyAV on all of them."""
    wmv = ffmpeg(tmp_path / "wmv2.wmv", "-c:v", "wmv2", "-g", "12")
    assert_same_as_pyav(wmv, PLANS["uniform"], "torchcodec")
    packed = ffmpeg(tmp_path / "packed.avi", "-c:v", "libxvid", "-bf", "2", "-g", "12")
    avi = tmp_path / "unpacked.avi"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(packed), "-c", "copy", "-bsf:v", "mpeg4_unpack_bframes",
                    str(avi)], check=True)
    ts = ffmpeg(tmp_path / "h264.ts", "-c:v", "libx264", "-g", "12", seconds=1)
    flv = ffmpeg(tmp_path / "h264.flv", "-c:v", "libx264", "-g", "12", seconds=1)
    for path, backend, why in ((wmv, "decord", "ASF seeks land a keyframe early or late"),
                               (flv, "decord", "FLV has no seek index"),
                               (avi, "torchcodec", "AVI stores no presentation times"),
                               (ts, "torchcodec", "MPEG-TS"), (ts, "decord", "MPEG-TS")):
        ref = decode_clip(str(path), PLANS["uniform"])
        full = full_decode_digests(path)
        assert [digest(f) for f in ref.frames] == [full[i] for i in ref.indices]
        with pytest.raises(DecodeError, match=f"{backend} cannot return exact frames from this file: .*{why}.*; "
                                              "use sampling.backend: pyav$") as info:
            decode_clip(str(path), with_backend(PLANS["uniform"], backend))
        assert str(info.value).startswith(f"{path}: ")


def test_decord_times_are_compared_from_the_stream_start(tmp_path):
    """decord counts times from the stream's start time (video_reader.cc), ours from the first shown frame:
    files whose first frame is not at 0 (offset mp4 and mkv, a fragmented mp4) are exact, not refused."""
    for path in (ffmpeg(tmp_path / "offset.mp4", "-c:v", "libx264", "-output_ts_offset", "5", seconds=1),
                 ffmpeg(tmp_path / "offset.mkv", "-c:v", "libx264", "-output_ts_offset", "2.5", seconds=1),
                 ffmpeg(tmp_path / "frag.mp4", "-c:v", "libx264", "-g", "10", "-movflags", "frag_keyframe+empty_moov",
                        seconds=1)):
        for cfg in (PLANS["uniform"], PLANS["keyframe"]):
            assert_same_as_pyav(path, cfg, "decord")
