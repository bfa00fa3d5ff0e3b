"""Whether a video file is whole, from its container's own framing, read before any frame is decoded: an
interrupted download is refused, not sampled as a shorter video from the frames that survived.

- declared sizes: Matroska/WebM (the EBML Segment's size), AVI (the chain of RIFF chunk sizes) and ASF
  (its File Properties Object) say in their first bytes how long the file is; in the first two, the
  elements (chunks) at their top level must chain from
  there to the end: where one should start, zero bytes (a download that reserved its space in advance
  and stopped) or other data (a damaged header, which FFmpeg resyncs past, dropping frames silently)
  is an error;
- framing at the end: MPEG-TS (fixed-size packets), MPEG-PS (PES packets that declare their length), Ogg
  (pages that declare theirs) and FLV (each tag followed by its size): a file that ends inside its last
  packet, page or tag was cut, and one that ends in 4 KB of zero bytes or more was reserved in advance by
  a download that stopped. A cut that falls exactly on a boundary cannot be seen here;
- mp4/mov: the index (moov box) lists every sample's bytes, so decode._check_complete sees a cut; a
  moov-last file cut before its index cannot open, and mp4_without_index says why.

A size left unknown by a muxer writing to a pipe (a live recording) claims nothing.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Callable

# enough of the end of a file to hold its last Ogg page (at most 65,307 bytes) or PES packet (65,541) whole
TAIL_BYTES = 1 << 17
# MPEG-TS packet sizes, with where the sync byte 0x47 sits in each: plain, M2TS (a 4-byte time code
# first: Blu-ray, AVCHD), and DVB with 16 Reed-Solomon bytes after each packet
TS_PACKETS = ((188, 0), (192, 4), (204, 0))
TS_SYNC = 0x47
ZERO_TAIL = 4096  # trailing zero bytes that mean space reserved by an unfinished download (no container pads so)
ZERO_SCAN = 64 << 20  # how far back the start of a zero tail is looked for
UNFINISHED = "an unfinished download whose space was reserved in advance?"
# the IDs of the elements at a Matroska Segment's top level (the set has not changed since Matroska v1):
# SeekHead, Info, Tracks, Cluster, Cues, Attachments, Chapters, Tags, SignatureSlot, Void, CRC-32
SEGMENT_CHILDREN = {0x114D9B74, 0x1549A966, 0x1654AE6B, 0x1F43B675, 0x1C53BB6B, 0x1941A469, 0x1043A770,
                    0x1254C367, 0x1B538667, 0xEC, 0xBF}
ASF_HEADER = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")  # the ASF Header Object's GUID, as stored
ASF_FILE_PROPERTIES = bytes.fromhex("a1dcab8c47a9cf118ee400c00c205365")
FLV_TAG_TYPES = {8, 9, 18}  # audio, video, script data (the low 5 bits of a tag's first byte)
FLV_TAG_HEAD = re.compile(rb"[\x08\x09\x12\x28\x29\x32].{6}\x00\x00\x00", re.S)  # a tag header could start here

Read = Callable[[int, int], bytes]  # (position from the video's first byte, length) -> bytes (fewer at the end)


def truncation(path: str, span: tuple[int, int] | None, fmt: str, head: bytes) -> str | None:
    """Why the video (the file at path, or the tar member at byte span (offset, size)) is truncated or
    damaged, with what to do; None if its container shows neither. fmt: FFmpeg's demuxer name; head: its
    first bytes."""
    offset, size = span or (0, file_size(path))
    if not size or not (fmt.startswith("matroska") or fmt in ("avi", "asf") or fmt in FRAMINGS):
        return None
    with open(path, "rb") as f:
        def read(pos: int, length: int) -> bytes:
            f.seek(offset + pos)
            return f.read(max(0, min(length, size - pos)))

        if fmt.startswith("matroska"):
            return _matroska(read, size, head)
        if fmt == "avi":
            return _avi(read, size)
        if fmt == "asf":
            return _asf(read, size)
        kind, check = FRAMINGS[fmt]
        zeros = _zero_tail(read, size)
        if zeros is not None:
            return f"{kind} file ending in zero bytes from byte {zeros} on ({UNFINISHED}); re-download it"
        cut = check(read, size)
    if cut is None:
        return None
    return (f"truncated {kind} file: it ends inside {cut}; re-download it (or, to keep the part that is there as "
            "a shorter video, remux it: `ffmpeg -i IN -c copy OUT.mkv`)")


def _zero_tail(read: Read, size: int) -> int | None:
    """Where the run of zero bytes the file ends in starts, if it is ZERO_TAIL bytes or longer (looked for
    up to ZERO_SCAN bytes back: the start given is then at most that far back)."""
    if size < ZERO_TAIL or read(size - ZERO_TAIL, ZERO_TAIL).strip(b"\0"):
        return None
    end, floor = size - ZERO_TAIL, max(0, size - ZERO_SCAN)
    while end > floor:
        start = max(floor, end - (1 << 20))
        kept = read(start, end - start).rstrip(b"\0")
        if kept:
            return start + len(kept)
        end = start
    return end


def _describe(data: bytes) -> str:
    return f"zero bytes ({UNFINISHED})" if not data.strip(b"\0") else f"other data ({data[:8].hex()}: a damaged header)"


def _matroska(read: Read, size: int, head: bytes) -> str | None:
    """The Segment's declared size, then its top-level elements (SeekHead, Info, Tracks, Clusters, Cues,
    ...: an ID and a size each) walked from its start to its end; a size left unknown (live) ends the walk."""
    start, declared = _ebml_segment(head)
    if start is None:
        return None
    if declared is not None and start + declared > size:
        return f"truncated Matroska/WebM file: {size} bytes, but its header declares {start + declared}; re-download it"
    end, pos = start + declared if declared is not None else size, start
    while pos < end:
        header = read(pos, 12)
        try:
            element, at = _ebml_vint(header, 0, is_id=True)
            if element not in SEGMENT_CHILDREN:
                raise ValueError
            length, at = _ebml_vint(header, at)
        except (ValueError, IndexError):
            return (f"damaged Matroska/WebM file: at byte {pos}, where an element should start, it holds "
                    f"{_describe(header)}; re-download it")
        if length is None:
            return None
        if pos + at + length > end:
            return (f"{'damaged' if declared is not None else 'truncated or damaged'} Matroska/WebM file: the "
                    f"element at byte {pos} ends at byte {pos + at + length}, past the end of its "
                    f"{'Segment' if declared is not None else 'file'} ({end}); re-download it")
        pos += at + length
    return None


def _asf(read: Read, size: int) -> str | None:
    """ASF (WMV, WMA): the File Properties Object in the header says how long the file is, unless the
    broadcast flag says the size was not known when it was written."""
    header = read(0, 30)
    if header[:16] != ASF_HEADER or len(header) < 30:
        return None
    pos, end = 30, min(size, int.from_bytes(header[16:24], "little"))
    while pos + 24 <= end:
        obj = read(pos, 92)
        length = int.from_bytes(obj[16:24], "little")
        if obj[:16] == ASF_FILE_PROPERTIES and len(obj) >= 92:
            declared, broadcast = int.from_bytes(obj[40:48], "little"), obj[88] & 1
            if not broadcast and declared > size:
                return f"truncated ASF/WMV file: {size} bytes, but its header declares {declared}; re-download it"
            return None
        if length < 24:
            return None
        pos += length
    return None


def _avi(read: Read, size: int) -> str | None:
    """The chain of RIFF chunks (RIFF AVI, then OpenDML RIFF AVIX), and the chunks inside each (LIST hdrl,
    LIST movi, idx1, JUNK: a FOURCC and a size each); a RIFF size left unknown (0 or all ones) ends it."""
    pos = 0
    while pos + 12 <= size:
        head = read(pos, 12)
        length = int.from_bytes(head[4:8], "little")
        if head[:4] != b"RIFF" or head[8:11] != b"AVI" or length in (0, 0xFFFFFFFF):  # unknown: not finalised
            break
        end, inner = pos + 8 + length + (length & 1), pos + 12  # the RIFF's end; its first chunk
        if end > size:
            return f"truncated AVI file: {size} bytes, but its header declares {end}; re-download it"
        while inner + 8 <= end:
            chunk = read(inner, 8)
            if not all(32 <= c < 127 for c in chunk[:4]):
                return (f"damaged AVI file: at byte {inner}, where a chunk should start, it holds "
                        f"{_describe(chunk)}; re-download it")
            length = int.from_bytes(chunk[4:8], "little")
            inner += 8 + length + (length & 1)
        pos = end
    return None


def file_size(path: str) -> int | None:
    """Bytes of a regular file; None for anything else (a fifo, a device)."""
    st = os.stat(path)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _ts_cut(read: Read, size: int) -> str | None:
    """MPEG-TS: fixed-size packets, each with the sync byte at one place: the last ones must line up with
    the end. A cut one shows packets lined up to a few bytes before the end."""
    need = 9 * 204
    tail = read(max(0, size - need), need)
    n = len(tail)
    for packet, sync in TS_PACKETS:
        if _synced(tail, n, packet, sync):
            return None
    for packet, sync in TS_PACKETS:
        for rest in range(1, packet):  # bytes of a last, partial packet
            if _synced(tail, n - rest, packet, sync) and (rest <= sync or tail[n - rest + sync] == TS_SYNC):
                return f"a {packet}-byte packet ({rest} of its bytes are there)"
    return None  # no packets line up: not ours to judge (FFmpeg reads what it can)


def _synced(tail: bytes, end: int, packet: int, sync: int, count: int = 8) -> bool:
    """Whether `count` packets (fewer if the file is shorter) end exactly at tail[end]."""
    starts = [end - k * packet for k in range(1, count + 1) if end - k * packet >= 0]
    return len(starts) >= min(count, 2) and all(tail[s + sync] == TS_SYNC for s in starts)


def _ps_cut(read: Read, size: int) -> str | None:
    """MPEG-PS: from a pack header, each PES packet declares its length: a walk from the last pack header
    must end at the end of the file (or at the end code). A start code that only looks like one (inside a
    payload) breaks the walk, and the pack header before it is tried (up to 8)."""
    short = _chain_overrun(read, size, lambda tail: [*_find_all(tail, b"\x00\x00\x01\xba")][::-1][:8], _ps_walk)
    return f"a PES packet (it needs {short} more bytes)" if short else None


def _chain_overrun(read: Read, size: int, starts, walk) -> int | None:
    """Bytes past the end of the file that the chain of units (pages, packets) in the file's last TAIL_BYTES
    needs, from the first of `starts(tail)` that `walk` can chain from; None if it ends at the end or no
    start chains. walk(tail, pos): where the chain from pos ends, None if it breaks."""
    tail = read(max(0, size - TAIL_BYTES), TAIL_BYTES)
    for start in starts(tail):
        end = walk(tail, start)
        if end is not None:
            return end - len(tail) if end > len(tail) else None
    return None


def _ps_walk(tail: bytes, pos: int) -> int | None:
    """Where the chain of packs and PES packets from pos ends (past len(tail): cut); None: no chain."""
    n = len(tail)
    while pos < n:
        if pos + 4 > n:
            return pos + 4 if b"\x00\x00\x01".startswith(tail[pos:]) else None
        if tail[pos:pos + 3] != b"\x00\x00\x01":
            return None
        code = tail[pos + 3]
        if code == 0xB9:  # program end code
            return n
        if code == 0xBA:  # pack header: MPEG-2 (14 bytes + stuffing) or MPEG-1 (12 bytes)
            if pos + 14 > n:
                return pos + 14
            mpeg2 = tail[pos + 4] >> 6 == 1
            pos += 14 + (tail[pos + 13] & 7) if mpeg2 else 12
        elif code >= 0xBB:  # system header or PES packet: 16-bit length
            if pos + 6 > n:
                return pos + 6
            pos += 6 + int.from_bytes(tail[pos + 4:pos + 6], "big")
        else:
            return None
    return pos


def _ogg_cut(read: Read, size: int) -> str | None:
    """Ogg: each page declares its length (header, segment table, the segments' sizes): the pages from
    the first capture pattern in the tail must chain to the end of the file."""
    short = _chain_overrun(read, size, lambda tail: _find_all(tail, b"OggS"), _ogg_walk)
    return f"an Ogg page (it needs {short} more bytes)" if short else None


def _ogg_walk(tail: bytes, pos: int) -> int | None:
    n = len(tail)
    while pos < n:
        if tail[pos:pos + 4] != b"OggS"[:n - pos]:
            return None
        if pos + 27 > n or pos + 27 + tail[pos + 26] > n:
            return pos + 27 + (tail[pos + 26] if pos + 27 <= n else 0)
        segments = tail[pos + 27:pos + 27 + tail[pos + 26]]
        pos += 27 + len(segments) + sum(segments)
    return pos


def _flv_cut(read: Read, size: int) -> str | None:
    """FLV: every tag is followed by its size (PreviousTagSize). A whole file ends with the size of a whole
    last tag; a cut one ends inside a tag that a chain of whole tags before it leads to (found in the last
    128 KB, or 2 MB for a big last tag). Bytes that chain to nothing (trailing junk) claim nothing."""
    if size < 13 + 4:
        return None
    last = int.from_bytes(read(size - 4, 4), "big")
    if 11 <= last <= size - 17 and _flv_tag_size(read(size - 4 - last, 11)) == last:
        return None
    for window in (TAIL_BYTES, 16 * TAIL_BYTES):
        base = max(13, size - window)
        end = _flv_chain_end(read(base, size - base))
        if end is not None:
            return f"its last tag (it needs {end - (size - base)} more bytes)" if end > size - base else None
    return None


def _flv_tag_size(header: bytes) -> int | None:
    """Bytes of the FLV tag whose 11-byte header this is (type, 24-bit data size, timestamp, stream id 0)."""
    if len(header) < 11 or header[0] & 0x1F not in FLV_TAG_TYPES or header[8:11] != b"\0\0\0":
        return None
    return 11 + int.from_bytes(header[1:4], "big")


def _flv_chain_end(tail: bytes, verified: int = 2) -> int | None:
    """Where the tags chained from the first place in `tail` that starts at least `verified` whole tags
    (each followed by its own size) end: len(tail) if at the end, more if the last is cut; None: no chain."""
    n = len(tail)
    for match in FLV_TAG_HEAD.finditer(tail):
        pos, whole = match.start(), 0
        while pos < n:
            tag = _flv_tag_size(tail[pos:pos + 11])
            if tag is None and pos + 11 <= n:
                break
            end = pos + (tag or 11) + 4
            if end > n:
                return end if whole >= verified else None
            if int.from_bytes(tail[end - 4:end], "big") != tag:
                break
            pos, whole = end, whole + 1
        else:
            return pos if whole >= verified else None
    return None


def _find_all(data: bytes, pattern: bytes):
    at = data.find(pattern)
    while at >= 0:
        yield at
        at = data.find(pattern, at + 1)


# FFmpeg demuxer name -> (what to call the file, the check of its framing at the end)
FRAMINGS: dict[str, tuple[str, Callable[[Read, int], str | None]]] = {
    "mpegts": ("MPEG-TS", _ts_cut),
    "mpeg": ("MPEG-PS", _ps_cut),
    "ogg": ("Ogg", _ogg_cut),
    "flv": ("FLV", _flv_cut),
}


def _ebml_vint(data: bytes, pos: int, is_id: bool = False) -> tuple[int | None, int]:
    """An EBML variable-length integer at pos: (value, next pos); value None for a size of all ones (unknown)."""
    first = data[pos]
    length = 9 - first.bit_length() if first else 9
    if length > 8 or pos + length > len(data):
        raise ValueError("not an EBML number")
    value = int.from_bytes(data[pos:pos + length], "big")
    if not is_id:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            return None, pos + length
    return value, pos + length


def _ebml_segment(head: bytes) -> tuple[int | None, int | None]:
    """(where the Segment's data starts, its declared size: None if unknown) from a Matroska file's first
    bytes (EBML header, then Segment); (None, None) if they are not that."""
    try:
        ebml_id, pos = _ebml_vint(head, 0, is_id=True)
        ebml_size, pos = _ebml_vint(head, pos)
        if ebml_id != 0x1A45DFA3 or ebml_size is None:
            return None, None
        segment_id, pos = _ebml_vint(head, pos + ebml_size, is_id=True)
        segment_size, pos = _ebml_vint(head, pos)
    except (ValueError, IndexError):
        return None, None
    return (pos, segment_size) if segment_id == 0x18538067 else (None, None)


def mp4_without_index(path: str, span: tuple[int, int] | None) -> str | None:
    """Why an mp4/mov that FFmpeg cannot open has no index (no moov box), from its top-level boxes; None
    when it has one. A download or a recording that stopped early ends inside its mdat box, and a file
    written moov-last then has no index at all (FFmpeg says only "Invalid data found")."""
    offset, size = span or (0, os.path.getsize(path))
    pos, boxes = 0, []
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(offset + pos)
            head = f.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8].decode("latin-1")
            if length == 1 and len(head) == 16:  # a 64-bit size follows the type
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:  # the box runs to the end of the file
                length = size - pos
            if kind == "moov":
                return None
            if not head[:8].strip(b"\0"):
                return (f"an mp4 without an index (no moov box): it holds zero bytes from byte {pos} on, where a box "
                        f"should start ({UNFINISHED}); re-download it")
            if length < 8:
                return f"not a readable mp4: box {kind!r} at byte {pos} has size {length}; re-download or re-encode it"
            boxes.append(kind)
            if pos + length > size:
                return (f"truncated mp4: it ends inside its {kind!r} box ({size} bytes, the box needs "
                        f"{pos + length}) and has no index (moov box), which a moov-last file writes at its end; "
                        f"re-download it (a recording cut off this way needs a repair tool such as untrunc)")
            pos += length
    return f"an mp4 without an index (no moov box; its boxes: {', '.join(boxes)}); re-download or re-encode it"
