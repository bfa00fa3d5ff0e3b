"""Per-shard rows part `rows/shard-NNNNNN.arrow`: one row per video of the shard, read through a memory map.

An Arrow IPC file (uncompressed, so it maps with no copy) with the columns
`row` int64, `video_id` utf8, `status` int8 (1 ok, 2 failed), `caption` utf8, `error` utf8 (null
when ok), `flags` list<utf8>, and one utf8 column `meta.<key>` per manifest extra column (null where
the row has no such key), and its buffer sidecar `rows/shard-NNNNNN.buffers.json`
(stores/arrow_buffers.py), through which readers map it without pyarrow. Both are written before the
ledger, which records their sizes and crc32c.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from stores.arrow_buffers import StringListColumn, Utf8Column, open_columns, write_sidecar
from stores.errors import StoreError
from stores.ledger import VideoRecord
from stores.schema import STATUS_CODES, STATUS_NAMES

META_PREFIX = "meta."


def write_rows(path: Path, shard: int, records: Sequence[VideoRecord], final_name: str) -> Path:
    """Write and fsync the rows part and its buffer sidecar (the caller renames both into place, the
    part under final_name); returns the sidecar's path."""
    import pyarrow as pa  # writers only: readers map the file through its sidecar

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
    return write_sidecar(path, final_name)


class ShardRows:
    """The rows part of one committed shard, mapped; columns are decoded only when asked for.

    Read through its buffer sidecar (no pyarrow: a process that looks ids up or reads captions and
    metadata never imports it), or through pyarrow for a part written before sidecars."""

    def __init__(self, path: Path, row_start: int, n_rows: int) -> None:
        self.path, self.row_start = path, row_start
        try:
            self._file = open_columns(path)
            self.status = self._file.ints("status")  # [rows] int8, 1 ok / 2 failed
            rows = self._file.ints("row")  # [rows] int64
            self._id_column = self._file.strings("video_id")
        except FileNotFoundError as e:
            raise StoreError(f"{path} is missing but its shard's ledger says it was committed; re-extract the shard") from e
        except OSError as e:
            raise StoreError(f"{path}: the shard's rows part is unreadable ({e}); run `vlpcache verify`, then re-extract the shard") from e
        # Comparisons, not np.isin: this runs on the first lookup in every shard (isin costs ~10x more).
        if len(rows) != n_rows or len(self._id_column) != n_rows or self._id_column.null_count \
                or not (rows == np.arange(row_start, row_start + n_rows)).all() \
                or not ((self.status == 1) | (self.status == 2)).all():
            raise StoreError(f"{path}: rows part does not hold rows {row_start}..{row_start + n_rows - 1} with "
                             f"ids and status ok/failed; the file is damaged: re-extract the shard")
        self._ids: list[str] | None = None
        self._columns: dict[str, Utf8Column | StringListColumn] = {}
        self.meta_columns = [n for n in self._file.names if n.startswith(META_PREFIX)]

    def __len__(self) -> int:
        return len(self.status)

    @cached_property
    def ok_locals(self) -> np.ndarray:  # [n_ok] local rows stored ok, in order
        return np.flatnonzero(self.status == 1)

    @property
    def counts(self) -> dict[str, int]:
        return {"ok": int((self.status == 1).sum()), "failed": int((self.status == 2).sum())}

    def video_id(self, local: int) -> str:
        if self._ids is not None:
            return self._ids[local]
        return self._id_column[local]

    def has_id(self, local: int, key: bytes) -> bool:
        """Whether row `local` holds the id whose utf-8 bytes are key (the lookup hot path: no decoding)."""
        return self._id_column.equals(local, key)

    def ids(self) -> list[str]:
        if self._ids is None:  # one conversion per shard, for whole-shard walks
            self._ids = self._id_column.to_list()
        return self._ids

    def _column(self, name: str) -> Utf8Column | StringListColumn:
        column = self._columns.get(name)
        if column is None:
            read = self._file.string_lists if name == "flags" else self._file.strings
            column = self._columns[name] = read(name)
        return column

    def record(self, local: int) -> VideoRecord:
        if not 0 <= local < len(self):
            raise IndexError(f"row {self.row_start + local} is not in {self.path} (rows {self.row_start}..{self.row_start + len(self) - 1})")
        meta = {n[len(META_PREFIX):]: v for n in self.meta_columns if (v := self._column(n)[local]) is not None}
        return VideoRecord(row=self.row_start + local, video_id=self.video_id(local), caption=self._column("caption")[local],
                           status=STATUS_NAMES[int(self.status[local])], error=self._column("error")[local],
                           flags=tuple(self._column("flags")[local] or ()), meta=meta)

    @property
    def videos(self) -> tuple[VideoRecord, ...]:
        return tuple(self.record(i) for i in range(len(self)))

    def failures(self) -> list[tuple[str, str]]:
        errors = self._column("error")
        return [(self.video_id(i), errors[i] or "") for i in np.flatnonzero(self.status == 2).tolist()]

    def ok_ids(self) -> list[str]:
        ids = self.ids()
        return [ids[i] for i in self.ok_locals.tolist()]
