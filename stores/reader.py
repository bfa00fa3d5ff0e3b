"""open_store(OUT): one reader over either backend; random access by video id or row; batched reads."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.backends import BACKENDS
from stores.errors import StoreError, VideoNotStoredError
from stores.index import MAX_CACHED_ROWS, IndexV2
from stores.ledger import Layout, StoreMeta, StoreStatus, VideoRecord, load_store_meta
from stores.legacy import IndexV1
from stores.schema import ARRAYS, Dims


def open_store(out: str | Path, *, verify_checksums: bool = False, max_open_shards: int = 64,
               max_cached_rows: int = MAX_CACHED_ROWS) -> StoreReader:
    """Open a store for reading.

    verify_checksums: check each chunk's checksum on every read (crc32c for Zarr, fletcher32 for HDF5).
    Off by default: the hot path reads chunk bytes straight from the shard files; `vlpcache verify`
    checks everything. Shard files are opened lazily, at most max_open_shards at a time; at most
    max_cached_rows shards' rows parts (records) stay mapped (format 2).
    """
    return StoreReader(out, verify_checksums=verify_checksums, max_open_shards=max_open_shards,
                       max_cached_rows=max_cached_rows)


class StoreReader:
    """A snapshot of the committed shards at open time; open the store again to see shards added since.

    Opening reads store.json and the list of ledgers, nothing that grows with the number of videos
    (format 2; a format-1 store parses all its ledgers, as it always did). Per-shard data is read and
    memory-mapped on demand; the pickled reader holds no maps.
    """

    def __init__(self, out: str | Path, *, verify_checksums: bool = False, max_open_shards: int = 64,
                 max_cached_rows: int = MAX_CACHED_ROWS) -> None:
        self.layout = Layout(out)
        self.store_meta: StoreMeta = load_store_meta(self.layout)
        self.backend = BACKENDS[self.store_meta.backend]
        self.backend.validate_layout(self.layout, self.store_meta)  # shallow: a few small files at most
        self.verify_checksums = verify_checksums
        self.max_open_shards = max_open_shards
        self.index = IndexV2(self.layout, self.store_meta, max_cached_rows) if self.store_meta.format_version >= 2 \
            else IndexV1(self.layout, self.store_meta)
        self._open: OrderedDict[int, Any] = OrderedDict()

    # ---- what is in the store

    @property
    def dims(self) -> Dims:
        return self.store_meta.dims

    @property
    def provenance(self) -> dict[str, Any]:
        return self.store_meta.provenance

    @property
    def backend_name(self) -> str:
        return self.store_meta.backend

    @property
    def video_ids(self) -> Sequence[str]:
        """Ids of the videos stored ok, in manifest order (a lazy sequence: read shard by shard)."""
        return self.index.video_ids

    @property
    def status(self) -> StoreStatus:
        return self.index.status()

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.store_meta.n_shards) if s not in self.index.committed]

    def __len__(self) -> int:
        return len(self.video_ids)

    def __contains__(self, video_id: object) -> bool:
        found = self.index.find(video_id) if isinstance(video_id, str) else None
        return found is not None and found[1] == "ok"

    def row_of(self, video_id: str) -> int:
        """Manifest row of an ok video; VideoNotStoredError (a StoreError) for a failed/pending/unknown one."""
        found = self.index.find(video_id)
        if found is not None and found[1] == "ok":
            return found[0]
        if found is not None and found[1] == "failed":
            row = found[0]
            raise VideoNotStoredError(video_id, "failed", f"video {video_id!r} (row {row}) failed during extraction: "
                                      f"{self.index.record(row).error}; see `vlpcache status {self.layout.out}`, or re-run "
                                      f"extract to retry failed videos")
        if found is not None:
            row = found[0]
            raise VideoNotStoredError(video_id, "pending", f"video {video_id!r} (row {row}) is pending: shard "
                                      f"{self.store_meta.shard_of(row)} is not committed yet; resume `vlpcache extract` to finish it")
        pending = self.pending_shards()
        raise VideoNotStoredError(video_id, "unknown" if not pending else "pending",
                                  f"video {video_id!r} is not in {self.layout.out} (ok: {len(self)}, pending shards: "
                                  f"{len(pending)}, e.g. {pending[:10]}); check the id, or resume extract")

    def rows_of(self, video_ids: Sequence[str]) -> np.ndarray:
        """[B] int64 manifest rows of many ok videos, in the order asked: row_of for a batch, with the id
        table probed in numpy and each shard's statuses gathered once. The first id not stored ok raises
        what row_of raises for it."""
        video_ids = list(video_ids)
        rows, status = self.index.find_many(video_ids)
        bad = np.flatnonzero(status != 1)
        if len(bad):
            v = video_ids[int(bad[0])]
            self.row_of(v)  # raises VideoNotStoredError naming it
            raise StoreError(f"{self.layout.out}: video {v!r} is stored ok by a single lookup but not by a batched one; "
                             f"the store is damaged: run `vlpcache verify`")
        return rows

    def record(self, row: int) -> VideoRecord:
        """The ledger record (video_id, caption, status, error, flags, meta) of any committed row."""
        self._check_row(row)
        shard = self.store_meta.shard_of(row)
        if shard not in self.index.committed:
            raise VideoNotStoredError(str(row), "pending", f"row {row} is pending: shard {shard} is not committed yet; resume `vlpcache extract`")
        return self.index.record(int(row))

    def meta(self, video_id: str) -> dict[str, str]:
        """Extra manifest columns recorded for a video (ok or failed)."""
        found = self.index.find(video_id)
        row = found[0] if found is not None and found[1] == "failed" else self.row_of(video_id)
        return self.record(row).meta

    # ---- reads

    def __getitem__(self, video_id: str) -> dict[str, Any]:
        return self.read_row(self.row_of(video_id))

    def read_row(self, row: int) -> dict[str, Any]:
        """All arrays of one ok row (owned copies), plus its caption."""
        record = self._ok_record(row)
        shard_reader = self._shard(self.store_meta.shard_of(row))
        local = row - self.store_meta.shard_of(row) * self.store_meta.shard_size
        out: dict[str, Any] = {name: np.array(shard_reader.read(name, local)) for name in ARRAYS}
        out["caption"] = record.caption
        return out

    def read_many(self, video_ids: Sequence[str]) -> dict[str, Any]:
        """Batched read: name -> [B, ...] arrays in the order asked, caption -> list[str]."""
        return self.read_rows(self.rows_of(video_ids))

    def read_rows(self, rows: Sequence[int]) -> dict[str, Any]:
        rows = [int(r) for r in rows]
        records = [self._ok_record(r) for r in rows]
        out: dict[str, Any] = {
            name: np.empty((len(rows), *spec.shape(self.store_meta.dims)), dtype=spec.dtype) for name, spec in ARRAYS.items()
        }
        by_shard: dict[int, list[tuple[int, int]]] = {}  # shard -> [(batch position, row within the shard)]
        size = self.store_meta.shard_size
        for b, row in enumerate(rows):
            by_shard.setdefault(row // size, []).append((b, row % size))
        for shard, items in by_shard.items():  # each shard file is opened (mapped) once per call at most
            shard_reader = self._shard(shard)
            for name in ARRAYS:
                dest = out[name]
                for b, local in items:
                    dest[b] = shard_reader.read(name, local)
        out["caption"] = [r.caption for r in records]
        return out

    def _check_row(self, row: int) -> None:
        if not isinstance(row, (int, np.integer)) or not 0 <= row < self.store_meta.n_videos:
            raise IndexError(f"row {row!r} out of range: the store has rows 0..{self.store_meta.n_videos - 1}")

    def _ok_record(self, row: int) -> VideoRecord:
        record = self.record(row)
        if record.status != "ok":
            raise VideoNotStoredError(record.video_id, "failed", f"video {record.video_id!r} (row {row}) failed during "
                                      f"extraction: {record.error}; re-run extract to retry failed videos")
        return record

    def _shard(self, shard: int):
        reader = self._open.get(shard)
        if reader is not None:
            self._open.move_to_end(shard)
            return reader
        reader = self.backend.reader(self.layout, self.store_meta, shard, self.index.files(shard), self.verify_checksums)
        self._open[shard] = reader
        if len(self._open) > self.max_open_shards:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return reader

    def close(self) -> None:
        while self._open:
            _, reader = self._open.popitem()
            reader.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for DataLoader workers: open maps stay behind; each worker opens its own lazily.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass
