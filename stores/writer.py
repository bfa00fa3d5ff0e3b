"""create_store / StoreWriter / ShardWriter: one writer owns one shard; data first, ledger last."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from stores.arrow_buffers import sidecar_path
from stores.backends import BACKENDS
from stores.errors import StoreError
from stores.idindex import write_id_index
from stores.io import atomic_write_json, durable_replace, folder_lock, fsync_path, makedirs_durable
from stores.ledger import (COMPRESSIONS, FileRecord, Layout, ShardLedger, StoreMeta, VideoRecord, canonical_json, committed_shards,
                           load_ledger, load_store_meta, provenance_hash)
from stores.rows import ShardRows, write_rows
from stores.schema import ARRAYS, FORMAT_VERSION, STATUS_CODES, Dims

log = logging.getLogger(__name__)

CREATE_LOCK = ".create.lock"
# The temporary names a creation writes in OUT before store.json (this module, the backends' init_layout,
# atomic_write_json): the *.partial names of stores/io.py and of each backend.
CREATION_TEMPS = (".index.*.partial", ".features.zarr.*.partial", ".features.h5.*.partial", "store.json.*.partial")

def create_store(
    out: str | Path,
    backend: str = "zarr",
    *,
    dims: Dims,
    n_videos: int,
    shard_size: int,
    provenance: dict[str, Any],
    compression: str | None = None,
    video_ids: Iterable[str] | None = None,
) -> StoreWriter:
    """Create OUT or re-open it for writing more shards.

    Re-opening with other dims / backend / shard size / compression / provenance hash raises StoreError.
    `video_ids` (optional, manifest order; any iterable, e.g. a generator streamed from the manifest) lets
    readers name pending videos, not only count them. Shard tasks should get `writer.handle(shard)`, not
    these arguments: a handle is O(1) whatever the corpus size.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression is not None and backend == "hdf5":
        raise ValueError(f"compression={compression!r} is only available for the zarr backend (HDF5 has no "
                         f"zstd filter without plugins); use backend='zarr' or compression=None")
    if not isinstance(dims, Dims):
        raise ValueError(f"dims must be a stores.schema.Dims, got {dims!r}")
    for name, value in (("n_videos", n_videos), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(provenance, dict):
        raise ValueError(f"provenance must be a dict, got {type(provenance).__name__}")
    provenance = json.loads(canonical_json(provenance))  # plain JSON, as it will be read back
    layout = Layout(out)
    meta = StoreMeta(backend=backend, dims=dims, n_videos=n_videos, shard_size=shard_size, compression=compression,
                     provenance=provenance, provenance_hash=provenance_hash(provenance))
    if not layout.store_json.exists():
        # Every creator holds this lock while it creates, so a creation temp seen under it is a killed one's.
        with folder_lock(layout.out / CREATE_LOCK):
            if not layout.store_json.exists():  # a creator that held the lock before us may have finished
                _remove_killed_creation(layout)
                _create(layout, meta, video_ids)
                return StoreWriter(layout, meta)
    existing = load_store_meta(layout)
    _check_writable(existing, layout)
    _check_same(existing, meta, layout)
    BACKENDS[backend].validate_layout(layout, existing)
    return StoreWriter(layout, existing)


def _create(layout: Layout, meta: StoreMeta, video_ids: Iterable[str] | None) -> None:
    makedirs_durable(layout.ledgers)
    if video_ids is not None:
        _write_id_index(layout, video_ids, meta.n_videos)
    BACKENDS[meta.backend].init_layout(layout, meta)
    # store.json last: its presence says the store's metadata is complete.
    atomic_write_json(layout.store_json, meta.to_json())
    log.info("created %s store %s: %d videos in %d shards of %d", meta.backend, layout.out, meta.n_videos, meta.n_shards,
             meta.shard_size)


def _remove_killed_creation(layout: Layout) -> None:
    """What a creation killed before store.json leaves in OUT: its temp folders/files, and the id index or
    Zarr group it had renamed into place (shards are written only once store.json exists)."""
    stale = [p for pattern in CREATION_TEMPS for p in layout.out.glob(pattern)]
    stale += [p for p in (layout.index, layout.zarr) if p.exists()]
    for path in stale:
        log.info("removing %s, left by a store creation that was killed", path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if stale:
        fsync_path(layout.out)


def _write_id_index(layout: Layout, video_ids: Iterable[str], n_videos: int) -> None:
    """Stream the ids into a temporary folder, then rename it to OUT/index (a crash leaves no half index)."""
    tmp = layout.out / f".index.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        write_id_index(tmp, video_ids, n_videos)
        os.rename(tmp, layout.index)
        fsync_path(layout.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_writable(meta: StoreMeta, layout: Layout) -> None:
    if meta.format_version != FORMAT_VERSION:
        raise StoreError(f"{layout.out} is a format-{meta.format_version} store; this vlpcache reads it but writes only "
                         f"format {FORMAT_VERSION}: finish it with the vlpcache version that started it, or extract into a new --out")


def _check_same(existing: StoreMeta, new: StoreMeta, layout: Layout) -> None:
    for field in ("backend", "dims", "n_videos", "shard_size", "compression", "provenance_hash"):
        a, b = getattr(existing, field), getattr(new, field)
        if a != b:
            raise StoreError(
                f"{layout.out} already holds a store with {field}={a!r}, but this run asks for {field}={b!r}; "
                f"use another --out, or delete {layout.out} to start over"
            )


class StoreWriter:
    def __init__(self, layout: Layout, meta: StoreMeta) -> None:
        self.layout, self.meta = layout, meta
        self.backend = BACKENDS[meta.backend]

    @property
    def n_shards(self) -> int:
        return self.meta.n_shards

    def committed_shards(self) -> set[int]:
        """Shards whose ledger was written (last, atomically)."""
        return committed_shards(self.layout)

    def shard_writer(self, shard: int) -> ShardWriter:
        return ShardWriter(self, shard)

    def handle(self, shard: int) -> ShardHandle:
        """A small picklable handle from which a shard task opens this shard's writer."""
        self.meta.shard_rows(shard)  # range check
        return ShardHandle(str(self.layout.out), shard, self.meta.provenance_hash)


def open_writer(out: str | Path, provenance_hash: str | None = None) -> StoreWriter:
    """Re-open an existing store for writing shards (no create arguments needed); with provenance_hash,
    refuse a store made by another extraction."""
    layout = Layout(out)
    meta = load_store_meta(layout)
    _check_writable(meta, layout)
    if provenance_hash is not None and meta.provenance_hash != provenance_hash:
        raise StoreError(f"{layout.out} holds a store with provenance hash {meta.provenance_hash[:12]}, but this task "
                         f"belongs to an extraction with hash {provenance_hash[:12]}; was --out reused by another job?")
    BACKENDS[meta.backend].validate_layout(layout, meta)
    return StoreWriter(layout, meta)


@dataclass(frozen=True)
class ShardHandle:
    """What a shard task needs to write its shard: OUT, the shard index and the store's provenance hash
    (checked on open). Picklable, and nothing in it grows with the corpus."""

    out: str
    shard: int
    provenance_hash: str

    def open(self) -> ShardWriter:
        return open_writer(self.out, self.provenance_hash).shard_writer(self.shard)


class ShardWriter:
    """Collects every row of one shard (put / fail / keep), then commit() makes it visible at once."""

    def __init__(self, store: StoreWriter, shard: int) -> None:
        if not isinstance(shard, int) or not 0 <= shard < store.meta.n_shards:
            raise ValueError(f"shard index must be in 0..{store.meta.n_shards - 1}, got {shard!r}")
        self.store, self.shard, self.meta, self.layout = store, shard, store.meta, store.layout
        self.rows = self.meta.shard_rows(shard)
        committed = self.layout.ledger(shard).exists()
        self._prev_ledger: ShardLedger | None = load_ledger(self.layout, self.meta, shard) if committed else None
        # The committed records (ok / failed per row) of this shard, for --retry-failed; None when pending.
        self.previous: ShardRows | None = None
        if self._prev_ledger is not None:
            self.previous = ShardRows(self.layout.out / self._prev_ledger.files["rows"].path, self.rows.start, len(self.rows))
        self._prev_reader = None
        self._specs = [(name, spec, spec.shape(self.meta.dims), spec.dtype.newbyteorder("<")) for name, spec in ARRAYS.items()]
        self._records: dict[int, VideoRecord] = {}
        self._done = False
        prefix = f"shard-{shard:06d}"
        makedirs_durable(self.layout.partial)
        # One writer owns a shard, so leftovers with this shard's prefix are from a killed attempt.
        for stale in (*self.layout.partial.glob(prefix + "-*"), *self.layout.ledgers.glob(prefix + ".json.*.partial")):
            log.info("removing stale partial file %s", stale)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.partial_dir = self.layout.partial / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.partial_dir.mkdir()
        try:
            self._sink = store.backend.sink(self.layout, self.meta, shard, self.partial_dir)
        except BaseException:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _local(self, row: int, video_id: str) -> int:
        if self._done:
            raise StoreError(f"shard {self.shard} was already committed or aborted; open a new shard_writer({self.shard})")
        if not isinstance(row, (int, np.integer)) or row not in self.rows:
            raise ValueError(f"row {row!r} (video {video_id!r}) is not in shard {self.shard}, which holds rows "
                             f"{self.rows.start}..{self.rows.stop - 1}")
        if int(row) in self._records:
            raise StoreError(f"row {row} (video {video_id!r}) of shard {self.shard} was already written as "
                             f"{self._records[int(row)].video_id!r}; each row is written once")
        return int(row) - self.rows.start

    def put(self, row: int, video_id: str, caption: str, arrays: dict[str, np.ndarray],
            meta: dict[str, str] | None = None, flags: Sequence[str] = ()) -> None:
        local = self._local(row, video_id)
        checked = self._check_arrays(video_id, arrays)
        self._sink.write(local, checked)
        self._records[int(row)] = VideoRecord(int(row), str(video_id), str(caption), "ok", None, tuple(map(str, flags)),
                                              _str_dict(meta, video_id))

    def fail(self, row: int, video_id: str, caption: str, error: str, meta: dict[str, str] | None = None) -> None:
        self._local(row, video_id)
        if not error:
            raise ValueError(f"fail() of video {video_id!r} needs a non-empty error message")
        self._records[int(row)] = VideoRecord(int(row), str(video_id), str(caption), "failed", str(error), (),
                                              _str_dict(meta, video_id))

    def keep(self, row: int) -> None:
        """Copy a row of the previously committed ledger unchanged (used when retrying only failed videos)."""
        if self.previous is None:
            raise StoreError(f"keep({row}): shard {self.shard} has no committed ledger to keep rows from; extract the row instead")
        if row not in self.rows:
            raise ValueError(f"row {row!r} is not in shard {self.shard} (rows {self.rows.start}..{self.rows.stop - 1})")
        record = self.previous.record(int(row) - self.rows.start)
        local = self._local(row, record.video_id)
        if record.status == "ok":
            if self._prev_reader is None:
                self._prev_reader = self.store.backend.reader(self.layout, self.meta, self.shard, self._prev_ledger.files, True)
            self._sink.keep(local, self._prev_reader)
        self._records[int(row)] = record

    def _check_arrays(self, video_id: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(arrays) != set(ARRAYS):
            raise ValueError(f"video {video_id!r}: arrays must have exactly the keys {sorted(ARRAYS)}; "
                             f"missing {sorted(set(ARRAYS) - set(arrays))}, unknown {sorted(set(arrays) - set(ARRAYS))}")
        out = {}
        for name, spec, want, dtype in self._specs:
            a = np.asarray(arrays[name])
            if a.shape != want:
                raise ValueError(f"video {video_id!r}: {name} has shape {a.shape}, expected {want} for dims {self.meta.dims}")
            if a.dtype == dtype:  # already the stored type: nothing to cast, only finiteness to check
                cast = np.ascontiguousarray(a)
                if dtype.kind == "f" and not np.isfinite(cast).all():
                    raise ValueError(f"video {video_id!r}: {name} has non-finite values; fix the extractor")
                out[name] = cast
                continue
            if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                raise ValueError(f"video {video_id!r}: {name} has dtype {a.dtype}, which does not cast to {spec.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, by name
                cast = np.ascontiguousarray(a, dtype=spec.dtype.newbyteorder("<"))
            if spec.dtype.kind == "f" and not np.isfinite(cast).all():
                raise ValueError(f"video {video_id!r}: {name} has non-finite values after casting to {spec.dtype} "
                                 f"(max |x| = {float(np.abs(a).max())}); fix the extractor or scale the features")
            if spec.dtype.kind == "i" and not np.array_equal(cast, a):
                raise ValueError(f"video {video_id!r}: {name} has values outside {spec.dtype}")
            out[name] = cast
        return out

    def commit(self) -> ShardLedger:
        """Every row put/failed/kept -> mark the shard pending, rename the fsynced data files into place,
        then its row statuses and rows part, then write the ledger (the commit)."""
        missing = [r for r in self.rows if r not in self._records]
        if missing:
            raise StoreError(f"shard {self.shard}: rows {_short(missing)} were neither put, failed nor kept; "
                             f"every row of rows {self.rows.start}..{self.rows.stop - 1} needs one")
        records = [self._records[r] for r in self.rows]
        status = np.array([STATUS_CODES[r.status] for r in records], dtype=np.int8)  # [rows]
        try:
            files = self._sink.finish(status)
            rows_partial, rows_final = self.partial_dir / "rows.arrow", self.layout.rows_part(self.shard)
            buffers_partial = write_rows(rows_partial, self.shard, records, rows_final.name)
            buffers_final = sidecar_path(rows_final)
            files.append((buffers_partial, buffers_final, "rows_buffers", _file_record(buffers_partial, buffers_final, self.layout)))
            files.append((rows_partial, rows_final, "rows", _file_record(rows_partial, rows_final, self.layout)))
            self._mark_pending()
            for partial, final, _, _ in files:
                durable_replace(partial, final)
            ledger = ShardLedger(
                shard=self.shard, row_start=self.rows.start, row_stop=self.rows.stop,
                counts={"ok": int((status == 1).sum()), "failed": int((status == 2).sum())},
                files={key: rec for _, _, key, rec in files}, provenance_hash=self.meta.provenance_hash,
                backend=self.meta.backend, failures=tuple((r.video_id, r.error or "") for r in records if r.status == "failed"),
            )
            atomic_write_json(self.layout.ledger(self.shard), ledger.to_json())
        except BaseException:
            self.abort()
            raise
        self._close()
        log.info("committed shard %d: %s", self.shard, ledger.counts)
        return ledger

    def _mark_pending(self) -> None:
        """Before any committed file of this shard is replaced, make every reader see the shard pending:
        remove the ledger (vlpcache readers), then the row statuses (foreign readers; zarr keeps them in
        their own file, HDF5 inside the shard file, which is replaced whole by one rename). A crash from
        here on leaves a shard that is redone, never a ledger or status over mixed-attempt files."""
        for path in (self.layout.ledger(self.shard), *self.store.backend.status_files(self.layout, self.meta, self.shard)):
            if path.exists():
                path.unlink()
                fsync_path(path.parent)

    def abort(self) -> None:
        """Drop the partial shard. Before commit() the committed state (if any) is untouched; after a failure
        inside commit() the shard may be left pending (old ledger removed), never visible half-written."""
        self._close()

    def _close(self) -> None:
        self._done = True
        try:
            self._sink.close()  # on a full disk, closing flushes and fails again: the partial must go anyway
            if self._prev_reader is not None:
                self._prev_reader.close()
                self._prev_reader = None
        finally:
            shutil.rmtree(self.partial_dir, ignore_errors=True)


def _file_record(partial: Path, final: Path, layout: Layout) -> FileRecord:
    data = partial.read_bytes()
    return FileRecord(str(final.relative_to(layout.out)), len(data), crc32c.crc32c(data))


def _str_dict(d: dict[str, str] | None, video_id: str) -> dict[str, str]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"video {video_id!r}: meta must be a dict of str -> str, got {type(d).__name__}")
    return {str(k): "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for k, v in d.items()}


def _short(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (f" ... ({len(rows)} in all)" if len(rows) > 10 else "")
