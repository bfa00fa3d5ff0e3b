"""Sparse decoding returns exactly the planned frames: every plan and mode against the ffmpeg CLI's full decode."""
from __future__ import annotations

import subprocess

import av
import numpy as np
import pytest
from _extractors_helpers import digest, exact_part, ffmpeg, ffmpeg_scaled, full_decode, full_decode_digests, made_videos, real_videos  # noqa: F401 (fixtures)

from extractors.config import SamplingConfig
from extractors.decode import FAST_PROBE, decode_clip, video_info

PLANS = {
    "uniform": SamplingConfig(num_frames=8),
    "clips": SamplingConfig(plan="clips", num_clips=3, frames_per_clip=4),
    "fps": SamplingConfig(plan="fps", fps=3.0, max_frames=12),
    "dense": SamplingConfig(num_frames=40),
    "keyframe": SamplingConfig(num_frames=6, mode="keyframe"),
}


def assert_exact(path, cfg, window=None, rotation_k=0):
    """The frames at clip.indices are pixel-identical to the ffmpeg CLI's (full_decode_digests); returns the clip."""
    full = full_decode_digests(path, rotation_k)
    clip = decode_clip(str(path), cfg, window)
    assert len(clip.frames) == len(clip.indices) == len(clip.valid) == len(clip.times) == cfg.T
    assert clip.indices.max() < len(full), f"index {clip.indices.max()} beyond the {len(full)} decoded frames"
    real = clip.indices >= 0
    assert real.any()
    for i, frame in zip(clip.indices, clip.frames):
        if i < 0:
            continue
        shown = exact_part(np.rot90(frame, -rotation_k), "anamorphic" in clip.flags)  # as the digests were taken
        assert digest(np.rot90(shown, rotation_k)) == full[i], f"{path}: frame {i} differs from the full decode"
    assert np.all(np.diff(clip.indices[real]) >= 0), "frames are not in time order"
    return clip


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_every_plan_exact_on_real_h264(real_videos, plan):
    for path in real_videos:
        clip = assert_exact(path, PLANS[plan])
        assert ("keyframe" in clip.flags) == (plan == "keyframe")


@pytest.mark.parametrize(
    "name", ["bheavy", "pheavy", "vfr", "overreported", "editlist", "cover_first", "hevc", "vp9"])
def test_every_plan_exact_on_made_clips(made_videos, name):
    for cfg in PLANS.values():
        assert_exact(made_videos[name], cfg)


def test_every_plan_exact_on_demo_corpus(demo_corpus):
    videos = sorted((demo_corpus["root"] / "videos").glob("*.mp4"))[:4]
    assert videos, f"no demo videos under {demo_corpus['root']}"
    for path in videos:
        for cfg in PLANS.values():
            assert_exact(path, cfg)


def test_uniform_takes_middle_of_each_segment(real_videos):
    path = real_videos[1]  # bikes.mp4: 250 frames, B-frames
    n = len(full_decode_digests(path))
    clip = decode_clip(str(path), SamplingConfig(num_frames=8))
    assert clip.indices.tolist() == [int((i + 0.5) * n / 8) for i in range(8)]
    assert clip.valid.all() and clip.flags == ()


def test_clips_are_consecutive_frames(made_videos):
    clip = decode_clip(str(made_videos["bheavy"]), SamplingConfig(plan="clips", num_clips=3, frames_per_clip=4))
    groups = clip.indices.reshape(3, 4)
    assert (np.diff(groups, axis=1) == 1).all() and (np.diff(groups[:, 0]) > 4).all()


def test_fps_plan_times(made_videos):
    clip = decode_clip(str(made_videos["bheavy"]), SamplingConfig(plan="fps", fps=2.0, max_frames=12))
    # 4 s at 2 fps = 8 frames, then 4 padding/repeat slots marked invalid
    assert clip.valid.tolist() == [True] * 8 + [False] * 4 and "short" in clip.flags
    assert np.allclose(clip.times[:8], np.arange(8) / 2.0, atol=1 / 30)


def test_window_limits_frames_to_the_span(made_videos):
    path = made_videos["bheavy"]
    clip = assert_exact(path, SamplingConfig(num_frames=6), window=(1.0, 2.0))
    assert (clip.times >= 1.0 - 1e-6).all() and (clip.times < 2.0).all()
    for cfg in PLANS.values():
        if cfg.mode == "exact":
            times = assert_exact(path, cfg, window=(1.0, 3.0)).times
            assert (times >= 1.0 - 1e-6).all() and (times < 3.0).all()
    with pytest.raises(Exception, match="window"):
        decode_clip(str(path), SamplingConfig(), window=(10.0, 12.0))


def test_keyframe_mode_returns_real_keyframes(made_videos):
    path = made_videos["pheavy"]  # keyint=50 at 30 fps: keyframes at 0, 50, 100
    with av.open(str(path)) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    clip = decode_clip(str(path), SamplingConfig(num_frames=6, mode="keyframe"))
    assert "keyframe" in clip.flags and set(clip.indices.tolist()) <= set(keys)
    assert np.allclose(clip.times, clip.indices / 30.0, atol=1e-3), "frame_times must be the keyframes' own times"
    assert_exact(path, SamplingConfig(num_frames=6, mode="keyframe"))
    # repeats of one keyframe are marked, the first occurrence is valid
    _, first = np.unique(clip.indices, return_index=True)
    assert clip.valid.sum() == len(first)


def test_vfr_uses_real_timestamps(made_videos):
    clip = decode_clip(str(made_videos["vfr"]), SamplingConfig(num_frames=4))
    times = np.array([0, 0.033, 0.1, 0.5, 0.55, 1.0, 1.9, 2.0, 2.02, 3.0, 3.4, 3.45])
    assert np.allclose(clip.times, times[clip.indices], atol=1e-4)
    # planned times are the segment middles of [0, end): the frame on screen at each
    end = video_info(str(made_videos["vfr"]))["duration"]
    for t, i in zip((np.arange(4) + 0.5) * end / 4, clip.indices):
        assert times[i] <= t + 1e-6 and (i + 1 == len(times) or times[i + 1] > t)


def test_short_video_repeat_and_pad(made_videos):
    path = made_videos["short"]  # 3 frames
    rep = assert_exact(path, SamplingConfig(num_frames=8, short_policy="repeat"))
    assert "short" in rep.flags and rep.valid.sum() == 3 and (rep.indices >= 0).all()
    pad = assert_exact(path, SamplingConfig(num_frames=8, short_policy="pad"))
    assert "short" in pad.flags and (pad.indices == -1).sum() == 5 and pad.valid.sum() == 3
    for i, frame in zip(pad.indices, pad.frames):
        if i < 0:
            assert not frame.any() and frame.shape == pad.frames[0].shape


def test_overreported_frame_count_is_ignored(made_videos):
    path = made_videos["overreported"]
    with av.open(str(path)) as c:
        header = c.streams.video[0].frames
    actual = len(full_decode_digests(path))
    assert header > actual, "the test file must over-report its frame count"
    clip = decode_clip(str(path), SamplingConfig(num_frames=8))
    assert video_info(str(path))["frames"] == actual and clip.indices.max() < actual


def test_rotation_metadata_turns_frames_upright(made_videos):
    path = made_videos["rot90"]
    clip = assert_exact(path, SamplingConfig(num_frames=4), rotation_k=1)  # +90 deg (ccw) -> np.rot90(k=1)
    assert "rotated" in clip.flags
    assert clip.frames[0].shape[:2] == (160, 96) and (clip.width, clip.height) == (96, 160)


def test_resize_policy_short_and_max_side(real_videos):
    path = real_videos[0]  # bigbuckbunny 1280x720
    clip = decode_clip(str(path), SamplingConfig(num_frames=2, short_side=144))
    assert clip.frames[0].shape == (144, 256, 3) and (clip.width, clip.height) == (1280, 720)
    capped = decode_clip(str(path), SamplingConfig(num_frames=2, short_side=400, max_side=320))
    assert capped.frames[0].shape == (180, 320, 3)
    # scaled from YUV in one pass, as `ffmpeg -vf scale=256:144:flags=area` scales it
    assert np.array_equal(clip.frames[0], ffmpeg_scaled(path, 256, 144)[clip.indices[0]])


def test_exact_with_decoder_threads(made_videos):
    """skip_frame is applied per packet also when FFmpeg decodes with several threads."""
    for threads in (2, 3):
        assert_exact(made_videos["bheavy"], SamplingConfig(num_frames=8, threads=threads))
        assert_exact(made_videos["bheavy"], SamplingConfig(plan="clips", num_clips=3, frames_per_clip=3, threads=threads))


def test_edit_list_hidden_frames_are_not_frames(made_videos):
    path = made_videos["editlist"]
    with av.open(str(path)) as c:
        packets = [p for p in c.demux(video=0) if p.size]
    hidden = sum(p.is_discard for p in packets)
    shown = len(full_decode_digests(path))
    assert hidden > 0 and shown == len(packets) - hidden, "the test file must hide frames with an edit list"
    clip = decode_clip(str(path), SamplingConfig(num_frames=8))
    assert clip.indices.tolist() == [int((i + 0.5) * shown / 8) for i in range(8)] and clip.times[0] < 0.2


def test_seek_path_for_big_files_is_exact(made_videos, real_videos):
    """buffer_mb=0: packets are not held in memory but re-read by seeking to each run's keyframe."""
    names = ["bheavy", "pheavy", "vfr", "overreported", "editlist", "rot90"]
    for path in [made_videos[n] for n in names] + list(real_videos):
        k = 1 if path == made_videos["rot90"] else 0
        for cfg in (PLANS["uniform"], PLANS["clips"], PLANS["keyframe"]):
            assert_exact(path, SamplingConfig(**{**cfg.__dict__, "buffer_mb": 0}), rotation_k=k)


def test_cover_image_stream_is_not_the_video(made_videos):
    with av.open(str(made_videos["cover_first"])) as c:
        assert c.streams.video[0].codec_context.name == "mjpeg", "the test file must list the cover first"
    clip = decode_clip(str(made_videos["cover_first"]), SamplingConfig(num_frames=4))
    assert video_info(str(made_videos["cover_first"]))["frames"] == 120 and clip.indices.tolist() == [15, 45, 75, 105]


def test_window_with_only_a_start_runs_to_the_end(made_videos):
    path = made_videos["bheavy"]  # 120 frames, 4 s
    for end in (float("inf"), None):
        clip = assert_exact(path, SamplingConfig(num_frames=6), window=(1.0, end))
        # six segments of [1, 4): the middles are 1.25, 1.75, ... 3.75 s
        assert clip.indices.tolist() == [int(30 * (1.0 + (i + 0.5) * 0.5)) for i in range(6)]
    with pytest.raises(Exception, match="window"):
        decode_clip(str(path), SamplingConfig(), window=(5.0, None))
    # as the pipeline reads it from a manifest row with `start` and an empty `end`
    from pipeline.manifest import ManifestRow

    window = ManifestRow("v", str(path), "", meta={"start": "1.0", "end": ""}).window
    assert decode_clip(str(path), SamplingConfig(num_frames=6), window).indices.tolist() == clip.indices.tolist()


def test_keyframe_mode_stays_inside_the_window(made_videos):
    path = made_videos["pheavy"]  # keyint=50 at 30 fps: keyframes 0, 50, 100 of 120
    key = SamplingConfig(num_frames=4, mode="keyframe")
    clip = assert_exact(path, key, window=(1.5, None))  # frames 45..119: keyframes 50 and 100
    assert set(clip.indices.tolist()) == {50, 100} and "keyframe" in clip.flags
    # frames 15..44 hold no keyframe: the planned frames themselves, decoded from keyframe 0, flagged
    clip = assert_exact(path, key, window=(0.5, 1.5))
    assert clip.indices.tolist() == [18, 26, 33, 41] and "no_keyframe_in_window" in clip.flags
    assert "keyframe" not in clip.flags


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Codecs and containers made with the apt ffmpeg: Theora/Ogg, FLV1 in SWF (no keyframe flags), FLV, AV1 in mp4."""
    root = tmp_path_factory.mktemp("foreign")
    return {
        "theora": ffmpeg(root / "theora.ogv", "-c:v", "libtheora", "-g", "12", seconds=3),
        "theora_audio": ffmpeg(root / "theora.ogg", "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "libtheora",
                               "-c:a", "libvorbis", "-shortest"),
        "swf": ffmpeg(root / "flv1.swf", "-c:v", "flv1", "-g", "12", seconds=3),
        "flv": ffmpeg(root / "flv1.flv", "-c:v", "flv1", "-g", "12"),
        # SVT-AV1 random access: hidden frames shown later; libdav1d fixes skip_frame when it opens
        "av1": ffmpeg(root / "av1.mp4", "-c:v", "libsvtav1", "-g", "12", "-svtav1-params", "lp=1"),
    }


@pytest.mark.parametrize("name", ["theora", "theora_audio", "swf", "flv", "av1"])
def test_other_codecs_and_containers_decode_exactly(foreign, name):
    for cfg in PLANS.values():
        for buffer_mb in (256, 0):
            clip = assert_exact(foreign[name], SamplingConfig(**{**cfg.__dict__, "buffer_mb": buffer_mb}))
            if name == "swf":  # the SWF demuxer flags no keyframe: decoded from the first packet
                assert "sequential" in clip.flags and "keyframe" not in clip.flags
    assert video_info(str(foreign["swf"]))["keyframes"] == 0


def test_anamorphic_video_is_shown_stretched(tmp_path, made_videos):
    """SAR 2:1 (set in the H.264 headers, same coded pictures): each coded pixel is twice as wide as high,
    so frames come out as shown, 320x96 from 160x96, not squashed."""
    square = made_videos["pheavy"]  # 160x96, smooth pattern
    path = tmp_path / "sar2.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(square), "-c", "copy", "-bsf:v",
                    "h264_metadata=sample_aspect_ratio=2/1", str(path)], check=True)
    # only the bitstream holds the SAR (no pasp box), and our short probe decodes nothing: it comes from our decoder
    with av.open(str(path), options=FAST_PROBE) as container:
        assert container.streams.video[0].sample_aspect_ratio is None
    assert video_info(str(path))["sar"] == "2" and video_info(str(square))["sar"] == "1"
    clip = assert_exact(path, SamplingConfig(num_frames=4))
    assert "anamorphic" in clip.flags and (clip.width, clip.height) == (320, 96)
    assert clip.frames[0].shape == (96, 320, 3)
    coded = full_decode(square)[clip.indices[0]]  # [96, 160, 3], the same coded picture
    pairs = clip.frames[0].reshape(96, 160, 2, 3).mean(axis=2)  # back to coded width: each pair of columns
    assert np.abs(pairs - coded).mean() < 2
    small = decode_clip(str(path), SamplingConfig(num_frames=4, short_side=48))
    assert small.frames[0].shape == (48, 160, 3)


def test_fast_mp4_open_reads_the_packets_a_probed_open_reads(made_videos, real_videos, foreign, tmp_path):
    """An mp4 (ftyp first) opens with the mov demuxer unprobed and without FFmpeg's packet parsers: every
    packet's timestamps, keyframe and discard flags, duration and size are those of a plain, probed open,
    also where an H.264 parser would look for recovery points (open GOP, intra refresh) and for AV1.
    A file that only ends in .mp4 is still probed (and opened by its own demuxer)."""
    from extractors.decode import MOV_DEMUXER, _open

    made = {
        "open_gop": ffmpeg(tmp_path / "og.mp4", "-c:v", "libx264", "-x264-params", "open-gop=1:keyint=10", seconds=1),
        "intra_refresh": ffmpeg(tmp_path / "ir.mp4", "-c:v", "libx264", "-x264-params", "intra-refresh=1:keyint=10", seconds=1),
        "mpeg2_mov": ffmpeg(tmp_path / "m2.mov", "-c:v", "mpeg2video", "-bf", "2", "-g", "12", seconds=1),
    }
    files = [*made.values(), foreign["av1"], made_videos["bheavy"], made_videos["editlist"], made_videos["rot90"], real_videos[0]]

    def packets(container):
        return [(p.pts, p.dts, p.is_keyframe, p.is_discard, p.duration, p.size)
                for p in container.demux(container.streams.video[0])]

    for path in files:
        with _open(str(path)) as fast, av.open(str(path)) as probed:
            assert fast.format.name == probed.format.name == MOV_DEMUXER
            assert packets(fast) == packets(probed), f"{path}: the fast open reads other packets"
        if path in made.values():  # the others' frames are checked above
            assert_exact(path, PLANS["uniform"])
    webm_named_mp4 = tmp_path / "webm.mp4"
    webm_named_mp4.write_bytes(made_videos["vp9"].read_bytes())
    with _open(str(webm_named_mp4)) as container:
        assert container.format.name == "matroska,webm"
    assert_exact(webm_named_mp4, PLANS["uniform"])
