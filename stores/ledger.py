"""Store-level metadata (OUT/store.json), per-shard ledgers (OUT/ledgers/shard-NNNNNN.json), paths.

A shard is committed when, and only when, its ledger exists: the ledger is written last, atomically,
after the shard's data files, row statuses and rows part are fsynced and renamed into place. A format-2
ledger is small (counts and files); the per-video records live in the rows part (stores/rows.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from stores.errors import StoreError
from stores.schema import FORMAT_VERSION, READ_VERSIONS, Dims

BACKENDS = ("zarr", "hdf5")
COMPRESSIONS = (None, "zstd")


def canonical_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise StoreError(f"provenance must be plain JSON (str/int/float/bool/None/list/dict), got {obj!r}: {e}") from e


def provenance_hash(provenance: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the provenance dict the pipeline passes."""
    return hashlib.sha256(canonical_json(provenance)).hexdigest()


def code_version() -> str:
    try:
        return f"vlpcache {metadata.version('vlpcache')}"
    except metadata.PackageNotFoundError:
        return "vlpcache (not installed)"


class Layout:
    """Where everything of one store lives under OUT."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.store_json = self.out / "store.json"
        self.video_ids_json = self.out / "video_ids.json"  # format 1 only
        self.index = self.out / "index"  # format 2: id index (stores/idindex.py)
        self.rows = self.out / "rows"  # format 2: per-shard rows parts (stores/rows.py)
        self.ledgers = self.out / "ledgers"
        self.partial = self.out / ".partial"  # in-flight shards; never read
        self.zarr = self.out / "features.zarr"
        self.h5 = self.out / "features.h5"
        self.h5_shards = self.out / "shards"

    def ledger(self, shard: int) -> Path:
        return self.ledgers / f"shard-{shard:06d}.json"

    def rows_part(self, shard: int) -> Path:
        return self.rows / f"shard-{shard:06d}.arrow"

    def h5_shard(self, shard: int) -> Path:  # format 1; format 2 names: hdf5_backend.shard_path
        return self.h5_shards / f"shard-{shard:06d}.h5"

    def zarr_shard(self, name: str, shard: int, ndim: int) -> Path:
        # Zarr v3 "default" chunk key encoding: c/<shard>/0/0... for one shard along the video axis.
        return self.zarr.joinpath(name, "c", str(shard), *(["0"] * (ndim - 1)))


@dataclass(frozen=True)
class StoreMeta:
    """OUT/store.json: what the store is and how it was made."""

    backend: str
    dims: Dims
    n_videos: int
    shard_size: int
    compression: str | None
    provenance: dict[str, Any]
    provenance_hash: str
    format_version: int = FORMAT_VERSION
    code_version: str = field(default_factory=code_version)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_videos / self.shard_size)

    def shard_rows(self, shard: int) -> range:
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"shard index {shard} out of range: this store has shards 0..{self.n_shards - 1}")
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_videos))

    def shard_of(self, row: int) -> int:
        return row // self.shard_size

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dims"] = asdict(self.dims)
        return d

    @classmethod
    def from_json(cls, d: Any, source: Path) -> StoreMeta:
        if not isinstance(d, dict):
            raise StoreError(f"{source}: expected a JSON object, got {type(d).__name__}; the store metadata is damaged")
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            raise StoreError(
                f"{source}: store format version {version!r}, but this vlpcache reads versions {READ_VERSIONS}; "
                f"use the vlpcache version that wrote it, or re-extract"
            )
        try:
            meta = cls(
                backend=d["backend"],
                dims=Dims(**d["dims"]),
                n_videos=int(d["n_videos"]),
                shard_size=int(d["shard_size"]),
                compression=d["compression"],
                provenance=d["provenance"],
                provenance_hash=d["provenance_hash"],
                format_version=version,
                code_version=d.get("code_version", "unknown"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{source}: store metadata is missing or has a bad field ({e!r}); the store is damaged") from e
        if meta.backend not in BACKENDS:
            raise StoreError(f"{source}: unknown backend {meta.backend!r}; expected one of {BACKENDS}")
        if meta.compression not in COMPRESSIONS:
            raise StoreError(f"{source}: unknown compression {meta.compression!r}; expected one of {COMPRESSIONS}")
        if provenance_hash(meta.provenance) != meta.provenance_hash:
            raise StoreError(f"{source}: provenance does not match its recorded hash; the store metadata was edited")
        return meta


def load_store_meta(layout: Layout) -> StoreMeta:
    try:
        d = json.loads(layout.store_json.read_bytes())
    except FileNotFoundError as e:
        raise StoreError(f"{layout.out} is not a vlpcache store ({layout.store_json.name} is missing); "
                         f"check the path, or run `vlpcache extract --out {layout.out}`") from e
    except (OSError, ValueError) as e:
        raise StoreError(f"{layout.store_json} is unreadable ({e}); the store metadata is damaged") from e
    return StoreMeta.from_json(d, layout.store_json)


@dataclass(frozen=True)
class VideoRecord:
    row: int
    video_id: str
    caption: str
    status: str  # "ok" | "failed"
    error: str | None = None
    flags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to OUT
    nbytes: int
    crc32c: int


def checked_relpath(path: Any, source: Path) -> str:
    """A file path read from a ledger: relative, normalised and inside OUT, or StoreError.
    (Plain string checks: this runs for every file of every ledger that status reads.)"""
    parts = path.split("/") if isinstance(path, str) else [""]
    if any(p in ("", ".", "..") for p in parts) or "\\" in path or "\0" in path:
        raise StoreError(f"{source}: file path {path!r} is not a plain relative path inside the store; "
                         f"the ledger was tampered with or damaged: delete it to redo the shard")
    return path


@dataclass(frozen=True)
class ShardLedger:
    """OUT/ledgers/shard-NNNNNN.json, written last: its presence is the commit."""

    shard: int
    row_start: int
    row_stop: int
    counts: dict[str, int]  # {"ok": n, "failed": n}
    files: dict[str, FileRecord]  # array name / "shard" (hdf5) / "row_status" (zarr) / "rows" -> file
    provenance_hash: str
    backend: str
    failures: tuple[tuple[str, str], ...] = ()  # (video_id, error) of each failed row, in row order: status reads these
    format_version: int = FORMAT_VERSION
    code_version: str = field(default_factory=code_version)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "code_version": self.code_version, "backend": self.backend,
            "shard": self.shard, "row_start": self.row_start, "row_stop": self.row_stop, "counts": self.counts,
            "failures": [{"video_id": v, "error": e} for v, e in self.failures],
            "provenance_hash": self.provenance_hash, "files": {name: asdict(f) for name, f in self.files.items()},
        }

    @classmethod
    def load(cls, path: Path) -> ShardLedger:
        d = read_ledger_json(path, FORMAT_VERSION)
        try:
            ledger = cls(
                shard=int(d["shard"]), row_start=int(d["row_start"]), row_stop=int(d["row_stop"]),
                counts={"ok": int(d["counts"]["ok"]), "failed": int(d["counts"]["failed"])},
                files={k: FileRecord(checked_relpath(f["path"], path), int(f["nbytes"]), int(f["crc32c"]))
                       for k, f in d["files"].items()},
                provenance_hash=d["provenance_hash"], backend=d["backend"],
                failures=tuple((str(f["video_id"]), str(f["error"])) for f in d["failures"]),
                format_version=d["format_version"], code_version=d.get("code_version", "unknown"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{path}: shard ledger is missing or has a bad field ({e!r}); delete it to redo the shard") from e
        if ledger.counts["ok"] + ledger.counts["failed"] != ledger.row_stop - ledger.row_start or min(ledger.counts.values()) < 0 \
                or len(ledger.failures) != ledger.counts["failed"]:
            raise StoreError(f"{path}: ledger counts {ledger.counts} disagree with its {ledger.row_stop - ledger.row_start} rows")
        if "rows" not in ledger.files:
            raise StoreError(f"{path}: ledger lists no rows part; the ledger is damaged: delete it to redo the shard")
        return ledger


def read_ledger_json(path: Path, version: int) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: shard ledger is unreadable ({e}); delete it to redo the shard, or re-extract") from e
    if not isinstance(d, dict) or d.get("format_version") != version:
        found = d.get("format_version") if isinstance(d, dict) else None
        raise StoreError(f"{path}: ledger format version {found!r}, but this store is format {version}; "
                         f"use the vlpcache version that wrote it, or re-extract")
    return d


def load_ledger(layout: Layout, meta: StoreMeta, shard: int, cls: type = ShardLedger):
    """A shard's ledger, checked against the store: shard/rows, provenance hash, backend."""
    path = layout.ledger(shard)
    if shard >= meta.n_shards:
        raise StoreError(f"{path}: shard {shard} is beyond this store's {meta.n_shards} shards; the ledger does not belong here")
    ledger = cls.load(path)
    rows = meta.shard_rows(shard)
    if (ledger.shard, ledger.row_start, ledger.row_stop) != (shard, rows.start, rows.stop):
        raise StoreError(f"{path}: ledger is for shard {ledger.shard} rows {ledger.row_start}..{ledger.row_stop - 1}, "
                         f"expected shard {shard} rows {rows.start}..{rows.stop - 1}; the ledger was moved or damaged")
    if ledger.provenance_hash != meta.provenance_hash or ledger.backend != meta.backend:
        raise StoreError(f"{path}: ledger was written by another extraction (provenance hash {ledger.provenance_hash[:12]}, "
                         f"store {meta.provenance_hash[:12]}); delete the ledger to redo the shard")
    return ledger


@dataclass(frozen=True)
class StoreStatus:
    ok: int
    failed: int
    pending: int
    failures: list[tuple[str, str]]  # (video_id, error) of each failed video, in row order
    shards_committed: int = 0
    shards_total: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "failed": self.failed, "pending": self.pending,
            "failures": [{"video_id": v, "error": e} for v, e in self.failures],
            "shards": {"committed": self.shards_committed, "total": self.shards_total},
        }


_LEDGER_NAME = re.compile(r"^shard-(\d{6})\.json$")


def committed_shards(layout: Layout) -> set[int]:
    if not layout.ledgers.exists():
        return set()
    return {int(m.group(1)) for p in layout.ledgers.iterdir() if (m := _LEDGER_NAME.match(p.name))}
