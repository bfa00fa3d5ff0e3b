"""Sparse frame decoding with PyAV at close to the decode limit.

The least work that the planned frames need: for each target, decode from the keyframe before it up to
it, skipping non-reference frames that are not targets, and convert only the targets to RGB. We get
there by demuxing the video stream once (cheap: no decoding), which gives every frame's timestamp and
keyframe flag, then feeding the decoder only the packets from the keyframe before each group of targets
up to the last target, with `skip_frame = "NONREF"` on every packet that is not a target.

Frame counts come from the demuxed packets, never from the container header (which may over-report),
and times from packet timestamps (variable frame rate is handled). Streams whose packets carry no
keyframe flags, or whose codec cannot start at a flagged keyframe, are decoded sequentially from the
first packet instead (same frames, full-decode cost, flagged "sequential"), checked frame by frame
against the index. MPEG-4 Part 2 packets are unpacked first (_Mpeg4Frames): with packed B-frames the
decoder gives frames the wrong timestamps. A stream cut mid-GOP starts at its first keyframe.

The index and the plan are always PyAV's; `sampling.backend` picks what decodes the planned frames:
PyAV here, or torchcodec / decord (extractors/backends.py), which return the same frames.
"""
from __future__ import annotations

import atexit
import functools
import io
import logging
import multiprocessing
import os
import threading
import traceback
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from extractors.api import Clip, DecodeError
from extractors.backends import BackendUnavailable, decode_with_backend, require_backend
from extractors.config import SamplingConfig
from extractors.sampling import Plan, plan_frames, snap_to_keyframes
from extractors.truncation import file_size, mp4_without_index, truncation

# Demuxers that render a text file as video (FFmpeg's tty demuxer draws .txt/.ans files as "ansi" video)
TEXT_DEMUXERS = {"tty": "text rendered by FFmpeg's tty demuxer", "bin": "binary text art", "xbin": "XBIN text art",
                 "adf": "Artworx text art", "idf": "iCE Draw text art"}
# Codecs of still pictures: a file holding one such frame is an image, not a video
IMAGE_CODECS = {"png", "mjpeg", "jpeg2000", "jpegls", "bmp", "tiff", "webp", "gif", "ppm", "pgm", "pbm", "pam",
                "qoi", "sgi", "targa", "dpx", "exr", "hdr", "jpegxl", "pcx", "xbm", "xpm", "xwd", "sunrast"}

# Containers whose header holds everything we read before decoding (timestamps, size), so FFmpeg's stream
# probe can be cut short and kept from decoding: for H.264 it decodes the first frame (2 ms for a 640x272
# I-frame; 7 frames without B-frames, to guess the reordering delay), frames we decode again. What the
# probe's decode would have told (the sample aspect ratio of a stream whose container does not give it)
# is read from our own decoder once it has decoded a frame (_settle_sar).
MOV_DEMUXER = "mov,mp4,m4a,3gp,3g2,mj2"  # by its full name: format="mp4" would name the container "mp4"
FAST_PROBE_FORMATS = {MOV_DEMUXER}  # not Matroska: its VFW mode can store decode times
# skip_frame: the probe's decoder. noparse (which needs nofillin): no H.264/AV1 parser re-reads every packet
# (a third of the demux pass); the sample table gives each packet's timestamps and keyframe flag, identical
# with and without it (checked on H.264 open-GOP and intra-refresh, HEVC, AV1, VP9, MPEG-2/4, MJPEG, ProRes).
FAST_PROBE = {"probesize": "32", "analyzeduration": "1", "skip_frame": "all", "fflags": "+nofillin+noparse"}
# An ISO base media file starts with an ftyp box: FFmpeg's probe (every demuxer's probe function run on the
# first bytes, 0.3-0.5 ms) can only pick the mov demuxer then, except for JPEG 2000 / JPEG XL image brands.
FTYP_IMAGE_BRANDS = {b"jp2 ", b"jxl "}

# Decoders that read skip_frame once, when they open (FFmpeg's libdav1d.c maps it to dav1d's
# decode_frame_type at init), so a per-packet NONREF would leave them unable to decode non-reference
# targets for the life of the context: they decode every frame from each group's keyframe.
SKIP_FRAME_AT_OPEN = {"libdav1d"}
# A decoder conceals corrupt data and flags only the frame it hit (is_corrupt), not the frames that refer to
# it: "explode" makes it fail at the packet instead, so that no picture built on damaged data comes out.
# "crccheck": codecs that carry checksums (FFV1 v3 slices, ...) verify them. Not for open-GOP H.264: _open_gops.
DECODER_OPTIONS = {"err_detect": "crccheck+explode"}

# MPEG-4 Part 2 start codes: a VOP (one picture) and the video object layer header (0x20..0x2F) that says how
# many bits a VOP's time increment has (needed to read whether a VOP is coded at all)
START_CODE = b"\x00\x00\x01"  # every MPEG-4 Part 2 packet starts with one (a VOP's, or a header's)
VOP_START = START_CODE + b"\xb6"
CORRUPT_PACKET = "the demuxer flags the packet as corrupt: damaged or cut-off container data"
UNPACK_CODECS = {"mpeg4"}  # codecs whose packets pass through _Mpeg4Frames (MPEG-4 Part 2 only)
# (demuxer, codec) whose every frame has a packet (a repeated frame an empty one), numbered by its pts: a gap
# in the numbers is data the demuxer skipped (Theora in Ogg: a page that failed its CRC check, logged only)
NUMBERED_STREAMS = {("ogg", "theora")}

log = logging.getLogger(__name__)
_local = threading.local()  # swscale contexts and filter graphs kept per thread (neither is thread-safe)


@dataclass
class StreamIndex:
    """The demuxed video stream of one file: packets in decode order and frames in display order."""

    packets: PacketSource  # the non-empty packets of the stream, in decode order
    pts: np.ndarray  # [P] int64, pts of each packet in decode order
    order: np.ndarray  # [N] int64, packet position of the i-th frame in display order
    times: np.ndarray  # [N] float64, presentation time of the i-th frame, seconds from the first shown frame
    end: float  # end time of the last frame, seconds
    keyframes: np.ndarray  # [nK] int64, display indices of the shown keyframes
    key_positions: np.ndarray  # int64, packet positions of every keyframe (shown or not): decode start points
    #                            (a paletted stream: its first packet only, see `palette`)
    width: int  # coded width, before rotation
    height: int
    sequential: bool  # packet timestamps do not give the display order (e.g. AVI with B-frames)
    sar: Fraction | None  # sample (pixel) aspect ratio, display width = width * sar; None: the decoder's (_settle_sar)
    stream_index: int  # the stream's index in the container
    time_base: Fraction
    no_keyflags: bool  # no packet is flagged a keyframe (e.g. FLV1 in SWF): decode from the first packet
    cut: int  # frames left out before the first keyframe of a stream cut mid-GOP (not decodable)
    palette: bool  # pal8 pictures: AVI and MOV give the palette with the first packet only, so every decode
    #                starts there (a decode from a later keyframe has no palette and makes black frames)


def decode_clip(
    path: str, sampling: SamplingConfig, window: tuple[float, float] | None = None, span: tuple[int, int] | None = None
) -> Clip:
    """Decode the frames `sampling` plans for the video at `path`; raises DecodeError naming the file.

    window: (start, end) seconds of the video to sample from; end None or inf = to the end.
    span: (offset, size): the video is those bytes of `path` (a member of a tar), read in place.
    Raises BackendUnavailable (not a DecodeError: no video can decode) if sampling.backend is not installed,
    or if a tar member is to be decoded by a backend that reads whole files only.
    """
    require_backend(sampling.backend)
    if span and sampling.backend != "pyav":
        raise BackendUnavailable(f"tar shard input is decoded in place by the pyav backend only, not "
                                 f"{sampling.backend!r}: set sampling.backend: pyav for video2dataset tars")
    name = _name(str(path), span)
    try:
        with _open(str(path), span) as container:
            reopen = functools.partial(_reopen, str(path), span)
            return _decode(container, name, sampling, window, span[1] if span else None, reopen)
    except (DecodeError, BackendUnavailable):
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise DecodeError(f"{name}: {type(e).__name__}: {e}; {_fix_for(e)}") from e


def _fix_for(error: Exception) -> str:
    """What to do about a library or OS error that reached decode_clip unexplained."""
    if isinstance(error, FileNotFoundError):
        return "check the manifest's path and --video-root"
    if isinstance(error, PermissionError):
        return "make it readable by this user"
    if isinstance(error, IsADirectoryError):
        return "the manifest must name video files, not folders"
    if isinstance(error, BlockingIOError):  # EAGAIN: how FFmpeg's MPEG-TS demuxer gives up resyncing
        return ("the demuxer found no way through its data (no sync over a long stretch, such as zero bytes inside "
                "an MPEG-TS): damaged, or an unfinished download; re-download it")
    if isinstance(error, av.InvalidDataError):
        return "FFmpeg cannot read it: not a video, or a damaged one; check it with `ffprobe FILE`, re-download or re-encode it"
    return "check it with `ffprobe FILE`; re-download or re-encode it"


class _ByteRange(io.RawIOBase):
    """Bytes [offset, offset + size) of a file as a seekable file of their own, for av.open."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


def _name(path: str, span: tuple[int, int] | None) -> str:
    """How errors name the video: the file, or the tar member's bytes in it."""
    return f"{path} (bytes {span[0]}+{span[1]})" if span else path


def _open(path: str, span: tuple[int, int] | None = None) -> av.container.InputContainer:
    """Open the video; a file its container shows to be cut short is refused (extractors/truncation.py)."""
    head = _head(path, span)
    container = _open_container(path, span, head)
    why = truncation(path, span, container.format.name, head)
    if why:
        container.close()
        raise DecodeError(f"{_name(path, span)}: {why}")
    return container


def _open_container(path: str, span: tuple[int, int] | None, head: bytes) -> av.container.InputContainer:
    """Open with a short stream probe where the container header suffices, else with FFmpeg's full probe.
    An mp4/mov (ftyp box first) opens straight with the mov demuxer, without probing the format."""
    def source():  # a fresh reader each time: the second open must start from byte 0
        return _ByteRange(path, *span) if span else path

    if _is_ftyp(head):
        try:
            container = av.open(source(), format=MOV_DEMUXER, metadata_errors="ignore", options=FAST_PROBE)
        except av.FFmpegError:  # a broken or mislabelled file: FFmpeg's probe and full open say what it is
            container = None
    else:
        container = av.open(source(), metadata_errors="ignore", options=FAST_PROBE)
    if container is not None and container.format.name in FAST_PROBE_FORMATS \
            and all(s.codec_context.width for s in container.streams.video):
        return container
    if container is not None:
        container.close()
    try:
        return av.open(source(), metadata_errors="ignore")
    except av.FFmpegError as e:
        why = mp4_without_index(path, span) if _is_ftyp(head) else None
        if why:
            raise DecodeError(f"{_name(path, span)}: {why}") from e
        raise


def _reopen(path: str, span: tuple[int, int] | None = None) -> av.container.InputContainer:
    """A fresh open of the file (or tar member) with FFmpeg's full probe, to read its packets from the top."""
    return av.open(_ByteRange(path, *span) if span else path, metadata_errors="ignore")


def _head(path: str, span: tuple[int, int] | None) -> bytes:
    """The first 64 bytes of the file (or the tar member at span); b"" where they cannot be read so."""
    try:  # non-blocking: a fifo must not block here; pread refuses it (ESPIPE), and av.open reports it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return b""  # missing or unreadable: av.open says which
    try:
        return os.pread(fd, min(64, span[1]) if span else 64, span[0] if span else 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _is_ftyp(head: bytes) -> bool:
    """The video begins with an ISO base media ftyp box of a video brand."""
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] not in FTYP_IMAGE_BRANDS


def _decode(container: av.container.InputContainer, path: str, cfg: SamplingConfig, window, size: int | None,
            reopen) -> Clip:
    stream, index = _read_index(container, path, cfg.buffer_mb, size, reopen, cfg.threads)
    flags = _check_still(stream, index, container.format.name, path, cfg)
    try:
        plan = plan_frames(index.times, index.end, cfg, window)
    except ValueError as e:
        raise DecodeError(f"{path}: {e}") from e
    if plan.short:
        flags.append("short")
    if cfg.mode == "keyframe":
        snapped = None if index.no_keyflags else snap_to_keyframes(plan, index.times, index.keyframes)
        # no keyframe in the window: the planned frames themselves are the nearest decodable ones
        flags.append("keyframe" if snapped is not None else "no_keyframe_in_window")
        plan = snapped if snapped is not None else plan
    targets = sorted(set(int(i) for i in plan.indices if i >= 0))
    if cfg.backend == "pyav":
        rgb, rotation, how = _decode_pyav(stream.codec_context, index, targets, cfg, path)
    else:
        _check_runs(index, targets, path)
        rotation = _probe_rotation(stream.codec_context, index, path)
        upright = _display_size(index, rotation)
        rgb, how = decode_with_backend(cfg.backend, path, index, targets, cfg.threads, upright, rotation,
                                       container.format.name, stream.start_time)
        rgb = {i: _resize_rgb(f, _output_size(*upright, cfg), cfg.threads) for i, f in rgb.items()}
    if how == "sequential":
        flags.append("sequential")
    if index.cut:
        flags.append("cut_start")
    if rotation:
        flags.append("rotated")
    if index.sar != 1:
        flags.append("anamorphic")
    return _assemble(plan, _display_size(index, rotation), rgb, index, tuple(flags))


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The main video stream; refuses inputs that FFmpeg opens but that hold no video, naming what they hold."""
    fmt = container.format.name
    if fmt in TEXT_DEMUXERS:
        raise DecodeError(f"{path}: not a video: {TEXT_DEMUXERS[fmt]} (demuxer {fmt!r}); is it a text file?")
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        found = ", ".join(f"{s.type} ({s.codec_context.name}{', cover image' if s.type == 'video' else ''})"
                          for s in container.streams) or "no streams"
        raise DecodeError(f"{path}: not a video: no video stream; found {found} (container {fmt!r})")
    best = container.streams.best("video")  # FFmpeg's choice, unless it is a cover image
    return best if best in videos else videos[0]


def _check_still(stream, index: StreamIndex, fmt: str, path: str, cfg: SamplingConfig) -> list[str]:
    """A still image (an image demuxer, or one frame of a picture codec) is refused unless allowed."""
    codec = stream.codec_context.name
    still = fmt == "image2" or fmt.endswith("_pipe") or (len(index.times) == 1 and codec in IMAGE_CODECS)
    if not still:
        return []
    if fmt == "webp_pipe" and _animated_webp(path):
        raise DecodeError(f"{path}: an animated WebP: FFmpeg decodes only still WebP images; convert it to a "
                          "video first (e.g. write its frames with Pillow, then encode them with ffmpeg)")
    if not cfg.allow_still_images:
        raise DecodeError(f"{path}: not a video: a still image ({codec}, container {fmt!r}); "
                          "set sampling.allow_still_images: true to take images as one-frame videos")
    return ["still"]


def _animated_webp(path: str) -> bool:
    """Whether the WebP at `path` holds an animation (Pillow reads its chunks; FFmpeg cannot decode it)."""
    from PIL import Image  # torchvision's dependency; imported only for WebP input

    if not os.path.isfile(path):  # a tar member ("x.tar (bytes a+b)"): not looked into
        return False
    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except OSError:
        return False


def _read_index(container: av.container.InputContainer, path: str, buffer_mb: int, size: int | None, reopen=None,
                threads: int = 1) -> tuple[av.video.stream.VideoStream, StreamIndex]:
    """The main video stream and its index: all decode_clip reads before it decodes a frame (except where
    the stream starts with an open GOP's leading frames: see _index).
    size: bytes of the video (a tar member's); None = the size of the file at path, if it is one.
    reopen: returns a fresh open container of the video (default: the file at path).
    threads: decoder threads (set on the stream's codec context before it first decodes)."""
    stream = _video_stream(container, path)
    if size is None:
        size = file_size(path)
    listed = _check_complete(stream, path, size)
    # before anything decodes (also the other backends' one-frame probe): PyAV's default (0) starts a thread per core
    stream.codec_context.thread_count = threads
    index = _index(container, stream, path, buffer_mb, size, reopen or functools.partial(_reopen, path))
    if listed > index.packets.read:  # a damaged chunk header (AVI): the demuxer resyncs past it, silently
        raise DecodeError(f"{path}: damaged container data: its index lists {listed} video packets, but only "
                          f"{index.packets.read} could be read (the demuxer skipped damaged data); re-download or "
                          "re-encode it")
    # the decoder opens at its first decode (the index decodes only for leading frames at the start: lenient)
    if not stream.codec_context.is_open and not (stream.codec_context.name == "h264" and _open_gops(index)):
        stream.codec_context.options = DECODER_OPTIONS
    return stream, index


def _open_gops(index: StreamIndex) -> bool:
    """Whether a keyframe is followed (in decode order) by frames shown before it: an open GOP. H.264 started
    at such a keyframe (a recovery point, not an IDR) reports errors that are none (an MMCO that names a
    leading frame of the GOP before, which was not decoded), so its decoder conceals, as FFmpeg's default."""
    key = np.zeros(len(index.pts), dtype=bool)
    key[index.key_positions] = True
    last_key = np.maximum.accumulate(np.where(key, np.arange(len(key)), -1))  # [P] latest keyframe position
    after = last_key >= 0
    return bool(np.any(index.pts[after] < index.pts[last_key[after]]))


def _check_complete(stream: av.video.stream.VideoStream, path: str, size: int | None) -> int:
    """A truncated file whose index (e.g. an mp4 moov at the front) points past its end is an error,
    not a shorter video: otherwise the plan would silently sample only the frames that survived.
    Returns how many non-empty packets the index lists (all of them in mp4 and AVI; some or none in
    containers whose index holds only keyframes or is built while demuxing)."""
    rows = [(e.pos + e.size, e.size) for e in stream.index_entries]  # [(end byte, size)] per entry
    needed = max((end for end, _ in rows), default=0)
    if size is not None and needed > size:
        missing = sum(1 for end, _ in rows if end > size)
        raise DecodeError(
            f"{path}: truncated file: {size} bytes, but its index needs {needed} ({missing} of {len(rows)} "
            "frames are missing); re-download or re-encode it"
        )
    return sum(1 for _, length in rows if length)


class PacketSource:
    """The video stream's frame packets in decode order, by position.

    Files up to `buffer_mb` keep every packet in memory after the one demux pass (fastest); bigger
    files keep only timestamps and re-read each run of packets by seeking to its keyframe.
    MPEG-4 Part 2 packets pass through _Mpeg4Frames on every read (see there): positions count the
    packets the decoder makes a frame of, and `pts_list` holds display timestamps.
    """

    def __init__(self, container: av.container.InputContainer, stream, path: str, keep: bool, reopen) -> None:
        """reopen: a function returning a fresh open container of the same file (to read it from the top)."""
        self.container, self.stream, self.path, self.reopen = container, stream, path, reopen
        self.mpeg4 = _Mpeg4Frames(stream, path) if stream.codec_context.name in UNPACK_CODECS else None
        self.numbers: list[int] | None = None  # NUMBERED_STREAMS: the pts of every packet read, empty ones too
        raw = container.demux(stream)
        numbered = (container.format.name, stream.codec_context.name) in NUMBERED_STREAMS
        demuxed = self._frames(self._record_numbers(raw) if numbered else raw)
        if keep:
            # decode times and durations are read from the kept packets when asked for (seeking, the last
            # frame, the torchcodec frame table): each PyAV attribute read costs ~1 us a packet
            self.kept: list[av.Packet] | None = list(demuxed)
            self.pts_list = [packet.pts for packet in self.kept]
            self.key = [packet.is_keyframe for packet in self.kept]
            self.discard = [packet.is_discard for packet in self.kept]
            self._dts = self._duration = self._corrupt = None
        else:
            self.kept = None
            rows = [(p.pts, p.dts, p.is_keyframe, p.is_discard, p.duration or 0, p.is_corrupt) for p in demuxed]
            self.pts_list, self._dts, self.key, self.discard, self._duration, corrupt = \
                (list(c) for c in zip(*rows)) if rows else ([], [], [], [], [], [])
            self._corrupt = np.flatnonzero(corrupt)
        self.read_pts = self.pts_list  # the timestamps the demuxer gives, to find a packet again after a seek
        self.read = self.mpeg4.read if self.mpeg4 is not None else len(self.pts_list)  # non-empty packets read
        if self.mpeg4 is not None:
            self.key = self.mpeg4.keyframes()
            if self.mpeg4.packed and None not in self.read_pts:  # (no timestamps: _index refuses the file)
                self.pts_list = self.mpeg4.display_pts(self.read_pts)
                for packet, pts in zip(self.kept or (), self.pts_list):
                    packet.pts = pts  # the decoder hands each frame its packet's pts: match by the display time

    def _record_numbers(self, packets):
        self.numbers = []
        for packet in packets:
            if packet.pts is not None:
                self.numbers.append(packet.pts)
            yield packet

    def _frames(self, packets):
        """The packets of frames: empty packets dropped, MPEG-4 Part 2 unpacked (a fresh filter per pass)."""
        packets = (packet for packet in packets if packet.size)
        return self.mpeg4.unpack(packets, self.stream) if self.mpeg4 is not None else packets

    @property
    def dts(self) -> list[int | None]:
        if self._dts is None:
            self._dts = [packet.dts for packet in self.kept]
        return self._dts

    @property
    def duration(self) -> list[int]:
        if self._duration is None:
            self._duration = [packet.duration or 0 for packet in self.kept]
        return self._duration

    @property
    def corrupt(self) -> np.ndarray:
        """[C] int64, positions of the packets the demuxer flags corrupt (damaged or cut-off container data)."""
        if self._corrupt is None:
            self._corrupt = np.flatnonzero([packet.is_corrupt for packet in self.kept])
        return self._corrupt

    def last_is_corrupt(self) -> bool:
        return bool(self.kept[-1].is_corrupt) if self.kept is not None else len(self) - 1 in self.corrupt

    def __len__(self) -> int:
        return len(self.pts_list)

    def run(self, start: int, stop: int):
        """Packets at positions start..stop (inclusive); start must be a keyframe."""
        if self.kept is not None:
            yield from self.kept[start : stop + 1]
            return
        rewrite = self.pts_list is not self.read_pts  # packed MPEG-4: the display times the index holds
        packets = self._after_seek(start, stop) if start > 0 and self._seek(start) else self._from_the_top(start, stop)
        for pos, packet in enumerate(packets, start):
            if rewrite:
                packet.pts = self.pts_list[pos]
            yield packet

    def _seek(self, start: int) -> bool:
        """Seek to the keyframe at `start`; False where the container cannot seek (e.g. SWF)."""
        target = self.dts[start] if self.dts[start] is not None else self.read_pts[start]
        try:
            self.container.seek(int(target), stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as e:
            log.info("%s: cannot seek (%s); reading from the start of the file", self.path, e)
            return False
        return True

    def _after_seek(self, start: int, stop: int):
        target_dts, pos = self.dts[start], None
        for packet in self._frames(self.container.demux(self.stream)):
            if pos is None:
                if packet.pts != self.read_pts[start]:
                    if packet.dts is not None and target_dts is not None and packet.dts > target_dts:
                        raise DecodeError(f"{self.path}: seeking to packet {start} overshot it; "
                                          "the container index is inconsistent: remux the file")
                    continue
                pos = start
            yield packet
            if pos == stop:
                return
            pos += 1
        raise DecodeError(f"{self.path}: packets {start}..{stop} could not be read again after seeking")

    def _from_the_top(self, start: int, stop: int):
        """Demux a fresh open of the file from its first packet (no seek needed, nor trusted)."""
        with self.reopen() as container:
            pos = 0
            for packet in self._frames(container.demux(container.streams[self.stream.index])):
                if pos >= start:
                    yield packet
                if pos == stop:
                    return
                pos += 1
        raise DecodeError(f"{self.path}: packets {start}..{stop} could not be read again")


class _Mpeg4Frames:
    """MPEG-4 Part 2 (DivX, XviD) packets as the frames the decoder makes of them.

    DivX-style AVIs store "packed B-frames": a P-VOP and the B-VOP shown before it share one packet, and a
    placeholder N-VOP (a VOP "not coded") takes the B-frame's slot. FFmpeg's decoder unpacks them itself
    but gives each frame the timestamp of the wrong packet, so frames matched by timestamp came out one off.
    FFmpeg's mpeg4_unpack_bframes bitstream filter moves each B-VOP into its placeholder's packet (one
    packet out per packet in; it passes unpacked streams through as they are). What the index needs is
    read from the VOP headers after unpacking: an N-VOP left over (a dropped frame) makes no frame and is
    dropped; keyframes are the I-VOPs (the container flags the placeholders too); and where the stream
    was packed, its timestamps, computed by the demuxer for the packed layout, are reassigned in display
    order (an I/P-VOP is shown after the B-VOPs that follow it in decode order).
    """

    def __init__(self, stream, path: str) -> None:
        self.path = path
        self.types: list[str] = []  # VOP coding type of each frame packet, decode order: I, P, B, S; "?" damaged
        self.with_vol: list[bool] = []  # the decoder has a VOL header when it starts at this packet
        self.packed = False
        self.read = 0  # non-empty packets in the first pass, before unpacking
        extradata = stream.codec_context.extradata or b""
        self._extradata_bits = _vol_time_bits(extradata)  # vop_time_increment bits; None: no VOL there

    def unpack(self, packets, stream):
        """The frame packets of one pass over `packets` (non-empty, decode order), with a fresh filter.
        The first pass (the index's) also records each frame's VOP type."""
        bsf = av.bitstream.BitStreamFilterContext("mpeg4_unpack_bframes", stream)
        record = not self.types
        time_bits = self._extradata_bits
        for packet in packets:
            self.read += record
            if record and not self.packed:
                self.packed = bytes(packet).count(VOP_START) > 1
            for out in bsf.filter(packet):
                data = bytes(out)
                vop = data.find(VOP_START)
                if vop < 0 and data.startswith(START_CODE):
                    continue  # headers only (a VOL or GOV before the first VOP): no frame
                if vop < 0:  # no start code at all: damaged data, not nothing; a frame the decoder must fail on
                    kind, coded, in_packet = "?", True, None
                else:
                    in_packet = _vol_time_bits(data[:vop])
                    time_bits = in_packet or time_bits
                    kind, coded = _vop_header(data, vop + 4, time_bits)
                if not coded:  # an N-VOP: the decoder shows nothing new
                    continue
                if record:
                    self.types.append(kind)
                    self.with_vol.append(bool(in_packet or self._extradata_bits))
                yield out

    def keyframes(self) -> list[bool]:
        """Where decoding can start: an I-VOP, with the VOL header in the codec's extradata or the packet."""
        return [kind == "I" and vol for kind, vol in zip(self.types, self.with_vol)]

    def display_pts(self, pts: list[int]) -> list[int]:
        """The packets' timestamps (decode order) given out again in display order: each I/P/S-VOP is shown
        after the B-VOPs that follow it in decode order."""
        shown, held = [], None  # decode positions in display order; the reference frame not yet shown
        for pos, kind in enumerate(self.types):
            if kind == "B":
                shown.append(pos)
            else:
                if held is not None:
                    shown.append(held)
                held = pos
        if held is not None:
            shown.append(held)
        out = [0] * len(pts)
        for pos, t in zip(shown, sorted(pts)):
            out[pos] = t
        log.info("%s: MPEG-4 packed B-frames unpacked (mpeg4_unpack_bframes); timestamps reassigned in "
                 "display order", self.path)
        return out


class _Bits:
    """Big-endian bit reader over a few bytes."""

    def __init__(self, data: bytes) -> None:
        self.value, self.left = int.from_bytes(data, "big"), 8 * len(data)

    def read(self, n: int) -> int:
        if n > self.left:
            raise EOFError("header cut short")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def peek(self, n: int) -> int:
        return (self.value >> (self.left - n)) & ((1 << n) - 1) if n <= self.left else -1


def _vol_time_bits(data: bytes) -> int | None:
    """Bits of vop_time_increment, from the first video object layer header in `data` (ISO 14496-2
    6.2.3, as FFmpeg's decode_vol_header reads it); None if `data` holds no readable one."""
    at = 0
    while (at := data.find(b"\x00\x00\x01", at) + 3) >= 3:
        if at < len(data) and 0x20 <= data[at] <= 0x2F:
            break
    else:
        return None
    bits = _Bits(data[at + 1 : at + 25])
    try:
        bits.read(9)  # random_accessible_vol, video_object_type_indication
        verid = 1
        if bits.read(1):  # is_object_layer_identifier
            verid = bits.read(4)
            bits.read(3)
        if bits.read(4) == 15:  # aspect_ratio_info: extended PAR
            bits.read(16)
        if bits.read(1):  # vol_control_parameters: chroma_format, low_delay, vbv_parameters
            bits.read(3)
            if bits.read(1):
                bits.read(79)
        if bits.read(2) == 3 and verid != 1:  # grayscale shape: its extension
            bits.read(4)
        bits.read(1)  # marker
        resolution = bits.read(16)
    except EOFError:
        return None
    return max(1, (resolution - 1).bit_length()) if resolution else None


def _vop_header(data: bytes, at: int, time_bits: int | None) -> tuple[str, bool]:
    """(coding type, coded) of the VOP whose header starts at data[at] (after its start code). With the
    time increment's size unknown or inconsistent with the marker after it, the size is guessed as FFmpeg's
    decoder guesses it (decode_vop_header), so that we read the VOP as the decoder will."""
    bits, kind = _Bits(data[at : at + 16]), "?"
    try:
        kind = "IPBS"[bits.read(2)]
        while bits.read(1):  # modulo_time_base
            pass
        bits.read(1)  # marker
        if not time_bits or not bits.peek(time_bits + 1) & 1:
            for time_bits in range(1, 16):
                if kind in "PS":
                    if bits.peek(time_bits + 6) & 0x37 == 0x30:
                        break
                elif bits.peek(time_bits + 5) & 0x1F == 0x18:
                    break
            else:
                time_bits = 16
        bits.read(time_bits + 1)  # vop_time_increment, marker
        return kind, bool(bits.read(1))
    except EOFError:  # a cut header: the decoder will report the packet
        return kind, True


def _index(container: av.container.InputContainer, stream, path: str, buffer_mb: int, size: int | None,
           reopen) -> StreamIndex:
    """size: bytes of the video, None if unknown; up to buffer_mb (or unknown) its packets are kept in memory.
    reopen: returns a fresh open container of the video."""
    keep = size is None or size <= buffer_mb * 2**20
    packets = PacketSource(container, stream, path, keep, reopen)
    if not len(packets):
        raise DecodeError(f"{path}: the video stream holds no packets (empty or truncated file)")
    if packets.last_is_corrupt():  # where a cut leaves it: a file that ends inside the last frame's data
        raise DecodeError(f"{path}: truncated or damaged at its end: {CORRUPT_PACKET} on the video stream's last "
                          "packet (cut off?); re-download it")
    _check_numbered(packets, path)
    if None in packets.pts_list:
        raise DecodeError(
            f"{path}: video packets without timestamps (raw elementary stream?); remux it first, "
            "e.g. `ffmpeg -i IN -c copy OUT.mp4`"
        )
    pts = np.array(packets.pts_list, dtype=np.int64)  # [P] decode order
    key = np.array(packets.key, dtype=bool)  # [P] decode order
    # packets an edit list cuts away (is_discard) are decoded as references but never shown
    shown = np.flatnonzero(~np.array(packets.discard, dtype=bool))
    if not len(shown):
        raise DecodeError(f"{path}: the edit list hides every frame of the video stream")
    no_keyflags = not key[shown].any()
    if no_keyflags:  # the container does not flag keyframes: only the first packet is a safe start
        key[:] = False
        key[0] = True
    cc = stream.codec_context
    first = int(np.argmax(key))
    # a stream cut mid-GOP (a .ts segment, a dd'd file): what comes before its first keyframe in decode order
    # refers to pictures that are not in the file (FFmpeg's decoders drop it too): not frames of the video
    before = shown < first
    # frames shown before the first keyframe but decoded after it (an open GOP's leading frames, as a cut
    # with `ffmpeg -ss -c copy` leaves): undecodable if they refer to the GOP before (FFmpeg drops them), not
    # if they refer to the keyframe only (closed GOP, HEVC RADL): only the decoder knows, so it is asked
    leading = (shown > first) & (pts[shown] < pts[first])
    # frames are reordered (B-frames) yet timestamps rise in decode order: they are decode times
    decode_times = bool(cc.has_b_frames) and len(pts) > 2 and bool(np.all(np.diff(pts) > 0))
    if leading.any() and not decode_times:
        made = _decoded_pts(cc, packets, first, int(shown[leading].max()))
        leading &= ~np.isin(pts[shown], list(made))
    cut = int(before.sum() + leading.sum())
    if cut:
        shown = shown[~(before | leading)]
        log.warning("%s: the stream starts with %d frame(s) that refer to pictures before it (cut mid-GOP?) and "
                    "cannot be decoded: the video starts at its first keyframe", path, cut)
        if not len(shown):
            raise DecodeError(f"{path}: no frame of the video stream is decodable (none from its first keyframe on)")
    order = shown[np.argsort(pts[shown], kind="stable")]  # [N] display index -> packet position
    sorted_pts = pts[order]
    if (sorted_pts[1:] == sorted_pts[:-1]).any():  # sorted: a duplicate is an equal neighbour (np.unique: 3x the cost)
        raise DecodeError(f"{path}: duplicate frame timestamps in the video stream; remux or re-encode it")
    tb = float(stream.time_base)
    times = (sorted_pts - sorted_pts[0]) * tb  # [N] seconds from the first shown frame
    last_duration = packets.kept[int(order[-1])].duration if packets.kept is not None \
        else packets.duration[int(order[-1])]
    step = last_duration or (np.median(np.diff(sorted_pts)) if len(order) > 1 else 1 / tb / 25)
    sar = stream.sample_aspect_ratio or cc.sample_aspect_ratio  # the container's wins, as in FFmpeg
    palette = cc.pix_fmt == "pal8"
    return StreamIndex(
        packets=packets,
        pts=pts,
        order=order.astype(np.int64),
        times=times,
        end=float(times[-1] + step * tb),
        keyframes=np.flatnonzero(key[order]).astype(np.int64),
        key_positions=np.flatnonzero(key).astype(np.int64)[: 1 if palette else None],
        width=cc.width,
        height=cc.height,
        sequential=decode_times,
        sar=Fraction(sar) if sar and sar > 0 else None,
        stream_index=stream.index,
        time_base=Fraction(stream.time_base),
        no_keyflags=no_keyflags,
        cut=cut,
        palette=palette,
    )


def _check_numbered(packets: PacketSource, path: str) -> None:
    """Frames missing from a stream whose packets are numbered one by one (NUMBERED_STREAMS) are damage."""
    if packets.numbers is None:
        return
    numbers = np.array(packets.numbers, dtype=np.int64)  # [R] every packet read, decode order
    gaps = np.flatnonzero(np.diff(numbers) != 1)
    if len(gaps):
        a, b = int(numbers[gaps[0]]) + 1, int(numbers[gaps[0] + 1]) - 1
        missing = f"frame {a} is" if a == b else f"frames {a} to {b} are"
        raise DecodeError(f"{path}: damaged file: {missing} missing from its {packets.stream.codec_context.name} stream "
                          f"({len(gaps)} gap(s): the demuxer skipped data it could not read, such as "
                          "an Ogg page that failed its CRC check); re-download it")


def _decoded_pts(cc: av.video.codeccontext.VideoCodecContext, packets: PacketSource, start: int, stop: int) -> set[int]:
    """Timestamps of the intact frames the decoder makes of packets start..stop (start: a keyframe), up to
    the first packet it fails on (a leading frame that refers to a picture before the stream's start)."""
    made: set[int] = set()
    try:
        for frame in _feed(cc, packets.run(start, stop), set(), skip="DEFAULT"):
            if not frame.is_corrupt:
                made.add(frame.pts)
    except (av.FFmpegError, _DamagedPacket) as e:
        log.info("%s: decoding the first keyframe's group failed after %d frame(s) (%s)", packets.path, len(made), e)
    return made


def _settle_sar(index: StreamIndex, cc: av.video.codeccontext.VideoCodecContext) -> None:
    """Where neither the container nor the (short) probe gave the sample aspect ratio, take the one our
    decoder read from the bitstream (H.264 VUI); call once `cc` has decoded a frame. None there = square."""
    if index.sar is None:
        sar = cc.sample_aspect_ratio
        index.sar = Fraction(sar) if sar and sar > 0 else Fraction(1)


def _display_size(index: StreamIndex, rotation: int) -> tuple[int, int]:
    """(width, height) of the picture as shown: pixels stretched by the sample aspect ratio, turned upright."""
    return _shown_size(index.width, index.height, index.sar, rotation)


def _shown_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    shown = max(1, round(width * sar))
    return (height, shown) if rotation in (90, 270) else (shown, height)


def _output_size(width: int, height: int, cfg: SamplingConfig) -> tuple[int, int]:
    """(width, height) of an output frame shown upright as width x height, by the short/max side policy."""
    scale = 1.0
    if cfg.short_side:
        scale = cfg.short_side / min(width, height)
    if cfg.max_side and max(width, height) * scale > cfg.max_side:
        scale = cfg.max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_pyav(
    cc: av.video.codeccontext.VideoCodecContext, index: StreamIndex, targets: list[int], cfg: SamplingConfig, path: str
) -> tuple[dict[int, np.ndarray], int, str]:
    """The frames at display indices `targets` as RGB, their rotation, and how they were decoded."""
    if index.sequential:
        log.info("%s: timestamps are in decode order; decoding the whole stream in order", path)
        return *_decode_in_order(cc, index, targets, cfg, path, display_times=False), "sequential"
    if not index.no_keyflags:
        try:
            skip = "DEFAULT" if cc.codec.name in SKIP_FRAME_AT_OPEN else "NONREF"
            return *_decode_targets(cc, index, targets, cfg, path, _groups(index, targets), skip), "targets"
        except _DamagedPacket as e:
            raise _damage_error(path, index, e) from e
        except (av.FFmpegError, DecodeError) as e:
            # a codec that cannot start at a flagged keyframe (headers, wrong flags): a decode from the start can
            log.warning("%s: decoding from the keyframes failed (%s); decoding from the first packet", path, e)
    else:
        log.info("%s: no packet is flagged a keyframe; decoding from the first packet", path)
    return *_decode_in_order(cc, index, targets, cfg, path, display_times=True), "sequential"


def _decode_targets(
    cc: av.video.codeccontext.VideoCodecContext,
    index: StreamIndex,
    targets: list[int],
    cfg: SamplingConfig,
    path: str,
    groups: list[tuple[int, int, list[int]]],
    skip: str,
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames at display indices `targets`, one decoder pass per (first packet, last packet,
    targets) group; non-targets are decoded with `skip_frame = skip`. Frames are matched by timestamp
    (every decoder hands a frame the timestamp of the packet it came from; the one that did not, MPEG-4
    with packed B-frames, is unpacked first: _Mpeg4Frames).

    Returns the RGB frames by index and the display rotation (degrees counter-clockwise) they carried.
    """
    out: dict[int, np.ndarray] = {}
    rotation = 0
    for start, stop, wanted in groups:
        pts_wanted = {int(index.pts[index.order[i]]): i for i in wanted}
        # once a group has decoded from its keyframe, the codec can start at keyframes: a later one that fails
        # is damaged, not a reason to decode the stream from its first packet
        for frame in _feed(cc, index.packets.run(start, stop), set(pts_wanted), skip, started=bool(out)):
            i = pts_wanted.get(frame.pts)
            if i is not None:
                _check_intact(frame, i, path)
                rotation = _rotation(frame)
                _settle_sar(index, cc)
                out[i] = _to_rgb(frame, rotation, index, cfg)
        missing = [i for i in wanted if i not in out]
        if missing:
            raise DecodeError(
                f"{path}: frame(s) {missing} (of {len(index.times)}) did not decode; the stream is corrupt there"
            )
    return out, rotation


def _decode_in_order(
    cc, index: StreamIndex, targets: list[int], cfg: SamplingConfig, path: str, display_times: bool
) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame from the first keyframe; the i-th frame out is frame i, and that is checked, so
    that a frame the decoder drops (or one it makes that the container does not list) is an error, not
    every later frame returned one off:
    display_times: the timestamps give the display order: frame i out must carry frame i's, and decoding
    stops after the last target. Otherwise (decode times: AVI with B-frames) they cannot number the frames,
    so the whole stream is decoded and must give one frame per packet, each with its packet's timestamp.
    """
    wanted, out, rotation, seen = set(targets), {}, 0, []
    expected = index.pts[index.order]  # [N] timestamps of the frames in display order
    frames = _feed(cc, index.packets.run(int(index.key_positions[0]), len(index.packets) - 1), set(), skip="DEFAULT")
    try:
        for i, frame in enumerate(frames):
            if display_times and (i >= len(expected) or frame.pts != expected[i]):
                got = "more frames than the container lists" if i >= len(expected) else \
                    f"frame {i} came out with timestamp {frame.pts} where the container lists {int(expected[i])}"
                raise DecodeError(f"{path}: decoding from the first packet, {got}: the decoder drops or adds frames, so "
                                  f"which frame is which is unknown; re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)")
            seen.append(frame.pts)
            if i in wanted:
                _check_intact(frame, i, path)
                rotation = _rotation(frame)
                _settle_sar(index, cc)
                out[i] = _to_rgb(frame, rotation, index, cfg)
                if display_times and len(out) == len(wanted):
                    break  # frames 0..i are checked: nothing after the last target is needed
    except _DamagedPacket as e:
        raise _damage_error(path, index, e) from e
    except av.FFmpegError as e:
        if seen:  # draining the decoder at the end
            raise _damage_error(path, index, _DamagedPacket(None, f"{type(e).__name__}: {e}")) from e
        raise DecodeError(f"{path}: no frame decodes from the start of the stream ({type(e).__name__}: {e}); it may be "
                          "cut from a longer stream without its headers: cut it again from the original at a keyframe "
                          "(`ffmpeg -ss T -i ORIGINAL -c copy OUT`) or re-encode it") from e
    finally:
        frames.close()
    if not display_times and (None in seen or sorted(seen) != sorted(expected.tolist())):
        raise DecodeError(f"{path}: the decoder gave {len(seen)} frames where the container lists {len(expected)} "
                          "packets (or other timestamps), so which frame is which is unknown (timestamps are decode "
                          "times here); re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)")
    missing = sorted(wanted - set(out))
    if missing:
        raise DecodeError(f"{path}: frame(s) {missing} (of {len(index.times)}) did not decode; the stream is corrupt there")
    return out, rotation


def _probe_rotation(cc: av.video.codeccontext.VideoCodecContext, index: StreamIndex, path: str) -> int:
    """The display rotation, read from the first frame PyAV decodes (for the other backends); settles the
    sample aspect ratio too."""
    frames = _feed(cc, index.packets.run(int(index.key_positions[0]), len(index.packets) - 1), set(), skip="DEFAULT")
    try:
        for frame in frames:
            _settle_sar(index, cc)
            return _rotation(frame)
    except _DamagedPacket as e:
        raise _damage_error(path, index, e) from e
    finally:
        frames.close()
    raise DecodeError(f"{path}: no frame of the video stream decodes")


def _groups(index: StreamIndex, targets: list[int]) -> list[tuple[int, int, list[int]]]:
    """(first packet, last packet, targets) per run of packets that one decoder pass must feed.

    The first packet is the keyframe before the target in decode order whose time is not after the
    target's (an open-GOP leading frame needs the keyframe before that).
    """
    key_pos = index.key_positions  # [nK] (never empty: _index flags the first packet if nothing is)
    pos = index.order[targets]  # [n] packet position of each target
    ok = (key_pos <= pos[:, None]) & (index.pts[key_pos] <= index.pts[pos][:, None])  # [n, nK]
    last = len(key_pos) - 1 - ok[:, ::-1].argmax(axis=1)  # [n] the last usable keyframe of each target
    starts = np.where(ok.any(axis=1), key_pos[last], 0).tolist()  # [n]
    runs: dict[int, list[int]] = {}
    for start, i in zip(starts, targets):
        runs.setdefault(start, []).append(i)
    return [(s, int(index.order[w].max()), w) for s, w in sorted(runs.items())]


class _DamagedPacket(DecodeError):
    """A packet of the run holds damaged data: the demuxer flags it corrupt, or the decoder failed on it
    after the first packet of its run (it had started; a run that fails at its first packet may start at a
    keyframe the codec cannot start at)."""

    def __init__(self, pts: int | None, why: str) -> None:
        super().__init__(why)
        self.pts = pts


def _damage_error(path: str, index: StreamIndex, e: _DamagedPacket) -> DecodeError:
    where = f"at {float((e.pts - index.pts[index.order[0]]) * index.time_base):.3f} s" if e.pts is not None \
        else "at its end"
    return DecodeError(f"{path}: corrupt data in the video stream {where} ({e}); frames decoded from there to the next "
                       "keyframe would be built on damaged data: re-download or re-encode it")


def _check_runs(index: StreamIndex, targets: list[int], path: str) -> None:
    """The runs of packets that another backend decodes for the targets (those of _groups: it refuses streams
    without usable keyframes) must not hold a packet the demuxer flags corrupt, as pyav's _feed checks."""
    corrupt = index.packets.corrupt  # [C]
    for start, stop, _ in _groups(index, targets) if len(corrupt) else ():
        hit = corrupt[(corrupt >= start) & (corrupt <= stop)]
        if len(hit):
            raise _damage_error(path, index, _DamagedPacket(int(index.pts[hit[0]]), CORRUPT_PACKET))


def _feed(cc, packets, target_pts: set[int], skip: str = "NONREF", started: bool = False):
    """Decode `packets` from a clean decoder state; non-reference non-targets are skipped.
    started: the codec is known to start at keyframes, so a failure at the first packet is damage too."""
    cc.flush_buffers()
    try:
        for n, packet in enumerate(packets):
            if packet.is_corrupt:  # the demuxer met damaged container data (lost TS packets, a cut-off tag)
                raise _DamagedPacket(packet.pts, CORRUPT_PACKET)
            # skip_frame is read per packet: the target itself must be decoded in full
            cc.skip_frame = "DEFAULT" if packet.pts in target_pts else skip
            try:
                frames = cc.decode(packet)
            except av.FFmpegError as e:
                if n or started:
                    raise _DamagedPacket(packet.pts, f"{type(e).__name__}: {e}") from e
                raise
            yield from frames
        cc.skip_frame = "DEFAULT"
        yield from cc.decode(None)  # drain the frames the decoder holds back for reordering
    finally:
        cc.skip_frame = "DEFAULT"
        cc.flush_buffers()


def _check_intact(frame: av.VideoFrame, index: int, path: str) -> None:
    """A frame the decoder concealed errors in is not the frame the video holds: never pass it on."""
    if frame.is_corrupt:
        raise DecodeError(f"{path}: frame {index} decoded with errors (corrupt data); re-download or re-encode it")


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a frame (its display matrix), as 0, 90, 180 or 270."""
    return (int(round(frame.rotation / 90.0)) % 4) * 90 if frame.rotation else 0


def _to_rgb(frame: av.VideoFrame, rotation: int, index: StreamIndex, cfg: SamplingConfig) -> np.ndarray:
    """Scale (sample aspect ratio, then the resize policy) and convert to RGB in one swscale pass, then
    turn upright."""
    w, h = _scaled_size(index.width, index.height, index.sar, rotation, cfg.short_side, cfg.max_side)
    rgb = frame_to_rgb(frame, (w, h), cfg.threads)
    # the display matrix angle is counter-clockwise (checked against ffmpeg's autorotate)
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90)) if rotation else rgb  # [H, W, 3]


def frame_to_rgb(frame: av.VideoFrame, size: tuple[int, int], threads: int) -> np.ndarray:
    """[h, w, 3] uint8 for size (w, h): the frame as FFmpeg's scale filter makes it, which is what the ffmpeg
    CLI (`-f rawvideo -pix_fmt rgb24`, `-vf scale=w:h:flags=area`), torchcodec and decord give.

    PyAV's VideoReformatter (swscale called without the scale filter's flags and chroma positions) gives
    other pixels on 10-bit 4:2:0, yuv410p/411p/440p, nv12, interlaced 4:2:0 and odd-sized 4:2:0 / 4:2:2
    frames at the native size (up to 255 per channel) and on every scaled frame, so those go through a `scale,format=rgb24` filter
    graph; the reformatter stays where it gives the same bytes (the common case: 32 against 41 us of CPU
    for a 176x144 frame; tests/test_extractors_pixels.py checks each format against the CLI).
    """
    if (size == (frame.width, frame.height) and frame.format.name in REFORMAT_EXACT and not frame.interlaced_frame
            and not (frame.width | frame.height) & 1):
        if not hasattr(_local, "reformatter"):
            # one reformatter per thread keeps its swscale context between frames (0.7 -> 0.14 ms at 176x144);
            # threads as the decoder's: swscale's default (one per core) costs more CPU for the same pixels
            _local.reformatter = VideoReformatter()
        return _local.reformatter.reformat(frame, format="rgb24", threads=threads).to_ndarray()
    graph = _rgb_graph(frame, size, threads)
    graph.vpush(frame)
    return graph.vpull().to_ndarray()


# Formats the VideoReformatter turns into the scale filter's RGB bitwise at the native size when the frame
# is progressive and its width and height are even (odd 4:2:0 / 4:2:2 frames differ by up to 49): tested
# per format against the ffmpeg CLI
REFORMAT_EXACT = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "rgb24"})
GRAPH_CACHE = 16  # filter graphs kept per thread (one per input format, size and colour tags)


def _rgb_graph(frame: av.VideoFrame, size: tuple[int, int], threads: int) -> av.filter.Graph:
    """A configured buffer -> scale -> format=rgb24 -> buffersink graph for frames like `frame`, kept per
    thread and per input (a graph holds state and is not thread-safe; building one costs 0.18 ms)."""
    fmt = frame.format
    key = (fmt.name, frame.width, frame.height, int(frame.colorspace), int(frame.color_range), size, threads)
    graphs = _local.__dict__.setdefault("graphs", {})
    graph = graphs.get(key)
    if graph is None:
        if len(graphs) >= GRAPH_CACHE:
            graphs.clear()
        graph = av.filter.Graph()
        graph.threads = threads
        args = {"video_size": f"{frame.width}x{frame.height}", "pix_fmt": fmt.name, "time_base": "1/90000",
                "pixel_aspect": "1/1", "colorspace": str(int(frame.colorspace)), "range": str(int(frame.color_range))}
        scale = "" if size == (frame.width, frame.height) else f"{size[0]}:{size[1]}:flags=area"
        # when only the width is scaled (an anamorphic stretch), FFmpeg 5.1 (the ffmpeg CLI here, torchcodec's
        # libraries) puts 4:2:0 chroma half a luma line from where PyAV's FFmpeg 8 does: this matches 5.1 but
        # for the last row (a pairing of versions: tests/test_extractors_pixels.py fails if it changes;
        # stretched yuv410p has no such setting and stays off, mean |diff| 2.8)
        if scale and size[1] == frame.height and fmt.chroma_height(2) == 1 and fmt.chroma_height(4) == 2:
            scale += ":in_v_chr_pos=256"
        nodes = [graph.add("buffer", **args), graph.add("scale", scale or None), graph.add("format", "rgb24"),
                 graph.add("buffersink")]
        graph.link_nodes(*nodes)
        graph.configure()
        graphs[key] = graph
    return graph


@functools.lru_cache(maxsize=64)
def _scaled_size(width: int, height: int, sar: Fraction, rotation: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) to scale a coded width x height frame to, before it is turned upright (cached once
    per clip size: Fraction arithmetic on every frame shows on small frames)."""
    w, h = _output_size(*_shown_size(width, height, sar, rotation), SamplingConfig(short_side=short_side, max_side=max_side))
    return (h, w) if rotation in (90, 270) else (w, h)  # upright -> coded orientation


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int], threads: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] for size (w, h), with the scale filter the PyAV path uses (AREA); from
    RGB, where the PyAV path scales from YUV, so resized frames differ a little (docs/extractors.md)."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return frame_to_rgb(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"), size, threads)


def _assemble(
    plan: Plan, size: tuple[int, int], rgb: dict[int, np.ndarray], index: StreamIndex, flags: tuple[str, ...]
) -> Clip:
    """size: (width, height) of the source as shown (after sample aspect ratio and rotation)."""
    shape = next(iter(rgb.values())).shape
    frames = [rgb[int(i)] if i >= 0 else np.zeros(shape, dtype=np.uint8) for i in plan.indices]
    times = np.where(plan.indices >= 0, index.times[np.maximum(plan.indices, 0)], plan.times)
    width, height = size
    return Clip(
        frames=frames,
        times=times.astype(np.float32),
        indices=plan.indices.astype(np.int64),
        valid=plan.valid,
        width=width,
        height=height,
        flags=flags,
    )


def video_info(path: str) -> dict:
    """Frame count, duration and size of a video from its demuxed packets (no decoding, except the first
    frame where only the bitstream gives the sample aspect ratio)."""
    try:
        with _open(str(path)) as container:
            stream = _video_stream(container, str(path))
            stream.codec_context.thread_count = 1
            index = _index(container, stream, str(path), 0, file_size(str(path)), functools.partial(_reopen, str(path)))
            if index.sar is None:  # only the bitstream says: decode its first frame
                _probe_rotation(stream.codec_context, index, str(path))
    except (av.FFmpegError, OSError) as e:
        raise DecodeError(f"{path}: {type(e).__name__}: {e}; {_fix_for(e)}") from e
    return {"frames": len(index.times), "duration": index.end, "width": index.width, "height": index.height,
            "keyframes": 0 if index.no_keyflags else len(index.keyframes), "sar": str(index.sar),
            "bytes": os.path.getsize(path)}


class DecoderBug(RuntimeError):
    """An exception in the decoder process that is no decoder error (PyAV, torchcodec and decord errors
    become DecodeError): a bug of ours, which must stop the job, not be recorded as a bad video. The
    message holds the child's traceback (its exception object may not pickle)."""


class KillableDecoder:
    """decode_clip in a long-lived child process that is killed (and restarted on next use) on timeout.

    decord and FFmpeg can hang inside C code holding the GIL, so a thread cannot be interrupted; a
    process can. The child is started with "spawn" (safe inside Ray workers and threaded parents) once,
    then reused, so the start-up cost is paid once per parent process, not per video.
    """

    def __init__(self) -> None:
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._lock = threading.Lock()

    def __call__(
        self, path: str, sampling: SamplingConfig, window: tuple[float, float] | None, timeout_s: float,
        span: tuple[int, int] | None = None,
    ) -> Clip:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        with self._lock:
            self._ensure_started()
            self._conn.send((str(path), sampling, window, span))
            if not self._conn.poll(timeout_s):
                self.close()
                raise DecodeError(f"{path}: decoding did not finish within {timeout_s:g} s; the decoder process was killed")
            try:
                status, payload = self._conn.recv()
            except (EOFError, OSError) as e:
                code = self._proc.exitcode if self._proc is not None else None
                self.close()
                raise DecodeError(f"{path}: the decoder process died (exit code {code}) while decoding") from e
        if status == "ok":
            return payload
        if status == "bug":
            raise DecoderBug(payload)
        raise payload

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self.close()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="vlpcache-decoder")
        self._proc.start()
        child.close()
        self._conn = parent

    def close(self) -> None:
        """Kill the child process (if any); the next call starts a fresh one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=10)
            self._proc = None


def _serve(conn) -> None:
    """Child loop: decode requests until the parent closes the pipe."""
    while True:
        try:
            path, sampling, window, span = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", decode_clip(path, sampling, window, span))
        except (DecodeError, BackendUnavailable) as e:
            reply = ("err", e)
        except Exception as e:  # noqa: BLE001 - decode_clip turns every decoder error into a DecodeError: this is ours
            reply = ("bug", f"{type(e).__name__}: {e} (while decoding {path}); traceback in the decoder process:\n"
                            f"{traceback.format_exc()}")
        conn.send(reply)


_KILLABLE = KillableDecoder()
atexit.register(_KILLABLE.close)


def decode_clip_killable(
    path: str, sampling: SamplingConfig, window: tuple[float, float] | None, timeout_s: float,
    span: tuple[int, int] | None = None,
) -> Clip:
    """decode_clip in a child process that is killed when it takes longer than timeout_s (DecodeError)."""
    return _KILLABLE(path, sampling, window, timeout_s, span)
