"""Awkward streams where timestamps can lie: MPEG-4 Part 2 with packed B-frames (DivX/XviD AVI), N-VOPs,
H.264 in AVI with B-frames, and streams cut mid-GOP. Every frame is checked twice: against a full PyAV
decode, and by its identity in the source (the nearest frame of ffmpeg's testsrc2 pattern), so that a
frame off by one fails even where the full decode itself would agree with it."""
from __future__ import annotations

import subprocess
import tarfile

import av
import numpy as np
import pytest
from _extractors_helpers import digest, ffmpeg, full_decode, full_decode_digests

from extractors import decode
from extractors.api import DecodeError
from extractors.config import SamplingConfig
from extractors.decode import VOP_START, _vol_time_bits, decode_clip

SIZE, RATE, SECONDS = (96, 64), 25, 2.0
PLANS = {
    "uniform": dict(num_frames=8),
    "clips": dict(plan="clips", num_clips=3, frames_per_clip=4),
    "fps": dict(plan="fps", fps=7.0, max_frames=16),
    "keyframe": dict(num_frames=6, mode="keyframe"),
    "seek": dict(num_frames=8, buffer_mb=0),  # packets re-read by seeking (and from the top for the first GOP)
}


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    """[F, H, W, 3] float32: the testsrc2 frames every file here is encoded from."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                          f"testsrc2=size={SIZE[0]}x{SIZE[1]}:rate={RATE}:duration={SECONDS}",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, SIZE[1], SIZE[0], 3).astype(np.float32)


def who(source: np.ndarray, frame: np.ndarray) -> int:
    """The source frame nearest to a decoded one (testsrc2 moves every frame: never ambiguous here)."""
    return int(np.argmin(((source - frame.astype(np.float32)) ** 2).mean(axis=(1, 2, 3))))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packed")
    size = f"{SIZE[0]}x{SIZE[1]}"
    out = {
        "xvid_packed": ffmpeg(root / "xvid.avi", "-c:v", "libxvid", "-bf", "2", size=size),
        "divx_packed": ffmpeg(root / "dx50.avi", "-c:v", "libxvid", "-bf", "2", "-vtag", "DX50", size=size),
        "mpeg4_avi": ffmpeg(root / "mpeg4.avi", "-c:v", "mpeg4", "-bf", "2", size=size),  # FFmpeg does not pack
        "mpeg4_mkv": ffmpeg(root / "mpeg4.mkv", "-c:v", "mpeg4", "-bf", "2", size=size),
        "h264_avi": ffmpeg(root / "h264.avi", "-c:v", "libx264", "-bf", "2", size=size),
    }
    # packed B-frames in another container (mov keeps the AVI's packets as they are)
    out["xvid_mov"] = root / "xvid.mov"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-fflags", "+genpts", "-i", str(out["xvid_packed"]), "-c", "copy",
                    str(out["xvid_mov"])], check=True)
    return out


def packed(path) -> bool:
    with av.open(str(path)) as c:
        return any(bytes(p).count(VOP_START) > 1 for p in c.demux(c.streams.video[0]) if p.size)


IDS: dict[str, list[int]] = {}  # file -> source identity of each frame of its full decode


def assert_exact(path, source, cfg: SamplingConfig, span=None, first_source: int | None = 0):
    """Every returned frame is the full decode's frame at its index, and that frame's source identity is the
    one the full decode gives it; targets must be distinct source frames in display order."""
    clip = decode_clip(str(path), cfg, span=span)
    if str(path) not in IDS:
        IDS[str(path)] = [who(source, f) for f in full_decode(path)]
    ids = IDS[str(path)]
    assert ids == sorted(ids) and ids[0] == (ids[0] if first_source is None else first_source), \
        f"{path}: full decode out of order: {ids}"
    digests = full_decode_digests(path)
    for k, (i, frame) in enumerate(zip(clip.indices, clip.frames)):
        if i < 0:
            continue
        assert digest(frame) == digests[i], f"{path}: slot {k} (frame {i}) differs from the full decode"
        assert who(source, frame) == ids[i], f"{path}: slot {k} is source frame {who(source, frame)}, not {ids[i]}"
    return clip, ids


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_packed_b_frames_exact_on_every_plan(files, source, plan):
    path = files["xvid_packed"]
    assert packed(path), "libxvid -bf 2 in AVI no longer packs B-frames: this test lost its subject"
    clip, ids = assert_exact(path, source, SamplingConfig(**PLANS[plan]))
    # times follow the source (the last frame is the exception: xvid drops a frame at the very end)
    for i, t in zip(clip.indices, clip.times):
        if 0 <= i < len(ids) - 1:
            assert t == pytest.approx(ids[i] / RATE, abs=1e-4), f"frame {i} (source {ids[i]}) at {t} s"


@pytest.mark.parametrize("name", ["divx_packed", "xvid_mov", "mpeg4_avi", "mpeg4_mkv", "h264_avi"])
def test_mpeg4_and_avi_variants_exact(files, source, name):
    assert packed(files[name]) == name.endswith(("packed", "mov"))
    for plan in ("uniform", "seek", "keyframe"):
        clip, _ = assert_exact(files[name], source, SamplingConfig(**PLANS[plan]))
        assert ("sequential" in clip.flags) == (name == "h264_avi")


def test_unpacked_stream_passes_through_unchanged(files):
    """The filter is a no-op on a stream that is not packed: same packets, same bytes, same timestamps."""
    path = str(files["mpeg4_avi"])
    with av.open(path) as c:
        raw = [(bytes(p), p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]
    with decode._open(path) as container:
        _, index = decode._read_index(container, path, 256, None)
        got = [(bytes(p), p.pts, p.is_keyframe) for p in index.packets.kept]
    assert got == raw and not index.packets.mpeg4.packed


def test_packed_tar_member_in_memory_seek_and_from_the_top(files, source, tmp_path):
    """A packed AVI inside a tar: kept packets, and with buffer_mb 0 the seek path and (first GOP) a fresh
    read of the member from the top, each exact."""
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as t:
        t.add(files["mpeg4_mkv"], arcname="0.mkv")
        t.add(files["xvid_packed"], arcname="1.avi")
    with tarfile.open(tar) as t:
        member = t.getmember("1.avi")
    span = (member.offset_data, member.size)
    full = decode_clip(str(files["xvid_packed"]), SamplingConfig(num_frames=8))
    for cfg in (SamplingConfig(num_frames=8), SamplingConfig(num_frames=8, buffer_mb=0)):
        clip = decode_clip(str(tar), cfg, span=span)
        assert clip.indices.tolist() == full.indices.tolist()
        assert [digest(f) for f in clip.frames] == [digest(f) for f in full.frames]
        assert [who(source, f) for f in clip.frames] == [who(source, f) for f in full.frames]


def n_vop(time_bits: int) -> bytes:
    """A VOP that is not coded (a dropped frame): P type, time increment 0, vop_coded 0, then stuffing."""
    bits = "01" + "0" + "1" + "0" * time_bits + "1" + "0"
    bits += "0" + "1" * (-(len(bits) + 1) % 8)
    return VOP_START + int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_n_vops_are_not_frames(files, source, tmp_path):
    """A stream with not-coded VOPs (what XviD writes for dropped frames): the decoder makes no frame of
    them, so the index must not count them; frames after them keep their identity and time."""
    plain = ffmpeg(tmp_path / "plain.avi", "-c:v", "mpeg4", size=f"{SIZE[0]}x{SIZE[1]}")
    out = tmp_path / "nvop.avi"
    with av.open(str(plain)) as src, av.open(str(out), "w") as dst:
        stream = src.streams.video[0]
        nvop = n_vop(_vol_time_bits(stream.codec_context.extradata))
        ostream = dst.add_stream_from_template(stream)
        slot = 0
        for i, packet in enumerate(p for p in src.demux(stream) if p.size):
            if i in (5, 6, 20):  # a slot each with nothing new to show
                filler = av.Packet(nvop)
                filler.pts = filler.dts = slot
                filler.time_base = packet.time_base
                filler.stream = ostream
                dst.mux(filler)
                slot += 1
            packet.pts = packet.dts = slot
            packet.stream = ostream
            dst.mux(packet)
            slot += 1
    full = full_decode(out)
    assert len(full) == int(SECONDS * RATE), "the decoder made frames of the N-VOPs"
    for plan in ("uniform", "seek", "fps"):
        clip, ids = assert_exact(out, source, SamplingConfig(**PLANS[plan]))
        for i, t in zip(clip.indices, clip.times):  # each N-VOP before a frame took a slot of time
            assert t == pytest.approx((ids[i] + sum(j <= ids[i] for j in (5, 6, 20))) / RATE, abs=1e-4)


def test_without_unpacking_the_pts_fallback_refuses_instead_of_returning_wrong_frames(files, monkeypatch):
    """What made wrong frames silently: decoding from the keyframes fails on the packed stream, and the
    decode from the first packet matched frames by timestamps the packed stream mislabels. That fallback
    now checks that frame i out of the decoder carries frame i's timestamp."""
    monkeypatch.setattr(decode, "UNPACK_CODECS", set())
    with pytest.raises(DecodeError, match=r"xvid\.avi: decoding from the first packet, frame \d+ came out with "
                                          r"timestamp \d+ where the container lists \d+.*re-encode"):
        decode_clip(str(files["xvid_packed"]), SamplingConfig(num_frames=8))


@pytest.fixture(scope="module")
def cut_streams(tmp_path_factory) -> dict:
    """H.264 in MPEG-TS (keyframe every 25 frames, 2 B-frames) cut mid-GOP by bytes, as a segment or a
    dd'd file is: with headers repeated at each keyframe (decodable from its next keyframe) and without."""
    root = tmp_path_factory.mktemp("cut")
    size = f"{SIZE[0]}x{SIZE[1]}"
    out = {}
    for name, params in (("repeated", "repeat-headers=1"), ("headless", "repeat-headers=0")):
        whole = ffmpeg(root / f"{name}_whole.ts", "-c:v", "libx264", "-g", "25", "-bf", "2", "-x264-params", params,
                       size=size)
        data = whole.read_bytes()
        cut = data[188 * (len(data) // 188 // 3):]  # a third in: inside the first GOP
        out[name] = root / f"{name}.ts"
        out[name].write_bytes(cut)
    return out


def test_stream_cut_mid_gop_starts_at_its_first_keyframe(cut_streams, source):
    path = cut_streams["repeated"]
    with av.open(str(path)) as c:
        assert not next(p for p in c.demux(c.streams.video[0]) if p.size).is_keyframe, "the cut is not mid-GOP"
    for plan in sorted(PLANS):
        clip, ids = assert_exact(path, source, SamplingConfig(**PLANS[plan]), first_source=25)
        assert "cut_start" in clip.flags
        assert ids == list(range(25, 25 + len(ids)))  # the keyframe at source 25 is frame 0 now
        for i, t in zip(clip.indices, clip.times):  # the video's time starts at the keyframe
            assert i < 0 or t == pytest.approx(i / RATE, abs=1e-4)


def test_stream_cut_without_its_headers_is_a_clear_error(cut_streams):
    path = cut_streams["headless"]
    with pytest.raises(DecodeError) as info:
        decode_clip(str(path), SamplingConfig(num_frames=4))
    assert str(path) in str(info.value) and "ffmpeg -ss" in str(info.value), info.value


@pytest.mark.parametrize("backend", ["torchcodec", "decord"])
def test_other_backends_refuse_packed_b_frames(files, backend):
    """They decode the packed file themselves (torchcodec returned frames one off on it in mov): refused."""
    for name in ("xvid_packed", "xvid_mov"):
        with pytest.raises(DecodeError, match=f"{files[name].name}: {backend} .*packed B-frames.*mpeg4_unpack_bframes"):
            decode_clip(str(files[name]), SamplingConfig(num_frames=4, backend=backend))


@pytest.fixture(scope="module")
def leading(tmp_path_factory) -> dict:
    """Files cut with `ffmpeg -ss 0.9 -c copy` (no edit list in these containers) that start at a keyframe
    followed by leading frames (shown before it, decoded after it): MPEG-2 open GOP, whose leading B-frames
    refer to the GOP cut away (FFmpeg drops them), and HEVC with RADL pictures, which refer only to the
    keyframe (FFmpeg shows them)."""
    root = tmp_path_factory.mktemp("leading")
    size = f"{SIZE[0]}x{SIZE[1]}"
    whole = {
        "mpeg2_open_gop": ffmpeg(root / "m2.mkv", "-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-flags", "-cgop",
                                 size=size),
        "hevc_radl": ffmpeg(root / "radl.ts", "-c:v", "libx265", "-x265-params", "log-level=error:radl=2:keyint=12:"
                            "min-keyint=12:open-gop=0:bframes=2:scenecut=0", size=size),
    }
    out = {}
    for name, path in whole.items():
        out[name] = root / f"{name}{'.avi' if name.startswith('mpeg2') else '.ts'}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "0.9", "-i", str(path), "-c", "copy", str(out[name])],
                       check=True)
    return out


@pytest.mark.parametrize("name", ["mpeg2_open_gop", "hevc_radl"])
def test_leading_frames_at_the_start_are_frames_only_if_they_decode(leading, source, name):
    path = leading[name]
    with av.open(str(path)) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    assert packets[0].is_keyframe and any(p.pts < packets[0].pts for p in packets[1:12]), "no leading frames"
    n_full = len(full_decode(path))
    assert (n_full < len(packets)) == (name == "mpeg2_open_gop")  # FFmpeg drops the open GOP's leading frames
    for plan in sorted(PLANS):
        clip, ids = assert_exact(path, source, SamplingConfig(**PLANS[plan]), first_source=None)
        assert ("cut_start" in clip.flags) == (name == "mpeg2_open_gop")
        assert len(ids) == n_full and ids == list(range(ids[0], ids[0] + n_full))


def test_other_backends_refuse_leading_frames_that_decode(leading):
    """torchcodec returned other frames (with the asked timestamps) for the HEVC RADL frames at the start."""
    for backend in ("torchcodec", "decord"):
        with pytest.raises(DecodeError, match=f"{backend} returns other frames where the video starts with frames"):
            decode_clip(str(leading["hevc_radl"]), SamplingConfig(plan="fps", fps=7.0, max_frames=16, backend=backend))
