"""Manifest readers: generic CSV/JSONL, WebVid CSVs (both layouts), and video2dataset output folders.

Every reader returns the rows in a deterministic order (the manifest's order; for a video2dataset
folder, sorted by shard folder then key), because row i of the store is manifest row i and the shard
plan is cut from that order. A row that cannot be extracted (empty caption, an id that
would escape the output folder as a path, a malformed duration) keeps its place with `error` set: the
pipeline records it as a failed video in the shard ledger, so it is never lost silently. A manifest
that cannot be read at all (missing file, missing columns, duplicate ids) raises ManifestError.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

GENERIC_COLUMNS = ("video_id", "path", "caption")
# WebVid-10M partitions: videoid,contentUrl,duration,page_dir,name;
# results_2M_*.csv: videoid,name,page_idx,page_dir,duration,contentUrl. Read by header, never by position.
WEBVID_COLUMNS = ("videoid", "name", "page_dir", "duration", "contentUrl")
DEFAULT_WEBVID_TEMPLATE = "{video_root}/{page_dir}/{videoid}.mp4"
FORMATS = ("auto", "generic", "webvid", "video2dataset")

_ISO_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


class ManifestError(ValueError):
    """The manifest cannot be read at all; the message names the file and what to fix."""


@dataclass
class ManifestRow:
    video_id: str
    path: str  # absolute path of the video file
    caption: str
    meta: dict[str, str] = field(default_factory=dict)  # extra columns, kept per video in the store
    error: str | None = None  # set when the row itself is unusable; recorded as a failed video

    @property
    def window(self) -> tuple[float, float] | None:
        """Optional (start, end) seconds from the `start`/`end` meta columns."""
        start, end = self.meta.get("start", ""), self.meta.get("end", "")
        if start == "" and end == "":
            return None
        return (float(start or 0.0), float(end) if end else float("inf"))


@dataclass
class Manifest:
    rows: list[ManifestRow]
    source: str  # the manifest file or folder
    format: str  # generic | webvid | video2dataset

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """sha256 over (video_id, path, caption) of every row: a rerun on another manifest is refused."""
        h = hashlib.sha256()
        for row in self.rows:
            h.update(json.dumps([row.video_id, row.path, row.caption]).encode())
        return h.hexdigest()


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


def read_manifest(
    source: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    fmt: str = "auto",
    path_template: str = DEFAULT_WEBVID_TEMPLATE,
) -> Manifest:
    """Read a manifest file or video2dataset folder. `video_root` resolves relative paths (default:
    the manifest's folder)."""
    source = Path(source)
    if fmt not in FORMATS:
        raise ManifestError(f"manifest format {fmt!r} is not one of {FORMATS}")
    if not source.exists():
        raise ManifestError(f"manifest {source} does not exist: pass an existing CSV/JSONL file or video2dataset folder")
    root = Path(video_root) if video_root else (source if source.is_dir() else source.parent)
    if source.is_dir():
        if fmt not in ("auto", "video2dataset"):
            raise ManifestError(f"manifest {source} is a folder, which only the video2dataset format reads (got {fmt!r})")
        rows, kind = _read_video2dataset(source), "video2dataset"
    elif source.suffix.lower() in (".jsonl", ".json"):
        if fmt not in ("auto", "generic"):
            raise ManifestError(f"manifest {source} is JSONL, which only the generic format reads (got {fmt!r})")
        rows, kind = _read_jsonl(source, root), "generic"
    else:
        rows, kind = _read_csv(source, root, fmt, path_template)
    _mark_bad_rows(rows, source)
    log.info("manifest %s (%s): %d rows, %d unusable", source, kind, len(rows), sum(r.error is not None for r in rows))
    return Manifest(rows=rows, source=str(source), format=kind)


def _resolve(root: Path, path: str) -> str:
    return str(Path(path) if os.path.isabs(path) else (root / path))


def _row(video_id: str, path: str, caption: str, meta: dict[str, str], error: str | None = None) -> ManifestRow:
    return ManifestRow(video_id=video_id.strip(), path=path, caption=caption.strip(), meta=meta, error=error)


def _read_csv(source: Path, root: Path, fmt: str, template: str) -> tuple[list[ManifestRow], str]:
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        is_webvid = all(c in header for c in WEBVID_COLUMNS)
        kind = ("webvid" if is_webvid else "generic") if fmt == "auto" else fmt
        if kind == "video2dataset":
            raise ManifestError(f"manifest {source} is a file; the video2dataset format reads a folder")
        wanted = WEBVID_COLUMNS if kind == "webvid" else GENERIC_COLUMNS
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ManifestError(
                f"manifest {source} lacks column(s) {missing} (header: {header}); a generic manifest needs "
                f"{list(GENERIC_COLUMNS)}, a WebVid CSV needs {list(WEBVID_COLUMNS)}"
            )
        if kind == "webvid":
            return [_webvid_row(rec, root, template, source, i) for i, rec in enumerate(reader)], kind
        return [_generic_row(rec, root) for rec in reader], kind


def _generic_row(rec: dict, root: Path) -> ManifestRow:
    # csv gives None for short rows; JSON may give numbers: every value becomes a string.
    values = {k: "" if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in rec.items() if k is not None}
    meta = {k: v for k, v in values.items() if k not in GENERIC_COLUMNS}
    path = values.get("path", "")
    error = None if path else "empty path"
    return _row(values.get("video_id", ""), _resolve(root, path) if path else "", values.get("caption", ""), meta, error)


def _read_jsonl(source: Path, root: Path) -> list[ManifestRow]:
    rows = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as e:
                # The row keeps its place as a failed video so that it is counted, not dropped.
                rows.append(_row(f"line{lineno}", "", "", {}, f"{source}:{lineno}: not a JSON object ({e})"))
                continue
            rows.append(_generic_row(rec, root))
    return rows


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


def _read_video2dataset(folder: Path) -> list[ManifestRow]:
    """video2dataset `files` output: NNNNN/KEY.mp4 with KEY.json (metadata) and KEY.txt (caption)."""
    shard_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not shard_dirs:
        raise ManifestError(f"{folder} has no NNNNN/ shard folders: is it a video2dataset output folder (output_format=files)?")
    rows = []
    for shard in shard_dirs:
        keys = sorted({p.stem for p in shard.iterdir() if p.suffix in (".mp4", ".json", ".txt")})
        rows += [_video2dataset_row(shard, key) for key in keys]
    return rows


def _video2dataset_row(shard: Path, key: str) -> ManifestRow:
    meta: dict[str, str] = {"v2d_shard": shard.name}
    error = None
    json_path, txt_path, mp4_path = (shard / f"{key}{ext}" for ext in (".json", ".txt", ".mp4"))
    caption = ""
    if json_path.exists():
        try:
            info = json.loads(json_path.read_text(encoding="utf-8"))
        except ValueError as e:
            info, error = {}, f"{json_path}: unreadable JSON ({e})"
        for k, v in info.items():
            if k not in ("key", "caption") and v is not None:
                meta[k] = v if isinstance(v, str) else json.dumps(v)
        caption = info.get("caption") or ""
    if txt_path.exists():
        caption = txt_path.read_text(encoding="utf-8")
    if not mp4_path.exists() and error is None:
        error = f"video file not found: {mp4_path} (video2dataset wrote metadata but no video for key {key})"
    return _row(key, str(mp4_path), caption, meta, error)


def _mark_bad_rows(rows: list[ManifestRow], source: Path) -> None:
    """Empty captions and path-unsafe ids become per-video failures, in place. Duplicate ids are a
    manifest error: the store is keyed by video_id, so a second row with an id cannot be recorded."""
    first_row: dict[str, int] = {}
    duplicates = []
    for i, row in enumerate(rows):
        if row.video_id in first_row:
            duplicates.append(f"{row.video_id!r} (rows {first_row[row.video_id]} and {i})")
        first_row.setdefault(row.video_id, i)
        if row.error is None:
            row.error = unsafe_id_reason(row.video_id)
        if row.error is None and not row.caption:
            row.error = f"empty caption for video_id {row.video_id!r}; give every row a caption"
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise ManifestError(f"manifest {source} has duplicate video_id(s): {shown}; make the ids unique (drop or rename the repeats)")
