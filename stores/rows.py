"""Per-shard rows part `rows/shard-NNNNNN.arrow`: one row per video of the shard, read through a memory map.

An Arrow IPC file (uncompressed, so it maps with no copy) with the columns
`row` int64, `video_id` utf8, `status` int8 (1 ok, 2 failed), `caption` utf8, `error` utf8 (null
when ok), `flags` list<utf8>, and one utf8 column `meta.<key>` per manifest extra column (null where
the row has no such key). Written before the ledger, which records its size and crc32c.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from stores.errors import StoreError
from stores.ledger import VideoRecord
from stores.schema import STATUS_CODES, STATUS_NAMES
from stores.utf8 import Utf8Column

META_PREFIX = "meta."


def write_rows(path: Path, shard: int, records: Sequence[VideoRecord]) -> None:
    """Write and fsync the rows part (the caller renames it into place)."""
    keys = sorted({k for r in records for k in r.meta})
    columns = {
        "row": pa.array([r.row for r in records], pa.int64()),
        "video_id": pa.array([r.video_id for r in records], pa.string()),
        "status": pa.array([STATUS_CODES[r.status] for r in records], pa.int8()),
        "caption": pa.array([r.caption for r in records], pa.string()),
        "error": pa.array([r.error for r in records], pa.string()),
        "flags": pa.array([list(r.flags) for r in records], pa.list_(pa.string())),
        **{META_PREFIX + k: pa.array([r.meta.get(k) for r in records], pa.string()) for k in keys},
    }
    table = pa.table(columns).replace_schema_metadata({"vlpcache_shard": str(shard)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as ipc:
        ipc.write_table(table)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardRows:
    """The rows part of one committed shard; columns are decoded only when asked for."""

    def __init__(self, path: Path, row_start: int, n_rows: int) -> None:
        self.path, self.row_start = path, row_start
        try:
            with pa.memory_map(str(path)) as source:  # the table's buffers keep the mapping; no fd stays open
                self.table = pa.ipc.open_file(source).read_all()
            self.status = self.table.column("status").to_numpy()  # [rows] int8, 1 ok / 2 failed
            rows = self.table.column("row").to_numpy()
            self._id_column = Utf8Column(self.table.column("video_id"))
        except FileNotFoundError as e:
            raise StoreError(f"{path} is missing but its shard's ledger says it was committed; re-extract the shard") from e
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            raise StoreError(f"{path}: the shard's rows part is unreadable ({e}); run `vlpcache verify`, then re-extract the shard") from e
        # Comparisons, not np.isin: this runs on the first lookup in every shard (isin costs ~10x more).
        if len(rows) != n_rows or not (rows == np.arange(row_start, row_start + n_rows)).all() \
                or not ((self.status == 1) | (self.status == 2)).all():
            raise StoreError(f"{path}: rows part does not hold rows {row_start}..{row_start + n_rows - 1} with "
                             f"status ok/failed; the file is damaged: re-extract the shard")
        self._ids: list[str] | None = None
        self.ok_locals = np.flatnonzero(self.status == 1)  # [n_ok] local rows stored ok, in order
        self.meta_columns = [n for n in self.table.column_names if n.startswith(META_PREFIX)]

    def __len__(self) -> int:
        return len(self.status)


    @property
    def counts(self) -> dict[str, int]:
        return {"ok": len(self.ok_locals), "failed": int((self.status == 2).sum())}

    def video_id(self, local: int) -> str:
        if self._ids is not None:
            return self._ids[local]
        return self._id_column[local]

    def ids(self) -> list[str]:
        if self._ids is None:  # one conversion per shard, for whole-shard walks
            self._ids = self.table.column("video_id").to_pylist()
        return self._ids

    def record(self, local: int) -> VideoRecord:
        col = self.table.column
        meta = {n[len(META_PREFIX):]: v for n in self.meta_columns if (v := col(n)[local].as_py()) is not None}
        return VideoRecord(row=self.row_start + local, video_id=col("video_id")[local].as_py(),
                           caption=col("caption")[local].as_py(), status=STATUS_NAMES[int(self.status[local])],
                           error=col("error")[local].as_py(), flags=tuple(col("flags")[local].as_py()), meta=meta)

    @property
    def videos(self) -> tuple[VideoRecord, ...]:
        return tuple(self.record(i) for i in range(len(self)))

    def failures(self) -> list[tuple[str, str]]:
        failed = np.flatnonzero(self.status == 2)
        if not len(failed):
            return []
        ids, errors = self.ids(), self.table.column("error").to_pylist()
        return [(ids[i], errors[i] or "") for i in failed]

    def ok_ids(self) -> list[str]:
        ids = self.ids()
        return [ids[i] for i in self.ok_locals]
