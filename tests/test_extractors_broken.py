"""A corpus of broken files made here: each yields one clear DecodeError naming the file, no crash or hang."""
from __future__ import annotations

import logging
import os
import subprocess
import time

import av
import numpy as np
import pytest
from _extractors_helpers import ffmpeg, full_decode, made_videos  # noqa: F401 (fixture)

from extractors.api import DecodeError
from extractors.config import SamplingConfig
from extractors.decode import KillableDecoder, decode_clip, decode_clip_killable


def write_audio_only(path):
    with av.open(str(path), "w") as c:
        stream = c.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in stream.encode(frame):
                c.mux(p)
        for p in stream.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, made_videos):
    root = tmp_path_factory.mktemp("broken")
    good = made_videos["bheavy"].read_bytes()
    faststart = root / "faststart.mp4"  # moov first, so a cut file still opens and lists every frame
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(made_videos["bheavy"]), "-c", "copy",
                    "-movflags", "+faststart", str(faststart)], check=True)
    files = {
        "truncated_moov_last": good[: len(good) // 2],  # moov (the index) at the end is cut off
        "truncated_moov_first": faststart.read_bytes()[: len(good) * 2 // 3],
        "random_bytes": np.random.default_rng(0).bytes(40_000),
        "empty": b"",
        "text_renamed": b"this is a caption file, not a video\n" * 50,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.mp4"
        paths[name].write_bytes(data)
    for name, suffix in (("truncated_mkv", ".mkv"), ("truncated_avi", ".avi")):  # their index is at the end
        whole = root / f"whole{suffix}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(made_videos["bheavy"]), "-c", "copy", str(whole)],
                       check=True)
        paths[name] = root / f"{name}{suffix}"
        paths[name].write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 5])
    # no size in their headers: the cut is seen in their framing at the end (a TS cut at a 188-byte boundary
    # would not be: moved off one)
    for name, suffix, codec in (("truncated_ts", ".ts", ["-c", "copy"]), ("truncated_flv", ".flv", ["-c", "copy"]),
                                ("truncated_ps", ".mpg", ["-c:v", "mpeg2video"]), ("truncated_ogg", ".ogv", ["-c:v", "libtheora"])):
        whole = root / f"whole{suffix}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(made_videos["bheavy"]), *codec, str(whole)], check=True)
        cut = whole.stat().st_size * 3 // 5
        paths[name] = root / f"{name}{suffix}"
        paths[name].write_bytes(whole.read_bytes()[: cut + (cut % 188 == 0)])
    paths["audio_only"] = root / "audio_only.mp4"
    write_audio_only(paths["audio_only"])
    paths["missing"] = root / "does_not_exist.mp4"
    return paths


REASONS = {
    "truncated_moov_last": "truncated mp4: it ends inside its 'mdat' box .* no index \\(moov box\\).* re-download",
    "truncated_moov_first": "truncated",
    "truncated_mkv": "truncated Matroska/WebM file: .* bytes, but its header declares .*; re-download it",
    "truncated_avi": "truncated AVI file: .* bytes, but its header declares .*; re-download it",
    "truncated_ts": "truncated MPEG-TS file: it ends inside a 188-byte packet .*; re-download it .*remux",
    "truncated_flv": "truncated FLV file: it ends inside its last tag .*; re-download it",
    "truncated_ps": "truncated MPEG-PS file: it ends inside a PES packet .*; re-download it",
    "truncated_ogg": "truncated Ogg file: it ends inside an Ogg page .*; re-download it",
    "random_bytes": "Invalid data.*; FFmpeg cannot read it: .*ffprobe",
    "empty": "Invalid data|empty",
    "text_renamed": "Invalid data",
    "audio_only": "not a video: no video stream; found audio \\(aac",
    "missing": "No such file.*; check the manifest's path and --video-root",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_each_broken_file_gives_one_clear_error(broken, name):
    path = broken[name]
    with pytest.raises(DecodeError, match=REASONS[name]) as info:
        decode_clip(str(path), SamplingConfig())
    assert str(path) in str(info.value), "the error must name the file"


def test_broken_files_through_the_killable_decoder(broken, made_videos):
    """Errors cross the process boundary intact, and the worker survives them for the next video."""
    for name in sorted(REASONS):
        with pytest.raises(DecodeError, match=REASONS[name]):
            decode_clip_killable(str(broken[name]), SamplingConfig(), None, timeout_s=30)
    clip = decode_clip_killable(str(made_videos["bheavy"]), SamplingConfig(num_frames=4), None, timeout_s=30)
    assert clip.indices.tolist() == [int((i + 0.5) * 120 / 4) for i in range(4)]


def test_hanging_decode_is_killed(tmp_path, made_videos):
    """A FIFO with no writer blocks open() forever inside FFmpeg: a real hang that only a kill ends."""
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    decoder = KillableDecoder()
    try:
        decoder(str(made_videos["pheavy"]), SamplingConfig(num_frames=2), None, timeout_s=30)  # warm start
        pid = decoder._proc.pid
        start = time.monotonic()
        with pytest.raises(DecodeError, match="did not finish within 2 s; the decoder process was killed") as info:
            decoder(str(fifo), SamplingConfig(), None, timeout_s=2)
        assert str(fifo) in str(info.value)
        assert time.monotonic() - start < 15
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the hung process is gone
        clip = decoder(str(made_videos["pheavy"]), SamplingConfig(num_frames=2), None, timeout_s=30)  # restarts
        assert len(clip.frames) == 2 and decoder._proc.pid != pid
    finally:
        decoder.close()


@pytest.mark.parametrize("fmt", ["avi", "webm"])
def test_a_size_the_muxer_left_unknown_is_no_truncation(tmp_path, made_videos, fmt):
    """Written to a pipe, the AVI RIFF size stays 0xFFFFFFFF and the Matroska Segment size all ones."""
    piped = tmp_path / f"piped.{fmt}"
    codec = ["-c", "copy"] if fmt == "avi" else ["-c:v", "libvpx-vp9", "-b:v", "100k"]
    data = subprocess.run(["ffmpeg", "-v", "error", "-i", str(made_videos["pheavy"]), *codec, "-f", fmt, "-"],
                          capture_output=True, check=True).stdout
    piped.write_bytes(data)
    remuxed = tmp_path / f"remuxed.{fmt}"  # the same packets, written to a file: sizes declared
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(piped), "-c", "copy", str(remuxed)], check=True)
    got, want = (decode_clip(str(p), SamplingConfig(num_frames=4)) for p in (piped, remuxed))
    assert got.indices.tolist() == want.indices.tolist() and len(set(got.indices.tolist())) == 4
    assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


@pytest.mark.parametrize("fmt,codec,extra", [
    ("mpegts", "libx264", []), ("mpegts", "libx264", ["-mpegts_m2ts_mode", "1"]), ("mpegts", "mpeg2video", ["-muxrate", "2M"]),
    ("vob", "mpeg2video", []), ("mpeg", "mpeg1video", []), ("ogg", "libtheora", []), ("ogg", "libvpx", []),
    ("flv", "libx264", []), ("flv", "flv1", [])])
def test_whole_files_of_every_framing_are_whole_and_cut_ones_are_not(tmp_path, fmt, codec, extra):
    """Files with audio as muxers write them, to a file and to a pipe: whole, also with 100 zero bytes
    after them; each cut inside its last few units (packets, pages, tags) is truncated."""
    audio = {"ogg": "libvorbis", "flv": "libmp3lame"}.get(fmt, "mp2")
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=160x96:r=25:d=2", "-f", "lavfi", "-i",
           "sine=d=2:sample_rate=44100", "-c:v", codec, "-c:a", audio, *extra, "-f", fmt]
    to_file = tmp_path / f"whole.{fmt}"
    subprocess.run([*cmd, str(to_file)], check=True)
    piped = subprocess.run([*cmd, "-"], capture_output=True, check=True).stdout
    for name, data in (("file", to_file.read_bytes()), ("pipe", piped)):
        path = tmp_path / f"{name}.{fmt}"
        path.write_bytes(data)
        assert len(decode_clip(str(path), SamplingConfig(num_frames=4)).frames) == 4, name
        path.write_bytes(data + bytes(100))  # trailing bytes that frame nothing are no cut
        assert len(decode_clip(str(path), SamplingConfig(num_frames=4)).frames) == 4, name
        for back in (1, 100, 997, 3001):
            path.write_bytes(data[:-back])
            with pytest.raises(DecodeError, match=f"{path}: truncated .* file: it ends inside"):
                decode_clip(str(path), SamplingConfig(num_frames=4))


@pytest.mark.parametrize("suffix,args,reason", [
    (".mkv", ["-c", "copy"], "damaged Matroska/WebM file: at byte .*, where an element should start, it holds zero bytes"),
    (".webm", ["-c:v", "libvpx", "-b:v", "200k"], "damaged Matroska/WebM file: at byte .* holds zero bytes"),
    (".avi", ["-c", "copy"], "damaged AVI file: at byte .*, where a chunk should start, it holds zero bytes"),
    (".ts", ["-c", "copy"], "MPEG-TS file ending in zero bytes from byte .* on"),
    (".flv", ["-c", "copy"], "FLV file ending in zero bytes from byte .* on"),
    (".mov", ["-c", "copy"], "an mp4 without an index \\(no moov box\\): it holds zero bytes from byte .*, where a box "
                            "should start")])
def test_a_download_that_reserved_its_space_and_stopped_is_refused(tmp_path, made_videos, suffix, args, reason):
    """The file has its full size, but its last 40 % are zero bytes (a downloader that allocates the file
    first, then stops). FFmpeg read the frames before the zeros and stopped: a shorter video, silently."""
    whole, zeroed = tmp_path / f"whole{suffix}", tmp_path / f"zeroed{suffix}"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(made_videos["bheavy"]), *args, str(whole)], check=True)
    data = bytearray(whole.read_bytes())
    start = len(data) * 3 // 5 // 4096 * 4096
    data[start:] = bytes(len(data) - start)
    zeroed.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=f"{zeroed}: {reason}.*an unfinished download whose space was reserved in "
                                          "advance\\?\\); re-download it"):
        decode_clip(str(zeroed), SamplingConfig(num_frames=4))
    assert len(decode_clip(str(whole), SamplingConfig(num_frames=4)).frames) == 4


def test_a_damaged_matroska_cluster_header_is_refused(tmp_path):
    """A Cluster's ID damaged: FFmpeg resyncs at the next cluster and only logs it, so 14 of 120 frames were
    gone from the video silently. The walk over the Segment's top-level elements stops there."""
    whole, damaged = tmp_path / "clusters.mkv", tmp_path / "damaged.mkv"
    ffmpeg(whole, "-c:v", "libx264", "-x264-params", "keyint=30", "-cluster_time_limit", "500", seconds=4, rate=30)
    data = bytearray(whole.read_bytes())
    clusters = [i for i in range(len(data) - 4) if data[i:i + 4] == b"\x1f\x43\xb6\x75"]
    data[clusters[3]:clusters[3] + 4] = bytes(b ^ 0xFF for b in data[clusters[3]:clusters[3] + 4])
    damaged.write_bytes(bytes(data))
    with av.open(str(damaged)) as container:
        assert sum(1 for p in container.demux(container.streams.video[0]) if p.size) < 120, "FFmpeg skips, silently"
    with pytest.raises(DecodeError, match=f"{damaged}: damaged Matroska/WebM file: at byte {clusters[3]}, where an "
                                          "element should start, it holds other data .*; re-download it"):
        decode_clip(str(damaged), SamplingConfig(num_frames=4))
    assert len(decode_clip(str(whole), SamplingConfig(num_frames=4)).frames) == 4


def test_asf_is_checked_against_the_size_its_header_declares(tmp_path):
    """WMV: the File Properties Object declares the file's size (written to a pipe: not known, no claim)."""
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=160x96:r=25:d=2", "-f", "lavfi", "-i", "sine=d=2",
           "-c:v", "wmv2", "-c:a", "wmav2", "-f", "asf"]
    whole, cut, piped = tmp_path / "whole.wmv", tmp_path / "cut.wmv", tmp_path / "piped.wmv"
    subprocess.run([*cmd, str(whole)], check=True)
    piped.write_bytes(subprocess.run([*cmd, "-"], capture_output=True, check=True).stdout)
    cut.write_bytes(whole.read_bytes()[:-1000])
    with pytest.raises(DecodeError, match=f"{cut}: truncated ASF/WMV file: .* bytes, but its header declares .*; re-download"):
        decode_clip(str(cut), SamplingConfig(num_frames=4))
    for path in (whole, piped):
        assert len(decode_clip(str(path), SamplingConfig(num_frames=4)).frames) == 4


def test_a_long_zero_stretch_inside_a_ts_is_named(tmp_path, made_videos):
    """200 KB of zero bytes inside a TS: FFmpeg's demuxer gives up resyncing with EAGAIN (BlockingIOError)."""
    ts, zeroed = tmp_path / "whole.ts", tmp_path / "zeroed.ts"
    ffmpeg(ts, "-c:v", "libx264", seconds=16, size="320x240")
    data = bytearray(ts.read_bytes())
    assert len(data) > 500_000
    data[len(data) // 4:len(data) // 4 + 200_000] = bytes(200_000)
    zeroed.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=f"{zeroed}: BlockingIOError: .*the demuxer found no way through its data "
                                          ".*; re-download it"):
        decode_clip(str(zeroed), SamplingConfig(num_frames=8))


def test_an_ogg_page_that_fails_its_crc_is_refused(tmp_path):
    """One byte of an Ogg page in the middle flipped: FFmpeg's demuxer skips the page (CRC mismatch, logged
    only), and its frames were gone from the video. Theora numbers every frame, so the gap shows."""
    whole, damaged = tmp_path / "whole.ogv", tmp_path / "damaged.ogv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=160x96:r=25:d=4", "-f", "lavfi", "-i",
                    "sine=d=4", "-c:v", "libtheora", "-c:a", "libvorbis", str(whole)], check=True)
    data = bytearray(whole.read_bytes())
    pages = [i for i in range(len(data) - 4) if data[i:i + 4] == b"OggS"]
    video = [i for i in pages if data[i + 14:i + 18] == data[pages[0] + 14:pages[0] + 18]]  # the first page's serial
    middle = video[len(video) // 2]
    data[middle + 40] ^= 0xFF  # inside the page: its CRC no longer holds
    damaged.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=f"{damaged}: damaged file: frames? .* missing from its theora stream .*CRC "
                                          "check\\); re-download it"):
        decode_clip(str(damaged), SamplingConfig(num_frames=8))
    assert len(decode_clip(str(whole), SamplingConfig(num_frames=8)).frames) == 8


def test_a_packet_the_demuxer_flags_corrupt_is_refused_where_it_is_needed(tmp_path, made_videos):
    """One 188-byte packet lost from a TS: at the continuity error the demuxer flags the frame it was putting
    together corrupt (frame 58, 1.93 s); a clip that needs it is refused with its time, by every backend;
    the GOP before decodes unchanged. FFmpeg's decoder alone would conceal the loss."""
    ts, lost = tmp_path / "whole.ts", tmp_path / "lost.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(made_videos["pheavy"]), "-c", "copy", str(ts)], check=True)
    pos, _ = packet_at(ts, 60)
    data = ts.read_bytes()
    lost.write_bytes(data[:pos] + data[pos + 188:])  # the first TS packet of frame 60
    for backend in ("pyav", "torchcodec", "decord"):
        with pytest.raises(DecodeError, match=f"{lost}: corrupt data in the video stream at 1\\.9\\d+ s \\(the demuxer "
                                              "flags the packet as corrupt"):
            decode_clip(str(lost), SamplingConfig(num_frames=8, backend=backend))
    got, want = (decode_clip(str(p), SamplingConfig(num_frames=4), window=(0.0, 1.6)) for p in (lost, ts))
    assert got.indices.tolist() == want.indices.tolist()
    assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


def packet_at(path, frame: int) -> tuple[int, int]:
    """(byte position, size) of the video packet of `frame` (decode order) in the file at path."""
    with av.open(str(path)) as container:
        packet = [p for p in container.demux(container.streams.video[0]) if p.size][frame]
        return packet.pos, packet.size


def damage_packet(src, dst, frame: int) -> None:
    """Copy src to dst with 16 bytes inverted in the middle of the packet of `frame` (decode order)."""
    pos, size = packet_at(src, frame)
    data = bytearray(src.read_bytes())
    data[pos + size // 2: pos + size // 2 + 16] = bytes(b ^ 0xFF for b in data[pos + size // 2: pos + size // 2 + 16])
    dst.write_bytes(bytes(data))


def test_corrupt_data_is_refused_where_a_frame_is_built_on_it(tmp_path, made_videos, caplog):
    """A damaged reference frame: the decoder conceals it and flags neither it nor the frames built on it,
    so the pyav backend makes the decoder fail there. Frames of intact GOPs still decode, unchanged."""
    src = made_videos["pheavy"]  # no B-frames, keyframes at 0, 50, 100 of 120: decode order = display order
    damaged = tmp_path / "damaged.mp4"
    damage_packet(src, damaged, 60)
    log = subprocess.run(["ffmpeg", "-v", "error", "-i", str(damaged), "-f", "null", "-"], capture_output=True, text=True)
    assert log.stderr.strip(), "the test's damage must be one FFmpeg can detect"
    caplog.set_level(logging.INFO, logger="extractors")
    with pytest.raises(DecodeError, match=r"corrupt data in the video stream at 2\.0\d\d s .*re-download or re-encode") \
            as info:
        decode_clip(str(damaged), SamplingConfig(num_frames=8))  # frame 67 refers to frame 60 (2.0 s)
    assert "decoding from the keyframes failed" not in caplog.text, "damage is no reason to decode the whole stream"
    assert str(damaged) in str(info.value)
    for window in ((0.0, 1.6), (3.4, None)):  # GOPs 0-49 and 100-119: no damaged data on the way
        got, want = (decode_clip(str(p), SamplingConfig(num_frames=4), window=window) for p in (damaged, src))
        assert got.indices.tolist() == want.indices.tolist()
        assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


def test_a_chunk_the_avi_demuxer_skips_is_refused(tmp_path, made_videos):
    """Frame 60's AVI chunk header zeroed: FFmpeg's demuxer resyncs past the chunk and only logs it, so the
    frame was gone from the video, silently; the index at the end (idx1) still lists it."""
    avi, damaged = tmp_path / "whole.avi", tmp_path / "skipped.avi"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(made_videos["pheavy"]), "-c", "copy", str(avi)], check=True)
    pos, _ = packet_at(avi, 60)  # its payload
    data = bytearray(avi.read_bytes())
    data[pos - 8:pos] = bytes(8)  # the chunk's id and size
    damaged.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=f"{damaged}: damaged container data: its index lists 120 video packets, "
                                          "but only 119 could be read .*; re-download or re-encode it"):
        decode_clip(str(damaged), SamplingConfig(num_frames=4))
    assert len(decode_clip(str(avi), SamplingConfig(num_frames=4)).frames) == 4


def test_a_zeroed_mpeg4_packet_is_damage_not_a_frame_less(tmp_path, made_videos):
    """MPEG-4 Part 2 packets are read for their VOP headers (_Mpeg4Frames): one zeroed whole has no start
    code, and was dropped from the index as a packet that makes no frame, so the frames after it, built on
    the missing one, came out. It stays a frame, which the decoder fails on where a clip needs it."""
    whole, damaged = tmp_path / "mpeg4.mp4", tmp_path / "zeroed.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(made_videos["pheavy"]), "-c:v", "mpeg4", "-g", "12", str(whole)],
                   check=True)
    pos, size = packet_at(whole, 20)
    data = bytearray(whole.read_bytes())
    data[pos:pos + size] = bytes(size)
    damaged.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=r"corrupt data in the video stream at 0\.667 s"):
        decode_clip(str(damaged), SamplingConfig(num_frames=8))
    got, want = (decode_clip(str(p), SamplingConfig(num_frames=4), window=(0.0, 0.39)) for p in (damaged, whole))
    assert got.indices.tolist() == want.indices.tolist()
    assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


def test_a_damaged_keyframe_after_a_good_run_is_refused_without_a_fallback(tmp_path, made_videos, caplog):
    """Keyframe 50 damaged: the run from keyframe 0 has shown that the codec starts at keyframes, so the
    failure at keyframe 50 is damage, refused at its time, not a reason to decode the stream from the top."""
    damaged = tmp_path / "damaged_key.mp4"
    damage_packet(made_videos["pheavy"], damaged, 50)
    caplog.set_level(logging.INFO, logger="extractors")
    with pytest.raises(DecodeError, match=r"corrupt data in the video stream at 1\.667 s"):
        decode_clip(str(damaged), SamplingConfig(num_frames=8))
    assert "decoding from the keyframes failed" not in caplog.text


def test_open_gop_h264_decodes_from_its_keyframes_without_false_errors(tmp_path, caplog):
    """x264 open GOPs: a P-frame after a recovery-point keyframe unrefs a leading B-frame of the GOP before
    (MMCO), which a decode from that keyframe never made: not corrupt data. The frames come from the
    keyframes, not from a fallback decode of the whole stream, and equal a full decode."""
    path = ffmpeg(tmp_path / "open_gop.mp4", "-c:v", "libx264", "-x264-params",
                  "open-gop=1:keyint=25:bframes=3:b-pyramid=normal", seconds=6)
    caplog.set_level(logging.INFO, logger="extractors")
    clip = decode_clip(str(path), SamplingConfig(num_frames=8))
    assert "decoding from the keyframes failed" not in caplog.text and "sequential" not in clip.flags
    full = full_decode(path)
    assert all(np.array_equal(frame, full[i]) for i, frame in zip(clip.indices, clip.frames))


def test_bad_window_is_a_decode_error(made_videos):
    with pytest.raises(DecodeError, match="window"):
        decode_clip(str(made_videos["bheavy"]), SamplingConfig(), window=(3.0, 1.0))


@pytest.fixture(scope="module")
def not_videos(tmp_path_factory, made_videos):
    """Inputs FFmpeg opens that are not videos, made with the apt ffmpeg where it takes a tool."""
    root = tmp_path_factory.mktemp("not_videos")
    text = root / "captions.txt"  # FFmpeg's tty demuxer renders .txt files as "ansi" video
    text.write_text("".join(f"line {i}: a caption, not a video\n" for i in range(200)))
    srt = root / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nHello\n\n2\n00:00:01,000 --> 00:00:02,000\nWorld\n")
    mp3 = root / "song.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", str(mp3)], check=True)
    png = ffmpeg(root / "still.png", "-frames:v", "1")
    jpg = ffmpeg(root / "still.jpg", "-frames:v", "1")
    cover = root / "cover.mp3"  # audio whose only video stream is its cover picture
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(mp3), "-i", str(png), "-map", "0", "-map", "1", "-c", "copy",
                    "-disposition:v", "attached_pic", str(cover)], check=True)
    return {"text": text, "srt": srt, "mp3": mp3, "png": png, "jpg": jpg, "cover": cover}


NOT_VIDEO = {
    "text": "not a video: text rendered by FFmpeg's tty demuxer",
    "srt": "not a video: no video stream; found subtitle \\(srt",
    "mp3": "not a video: no video stream; found audio \\(mp3",
    "cover": "not a video: no video stream; found audio \\(mp3.*video \\(png, cover image",
    "png": "not a video: a still image \\(png.*sampling.allow_still_images",
    "jpg": "not a video: a still image \\(mjpeg.*sampling.allow_still_images",
}


@pytest.mark.parametrize("name", sorted(NOT_VIDEO))
def test_inputs_that_are_not_videos_name_what_was_found(not_videos, name):
    path = not_videos[name]
    with av.open(str(path)):
        pass  # FFmpeg opens every one of them
    with pytest.raises(DecodeError, match=NOT_VIDEO[name]) as info:
        decode_clip(str(path), SamplingConfig())
    assert str(path) in str(info.value)


def test_animated_webp_is_named_with_the_fix(tmp_path, not_videos):
    """FFmpeg decodes only still WebP: an animated one is named as such, not as a still image."""
    animated, still = tmp_path / "anim.webp", tmp_path / "still.webp"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.3",
                    "-c:v", "libwebp_anim", "-loop", "0", str(animated)], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(not_videos["png"]), "-c:v", "libwebp", str(still)], check=True)
    for allow in (False, True):
        with pytest.raises(DecodeError, match="an animated WebP.*convert it to a video first"):
            decode_clip(str(animated), SamplingConfig(allow_still_images=allow))
    with pytest.raises(DecodeError, match="a still image \\(webp"):
        decode_clip(str(still), SamplingConfig())


def test_still_images_when_allowed(not_videos):
    cfg = SamplingConfig(num_frames=4, allow_still_images=True)
    for name in ("png", "jpg"):
        clip = decode_clip(str(not_videos[name]), cfg)
        assert clip.indices.tolist() == [0, 0, 0, 0] and clip.valid.tolist() == [True, False, False, False]
        assert "still" in clip.flags and clip.frames[0].shape == (96, 160, 3)
    with pytest.raises(DecodeError, match="tty"):  # allowing stills does not let text in
        decode_clip(str(not_videos["text"]), cfg)
