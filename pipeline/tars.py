"""video2dataset's default output read in place: webdataset tar shards `NNNNN.tar` holding `KEY.mp4`,
`KEY.txt` (caption) and `KEY.json` (metadata), next to `NNNNN.parquet` / `_stats.json` (not needed).

Read with the standard library's `tarfile`, not the webdataset package: the index pass needs each
member's byte offset and size so that the decoder can later open the video in place (a byte range of
the tar, extractors.decode's `span`), and `tarfile` gives them while seeking past the video bytes
without reading them; webdataset streams every member's bytes and keeps no offsets. Samples are
grouped as webdataset groups them: consecutive members with the same key (the name up to the first dot
of its base name).

Bad input: a member whose bytes run past the end of the tar (a truncated download) makes its video a
per-video failure; a tar that is not a tar, or whose member headers stop being readable before its end
(cut inside a header, corrupt), is a job error naming the tar and the byte; a sample with no KEY.mp4 or
no caption is a per-video failure; a key seen twice is a duplicate id (a job error).
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.manifest import Cursor, ManifestError, ManifestRow, video2dataset_row

log = logging.getLogger(__name__)

VIDEO_EXT = "mp4"  # video2dataset's default encode format, as the `files` layout reader expects
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = name up to the first dot of the base name


def is_tar_input(source: str | os.PathLike | list) -> bool:
    """A list of tars, a .tar file, a glob ending in .tar, or a folder holding NNNNN.tar and no NNNNN/ folders."""
    if isinstance(source, list):
        return True
    if str(source).endswith(".tar"):  # one tar, or a glob of tars such as 'out/*.tar'
        return True
    folder = Path(source)
    return folder.is_dir() and any(p.suffix == ".tar" for p in folder.iterdir()) and \
        not any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def tar_paths(source: str | os.PathLike | list) -> list[Path]:
    """The tars of a tar input, in order (sorted for a folder or a glob, as given for a list)."""
    if isinstance(source, list):
        paths = [Path(p) for p in source]
    elif glob.has_magic(Path(source).name):
        paths = sorted(Path(p) for p in glob.glob(str(source)))
    elif Path(source).is_dir():
        paths = sorted(p for p in Path(source).iterdir() if p.suffix == ".tar" and p.is_file())
    else:
        paths = [Path(source)]
    if not paths:
        raise ManifestError(f"{source} names no .tar shards: pass a video2dataset output folder, a .tar, or a glob like 'out/*.tar'")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ManifestError(f"tar shard(s) {missing[:5]} do not exist: fix the input list")
    return paths


@dataclass
class _Sample:
    key: str
    offset: int  # byte offset of its first member's header: where a resumed read starts
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # extension -> member


class TarReader:
    """Rows of webdataset tar shards; cursor = (tar position, byte offset of the sample's first header)."""

    kind = "video2dataset"

    def __init__(self, tars: list[Path]) -> None:
        self.tars = tars

    def stream(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, ManifestRow]]:
        first_tar, offset = cursor or (0, 0)
        for t in range(first_tar, len(self.tars)):
            tar = self.tars[t]
            with open(tar, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                for sample in _samples(f, tar, offset if t == first_tar else 0, size):
                    yield (t, sample.offset), _sample_row(f, tar, size, sample)


def _samples(f: io.BufferedReader, tar: Path, offset: int, size: int) -> Iterator[_Sample]:
    """Consecutive members with one key make a sample; a repeated extension starts a new one (which
    then shows up as a duplicate id)."""
    f.seek(offset)
    try:
        archive = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        raise ManifestError(f"{tar} is not a readable tar file at byte {offset} ({e}): video2dataset tar shards are "
                            "plain (uncompressed) tars; re-download it or leave it out of the input") from e
    current: _Sample | None = None
    while True:
        try:
            info = archive.next()
        except tarfile.ReadError as e:
            if archive.offset <= size:  # not the "bytes run past the end" case, which the sample records
                raise ManifestError(f"{tar}: unreadable tar header at byte {archive.offset} ({e}); re-download it or "
                                    "leave it out of the input") from e
            info = None
        archive.members.clear()  # tarfile keeps every header it read; we need none of them later
        if info is None:
            break
        if not info.isfile():
            continue
        match = _KEY.match(info.name)
        if match is None:
            log.warning("%s: member %r has no KEY.EXT name; skipped", tar, info.name)
            continue
        key, ext = match.groups()
        if current is not None and (key != current.key or ext in current.members):
            yield current
            current = None
        if current is None:
            current = _Sample(key, info.offset)
        current.members[ext] = info
    if current is not None:
        yield current
    _check_end(f, tar, archive.offset, size)


def _check_end(f: io.BufferedReader, tar: Path, end: int, size: int) -> None:
    """tarfile stops quietly at a header it cannot read; only zero blocks may follow the last member."""
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise ManifestError(
            f"{tar}: unreadable tar header at byte {end} of {size}: the tar is cut or corrupt there and the "
            "samples after it cannot be listed; re-download it or leave it out of the input"
        )


def _member_text(f: io.BufferedReader, info: tarfile.TarInfo) -> str:
    f.seek(info.offset_data)
    # Universal newlines, as Path.read_text reads the same file in the `files` layout.
    return io.TextIOWrapper(io.BytesIO(f.read(info.size)), encoding="utf-8").read()


def _sample_row(f: io.BufferedReader, tar: Path, size: int, sample: _Sample) -> ManifestRow:
    key, members = sample.key, sample.members
    cut = [info for info in members.values() if info.offset_data + info.size > size]
    video = members.get(VIDEO_EXT)
    if cut:
        error = (f"{tar} is truncated: member {cut[0].name} needs bytes up to {cut[0].offset_data + cut[0].size}, "
                 f"the file has {size}; re-download the shard")
    elif video is None:
        error = f"{tar} has no {key}.{VIDEO_EXT} member (video2dataset wrote metadata but no video for key {key})"
    else:
        error = None
    intact = {ext: info for ext, info in members.items() if info not in cut}
    return video2dataset_row(
        key, tar.stem, str(tar),
        info_text=_member_text(f, intact["json"]) if "json" in intact else None,
        caption_text=_member_text(f, intact["txt"]) if "txt" in intact else None,
        json_name=f"{tar}:{key}.json", video_error=error,
        span=(video.offset_data, video.size) if video is not None else None,
    )
