"""create_store / StoreWriter / ShardWriter: one writer owns one shard; data first, ledger last."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.backends import BACKENDS
from stores.errors import StoreError
from stores.io import atomic_write_json, durable_replace, fsync_path
from stores.ledger import (COMPRESSIONS, Layout, ShardLedger, StoreMeta, VideoRecord, canonical_json, committed_shards,
                           load_ledger, load_store_meta, provenance_hash)
from stores.schema import ARRAYS, Dims

log = logging.getLogger(__name__)

def create_store(
    out: str | Path,
    backend: str = "zarr",
    *,
    dims: Dims,
    n_videos: int,
    shard_size: int,
    provenance: dict[str, Any],
    compression: str | None = None,
    video_ids: Sequence[str] | None = None,
) -> StoreWriter:
    """Create OUT or re-open it for writing more shards.

    Re-opening with other dims / backend / shard size / compression / provenance hash raises StoreError.
    `video_ids` (optional, manifest order) lets readers name pending videos, not only count them.
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
    if video_ids is not None:
        video_ids = [str(v) for v in video_ids]
        if len(video_ids) != n_videos:
            raise ValueError(f"video_ids has {len(video_ids)} entries but n_videos={n_videos}")
    provenance = json.loads(canonical_json(provenance))  # plain JSON, as it will be read back
    layout = Layout(out)
    meta = StoreMeta(backend=backend, dims=dims, n_videos=n_videos, shard_size=shard_size, compression=compression,
                     provenance=provenance, provenance_hash=provenance_hash(provenance))
    if layout.store_json.exists():
        existing = load_store_meta(layout)
        _check_same(existing, meta, layout)
        BACKENDS[backend].validate_layout(layout, existing)
        return StoreWriter(layout, existing)
    layout.out.mkdir(parents=True, exist_ok=True)
    layout.ledgers.mkdir(exist_ok=True)
    BACKENDS[backend].init_layout(layout, meta)
    if video_ids is not None:
        atomic_write_json(layout.video_ids_json, video_ids)
    # store.json last: its presence says the store's metadata is complete.
    atomic_write_json(layout.store_json, meta.to_json())
    log.info("created %s store %s: %d videos in %d shards of %d", backend, layout.out, n_videos, meta.n_shards, shard_size)
    return StoreWriter(layout, meta)


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


class ShardWriter:
    """Collects every row of one shard (put / fail / keep), then commit() makes it visible at once."""

    def __init__(self, store: StoreWriter, shard: int) -> None:
        if not isinstance(shard, int) or not 0 <= shard < store.meta.n_shards:
            raise ValueError(f"shard index must be in 0..{store.meta.n_shards - 1}, got {shard!r}")
        self.store, self.shard, self.meta, self.layout = store, shard, store.meta, store.layout
        self.rows = self.meta.shard_rows(shard)
        committed = self.layout.ledger(shard).exists()
        self.previous: ShardLedger | None = load_ledger(self.layout, self.meta, shard) if committed else None
        self._prev_reader = None
        self._records: dict[int, VideoRecord] = {}
        self._done = False
        prefix = f"shard-{shard:06d}-"
        self.layout.partial.mkdir(parents=True, exist_ok=True)
        # One writer owns a shard, so leftovers with this shard's prefix are from a killed attempt.
        for stale in self.layout.partial.glob(prefix + "*"):
            log.info("removing stale partial shard %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        self.partial_dir = self.layout.partial / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
        record = self.previous.record(int(row))
        local = self._local(row, record.video_id)
        if record.status == "ok":
            if self._prev_reader is None:
                self._prev_reader = self.store.backend.reader(self.layout, self.meta, self.shard, self.previous.files, True)
            self._sink.keep(local, self._prev_reader)
        self._records[int(row)] = record

    def _check_arrays(self, video_id: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(arrays) != set(ARRAYS):
            raise ValueError(f"video {video_id!r}: arrays must have exactly the keys {sorted(ARRAYS)}; "
                             f"missing {sorted(set(ARRAYS) - set(arrays))}, unknown {sorted(set(arrays) - set(ARRAYS))}")
        out = {}
        for name, spec in ARRAYS.items():
            a = np.asarray(arrays[name])
            want = spec.shape(self.meta.dims)
            if a.shape != want:
                raise ValueError(f"video {video_id!r}: {name} has shape {a.shape}, expected {want} for dims {self.meta.dims}")
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
        """Every row put/failed/kept -> fsync + rename the data files, then write the ledger (the commit)."""
        missing = [r for r in self.rows if r not in self._records]
        if missing:
            raise StoreError(f"shard {self.shard}: rows {_short(missing)} were neither put, failed nor kept; "
                             f"every row of rows {self.rows.start}..{self.rows.stop - 1} needs one")
        try:
            files = self._sink.finish()
            ledger_path = self.layout.ledger(self.shard)
            if ledger_path.exists():
                # Retry of a committed shard: make it pending before replacing its files, so a crash
                # in between leaves a shard that is redone, never a ledger over mixed files.
                ledger_path.unlink()
                fsync_path(ledger_path.parent)
            for partial, final, _, _ in files:
                durable_replace(partial, final)
            ledger = ShardLedger(
                shard=self.shard, row_start=self.rows.start, row_stop=self.rows.stop,
                videos=tuple(self._records[r] for r in self.rows), files={key: rec for _, _, key, rec in files},
                provenance_hash=self.meta.provenance_hash, provenance=self.meta.provenance, backend=self.meta.backend,
            )
            atomic_write_json(ledger_path, ledger.to_json())
        except BaseException:
            self.abort()
            raise
        self._close()
        log.info("committed shard %d: %s", self.shard, ledger.counts)
        return ledger

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


def _str_dict(d: dict[str, str] | None, video_id: str) -> dict[str, str]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"video {video_id!r}: meta must be a dict of str -> str, got {type(d).__name__}")
    return {str(k): "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for k, v in d.items()}


def _short(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (f" ... ({len(rows)} in all)" if len(rows) > 10 else "")
