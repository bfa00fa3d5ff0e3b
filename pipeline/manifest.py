"""Manifest readers: generic CSV/JSONL, WebVid CSVs (both layouts), and video2dataset output (folders of
`NNNNN/` files or of `NNNNN.tar` webdataset shards, pipeline/tars.py).

Every reader streams the rows in a deterministic order (the manifest's order; for video2dataset output,
sorted by shard then key), because row i of the store is manifest row i and the shard plan is cut from
that order. A row that cannot be extracted (empty caption, an id that would escape the output folder as
a path, a malformed duration) keeps its place with `error` set: the pipeline records it as a failed
video in the shard ledger, so it is never lost silently. A manifest that cannot be read at all
(missing file, missing columns, duplicate ids) raises ManifestError.

Scale: `scan_manifest` reads the manifest once, streaming, and keeps only what the driver needs to cut
shards later: the row count, the fingerprint, and a cursor (a byte offset or a file position) every
`stride` rows. A shard's rows are read back from its cursor when its job is built, so the driver holds
one shard's rows at a time, whatever the manifest's size. Duplicate ids are found with one 8-byte hash
per row (80 MB at 10M rows, sorted in place), then confirmed by a second pass over the colliding ids only.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

GENERIC_COLUMNS = ("video_id", "path", "caption")
# WebVid-10M partitions: videoid,contentUrl,duration,page_dir,name;
# results_2M_*.csv: videoid,name,page_idx,page_dir,duration,contentUrl. Read by header, never by position.
WEBVID_COLUMNS = ("videoid", "name", "page_dir", "duration", "contentUrl")
DEFAULT_WEBVID_TEMPLATE = "{video_root}/{page_dir}/{videoid}.mp4"
FORMATS = ("auto", "generic", "webvid", "video2dataset")
_ALL_ROWS = 1 << 62  # a stride that keeps only the first row's cursor

_ISO_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$")

Cursor = tuple  # where a row starts, in its reader's terms (byte offset and row/line number, ...): small, picklable


class ManifestError(ValueError):
    """The manifest cannot be read at all; the message names the file and what to fix."""


@dataclass
class ManifestRow:
    video_id: str
    path: str  # absolute path of the video file (a tar member: the tar, with `span`)
    caption: str
    meta: dict[str, str] = field(default_factory=dict)  # extra columns, kept per video in the store
    error: str | None = None  # set when the row itself is unusable; recorded as a failed video
    span: tuple[int, int] | None = None  # (offset, size) of the video's bytes inside `path` (a tar member)

    @property
    def window(self) -> tuple[float, float] | None:
        """Optional (start, end) seconds from the `start`/`end` meta columns."""
        start, end = self.meta.get("start", ""), self.meta.get("end", "")
        if start == "" and end == "":
            return None
        return (float(start or 0.0), float(end) if end else float("inf"))


def _fingerprint_entry(row: ManifestRow) -> bytes:
    entry = [row.video_id, row.path, row.caption] + ([list(row.span)] if row.span else [])
    return json.dumps(entry).encode()


@dataclass
class Manifest:
    """Every row in memory: for small manifests, tests and tools; the driver uses a ManifestIndex."""

    rows: list[ManifestRow]
    source: str  # the manifest file or folder
    format: str  # generic | webvid | video2dataset

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """sha256 over (video_id, path, caption) of every row: a rerun on another manifest is refused."""
        h = hashlib.sha256()
        for row in self.rows:
            h.update(_fingerprint_entry(row))
        return h.hexdigest()


class RowReader(Protocol):
    """One manifest format: streams (cursor, row) from a cursor (None: the first row)."""

    kind: str

    def stream(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, ManifestRow]]: ...


@dataclass
class ManifestIndex:
    """What one streaming pass over a manifest keeps: count, fingerprint, a cursor every `stride` rows."""

    source: str
    format: str  # generic | webvid | video2dataset
    n_rows: int
    fingerprint: str  # the same sha256 as Manifest.fingerprint()
    n_unusable: int
    stride: int
    cursors: list[Cursor]  # cursors[k]: where row k*stride starts
    reader: RowReader

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, start: int, stop: int) -> list[ManifestRow]:
        """Rows [start, stop), read back from the nearest cursor at or before `start`."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) are outside the manifest's {self.n_rows} rows")
        if start == stop:
            return []
        skip = start % self.stride
        rows = _marked(self.reader.stream(self.cursors[start // self.stride]))
        return [row for _, row in itertools.islice(rows, skip, skip + stop - start)]

    def iter_rows(self) -> Iterator[ManifestRow]:
        return (row for _, row in _marked(self.reader.stream()))

    def video_ids(self) -> Iterator[str]:
        """Every id in manifest order, streamed (a CSV reads only its id column)."""
        fast = getattr(self.reader, "ids", None)
        return fast() if fast is not None else (row.video_id for row in self.iter_rows())


def iso8601_seconds(text: str) -> float:
    """'PT00H00M17S' -> 17.0; raises ValueError naming the value otherwise."""
    match = _ISO_DURATION.match(text.strip())
    if not match or not any(match.groups()):
        raise ValueError(f"duration {text!r} is not an ISO 8601 duration like 'PT00H00M17S'")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def unsafe_id_reason(video_id: str) -> str | None:
    """Why a video_id cannot name a file inside the output folder, or None when it can."""
    if not video_id:
        return "empty video_id"
    if "/" in video_id or "\\" in video_id or "\x00" in video_id:
        return f"video_id {video_id!r} contains a path separator or NUL and would escape the output folder as a path"
    if video_id in (".", "..") or video_id.startswith("."):
        return f"video_id {video_id!r} starts with '.' and would escape or hide in the output folder as a path"
    return None


def open_reader(
    source: str | os.PathLike | list,
    video_root: str | os.PathLike | None = None,
    fmt: str = "auto",
    path_template: str = DEFAULT_WEBVID_TEMPLATE,
) -> tuple[RowReader, str]:
    """The reader of a manifest file, video2dataset folder, tar, tar glob or list of tars (header and
    columns checked now), and the source's name. `video_root` resolves relative paths (default: the
    manifest's folder)."""
    from pipeline import tars

    if fmt not in FORMATS:
        raise ManifestError(f"manifest format {fmt!r} is not one of {FORMATS}")
    if tars.is_tar_input(source):
        if fmt not in ("auto", "video2dataset"):
            raise ManifestError(f"manifest {source} is webdataset tar shards, which only the video2dataset format reads (got {fmt!r})")
        paths = tars.tar_paths(source)
        return tars.TarReader(paths), str(source if not isinstance(source, list) else paths[0].parent)
    source = Path(source)
    if not source.exists():
        raise ManifestError(f"manifest {source} does not exist: pass an existing CSV/JSONL file, video2dataset folder or .tar shards")
    root = Path(video_root) if video_root else (source if source.is_dir() else source.parent)
    if source.is_dir():
        if fmt not in ("auto", "video2dataset"):
            raise ManifestError(f"manifest {source} is a folder, which only the video2dataset format reads (got {fmt!r})")
        return _FilesReader(source), str(source)
    if source.suffix.lower() in (".jsonl", ".json"):
        if fmt not in ("auto", "generic"):
            raise ManifestError(f"manifest {source} is JSONL, which only the generic format reads (got {fmt!r})")
        return _JsonlReader(source, root), str(source)
    return _CsvReader(source, root, fmt, path_template), str(source)


def scan_manifest(
    source: str | os.PathLike | list,
    video_root: str | os.PathLike | None = None,
    fmt: str = "auto",
    path_template: str = DEFAULT_WEBVID_TEMPLATE,
    stride: int = 1000,
) -> ManifestIndex:
    """One streaming pass: validates every row, fingerprints, checks ids are unique, and keeps a cursor
    every `stride` rows (use the shard size: each shard's rows are then read from one cursor)."""
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    reader, name = open_reader(source, video_root, fmt, path_template)
    h = hashlib.sha256()
    id_hashes = array("Q")  # 8 bytes per row: the duplicate check's only per-row memory
    cursors: list[Cursor] = []
    n_rows = n_unusable = 0
    for cursor, row in _marked(reader.stream()):
        if n_rows % stride == 0:
            cursors.append(cursor)
        h.update(_fingerprint_entry(row))
        id_hashes.append(_id_hash(row.video_id))
        n_unusable += row.error is not None
        n_rows += 1
    _check_unique(id_hashes, reader, name)
    log.info("manifest %s (%s): %d rows, %d unusable", name, reader.kind, n_rows, n_unusable)
    return ManifestIndex(name, reader.kind, n_rows, h.hexdigest(), n_unusable, stride, cursors, reader)


def read_manifest(
    source: str | os.PathLike | list,
    video_root: str | os.PathLike | None = None,
    fmt: str = "auto",
    path_template: str = DEFAULT_WEBVID_TEMPLATE,
) -> Manifest:
    """Every row of a manifest in memory (small manifests); validated as scan_manifest validates."""
    index = scan_manifest(source, video_root, fmt, path_template, stride=_ALL_ROWS)
    return Manifest(rows=list(index.iter_rows()), source=index.source, format=index.format)


def iter_manifest(
    source: str | os.PathLike | list,
    video_root: str | os.PathLike | None = None,
    fmt: str = "auto",
    path_template: str = DEFAULT_WEBVID_TEMPLATE,
) -> Iterator[ManifestRow]:
    """The rows, streamed, without the whole-manifest checks (unique ids): for looking rows up."""
    reader, _ = open_reader(source, video_root, fmt, path_template)
    return (row for _, row in _marked(reader.stream()))


def _id_hash(video_id: str) -> int:
    # Python's str hash is 64 bits and stable within a process, which is all one scan needs.
    return hash(video_id) & 0xFFFF_FFFF_FFFF_FFFF


def _check_unique(id_hashes: array, reader: RowReader, source: str) -> None:
    """Duplicate ids are a manifest error: the store is keyed by video_id, so a second row with an id
    cannot be recorded. Equal hashes are confirmed by a second pass over those ids only."""
    if len(id_hashes) < 2:
        return
    hashes = np.frombuffer(id_hashes, dtype=np.uint64)  # [N], a view
    hashes.sort()
    suspects = set(np.unique(hashes[1:][hashes[1:] == hashes[:-1]]).tolist())
    del hashes
    if not suspects:
        return
    first_row: dict[str, int] = {}
    duplicates, n_duplicates = [], 0
    for i, (_, row) in enumerate(reader.stream()):
        if _id_hash(row.video_id) not in suspects:
            continue
        if row.video_id in first_row:
            n_duplicates += 1
            if len(duplicates) < 5:
                duplicates.append(f"{row.video_id!r} (rows {first_row[row.video_id]} and {i})")
        first_row.setdefault(row.video_id, i)
    if n_duplicates:
        shown = ", ".join(duplicates) + (f" and {n_duplicates - 5} more" if n_duplicates > 5 else "")
        raise ManifestError(f"manifest {source} has duplicate video_id(s): {shown}; make the ids unique (drop or rename the repeats)")


def _marked(rows: Iterable[tuple[Cursor, ManifestRow]]) -> Iterator[tuple[Cursor, ManifestRow]]:
    """Empty captions and path-unsafe ids become per-video failures, in place."""
    for cursor, row in rows:
        if row.error is None:
            row.error = unsafe_id_reason(row.video_id)
        if row.error is None and not row.caption:
            row.error = f"empty caption for video_id {row.video_id!r}; give every row a caption"
        yield cursor, row


def _resolve(root: Path, path: str) -> str:
    """str(root / path), normalised as pathlib does (fingerprints of existing stores depend on it), with
    pathlib only for the odd paths: building a Path per row would dominate a 10M-row scan."""
    joined = os.path.join(str(root), path)
    if "//" in joined or "/./" in joined or joined.endswith(("/", "/.")) or joined.startswith("./") or joined == ".":
        return str(Path(joined))
    return joined


def _row(video_id: str, path: str, caption: str, meta: dict[str, str], error: str | None = None,
         span: tuple[int, int] | None = None) -> ManifestRow:
    return ManifestRow(video_id=video_id.strip(), path=path, caption=caption.strip(), meta=meta, error=error, span=span)


class _Lines:
    """A binary file's lines as text, counting the bytes handed out: the csv module reads a record's
    lines and no further, so `pos` after a record is where the next one starts. Lines end at LF, CRLF
    or a bare CR (old Mac / Excel "CSV (Macintosh)" exports), kept untranslated as csv wants them."""

    def __init__(self, f: Any, pos: int) -> None:
        self.text, self.pos = io.TextIOWrapper(f, encoding="utf-8", newline=""), pos

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.text.readline()
        if not line:
            raise StopIteration
        self.pos += len(line) if line.isascii() else len(line.encode("utf-8"))  # isascii: O(1) in CPython
        return line


class _CsvReader:
    """Generic or WebVid CSV; cursor = (byte offset, row index)."""

    def __init__(self, source: Path, root: Path, fmt: str, template: str) -> None:
        with open(source, "rb") as f:
            lines = _Lines(f, 0)
            header = csv.DictReader(lines).fieldnames or []
            self.data_start = lines.pos
        is_webvid = all(c in header for c in WEBVID_COLUMNS)
        kind = ("webvid" if is_webvid else "generic") if fmt == "auto" else fmt
        if kind == "video2dataset":
            raise ManifestError(f"manifest {source} is a file; the video2dataset format reads a folder or .tar shards")
        wanted = WEBVID_COLUMNS if kind == "webvid" else GENERIC_COLUMNS
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ManifestError(
                f"manifest {source} lacks column(s) {missing} (header: {header}); a generic manifest needs "
                f"{list(GENERIC_COLUMNS)}, a WebVid CSV needs {list(WEBVID_COLUMNS)}"
            )
        self.source, self.root, self.template, self.kind, self.header = source, root, template, kind, list(header)

    def stream(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, ManifestRow]]:
        offset, index = cursor or (self.data_start, 0)
        with open(self.source, "rb") as f:
            f.seek(offset)
            lines = _Lines(f, offset)
            records = csv.DictReader(lines, fieldnames=self.header)
            while True:
                at = lines.pos
                rec = next(records, None)
                if rec is None:
                    return
                if self.kind == "webvid":
                    yield (at, index), _webvid_row(rec, self.root, self.template, self.source, index)
                else:
                    yield (at, index), _generic_row(rec, self.root)
                index += 1


    def ids(self) -> Iterator[str]:
        """The id column alone, as the rows would give it: a fraction of a full row's cost."""
        column = self.header.index("videoid" if self.kind == "webvid" else "video_id")
        with open(self.source, "rb") as f:
            f.seek(self.data_start)
            for values in csv.reader(_Lines(f, self.data_start)):
                if values:  # DictReader skips blank lines too
                    yield (values[column] if column < len(values) else "").strip()


def _generic_row(rec: dict, root: Path) -> ManifestRow:
    # csv gives None for short rows; JSON may give numbers: every value becomes a string.
    values = {k: "" if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in rec.items() if k is not None}
    meta = {k: v for k, v in values.items() if k not in GENERIC_COLUMNS}
    path = values.get("path", "")
    error = None if path else "empty path"
    return _row(values.get("video_id", ""), _resolve(root, path) if path else "", values.get("caption", ""), meta, error)


class _JsonlReader:
    """Generic JSONL; cursor = (byte offset, lines before)."""

    kind = "generic"

    def __init__(self, source: Path, root: Path) -> None:
        self.source, self.root = source, root

    def stream(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, ManifestRow]]:
        offset, lineno = cursor or (0, 0)
        with open(self.source, "rb") as f:
            f.seek(offset)
            for raw in f:
                at, before = offset, lineno
                offset, lineno = offset + len(raw), lineno + 1
                line = raw.decode("utf-8")
                if line.strip():
                    yield (at, before), self._row(line, lineno)

    def _row(self, line: str, lineno: int) -> ManifestRow:
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:
            # The row keeps its place as a failed video so that it is counted, not dropped.
            return _row(f"line{lineno}", "", "", {}, f"{self.source}:{lineno}: not a JSON object ({e})")
        return _generic_row(rec, self.root)


def _webvid_row(rec: dict, root: Path, template: str, source: Path, index: int) -> ManifestRow:
    values = {k: v or "" for k, v in rec.items() if k is not None}
    meta = {k: v for k, v in values.items() if k not in ("videoid", "name")}
    error = None
    try:
        meta["duration_s"] = repr(iso8601_seconds(values["duration"]))
    except ValueError as e:
        error = f"{source} row {index}: {e}"
    try:
        path = template.format(video_root=str(root), **values)
    except (KeyError, IndexError, ValueError) as e:
        raise ManifestError(
            f"path template {template!r} names a field the WebVid CSV {source} lacks ({e}); "
            f"fields: video_root, {', '.join(values)}"
        ) from e
    return _row(values["videoid"], _resolve(root, path), values["name"], meta, error)


class _FilesReader:
    """video2dataset `files` output: NNNNN/KEY.mp4 with KEY.json (metadata) and KEY.txt (caption);
    cursor = (shard folder position, key position). One folder's listing is held at a time."""

    kind = "video2dataset"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shards = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if not self.shards:
            raise ManifestError(f"{folder} has no NNNNN/ shard folders nor NNNNN.tar shards: is it a video2dataset "
                                "output folder (output_format=files or webdataset)?")

    def stream(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, ManifestRow]]:
        first_shard, first_key = cursor or (0, 0)
        for s in range(first_shard, len(self.shards)):
            shard = self.folder / self.shards[s]
            keys = sorted({p.stem for p in shard.iterdir() if p.suffix in (".mp4", ".json", ".txt")})
            for k in range(first_key if s == first_shard else 0, len(keys)):
                yield (s, k), _files_row(shard, keys[k])


def _files_row(shard: Path, key: str) -> ManifestRow:
    json_path, txt_path, mp4_path = (shard / f"{key}{ext}" for ext in (".json", ".txt", ".mp4"))
    missing = None if mp4_path.exists() else \
        f"video file not found: {mp4_path} (video2dataset wrote metadata but no video for key {key})"
    return video2dataset_row(
        key, shard.name, str(mp4_path),
        info_text=json_path.read_text(encoding="utf-8") if json_path.exists() else None,
        caption_text=txt_path.read_text(encoding="utf-8") if txt_path.exists() else None,
        json_name=str(json_path), video_error=missing,
    )


def video2dataset_row(key: str, shard: str, path: str, info_text: str | None, caption_text: str | None,
                      json_name: str, video_error: str | None, span: tuple[int, int] | None = None) -> ManifestRow:
    """One video2dataset sample, from either layout: metadata from KEY.json (kept), caption from KEY.txt
    (else the JSON's `caption`). Both layouts go through here, so the same corpus gives the same rows."""
    meta: dict[str, str] = {"v2d_shard": shard}
    error = None
    caption = ""
    if info_text is not None:
        try:
            info = json.loads(info_text)
            if not isinstance(info, dict):
                raise ValueError(f"expected a JSON object, got {type(info).__name__}")
        except ValueError as e:
            info, error = {}, f"{json_name}: unreadable JSON ({e})"
        for k, v in info.items():
            if k not in ("key", "caption") and v is not None:
                meta[k] = v if isinstance(v, str) else json.dumps(v)
        caption = info.get("caption") or ""
    if caption_text is not None:
        caption = caption_text
    return _row(key, path, caption, meta, error or video_error, span)
