"""The format-2 reader index: nothing at open grows with the corpus but the list of ledger names.

Open reads store.json and lists ledgers/ (the committed shards). Everything else is read on demand:
per-shard counts from the small ledgers (once, the first time `len()` / `video_ids` / `status` needs
them), a shard's rows part (ids, statuses, captions, metadata) through a memory map when one of its
rows is asked for, and an id's row through the memory-mapped hash table of stores/idindex.py.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from stores.errors import StoreError
from stores.idindex import IdIndex
from stores.ledger import FileRecord, Layout, ShardLedger, StoreMeta, StoreStatus, VideoRecord, committed_shards, load_ledger
from stores.rows import ShardRows

MAX_CACHED_SHARDS = 64  # ledgers
MAX_CACHED_ROWS = 1024  # rows parts: a few KB each (maps, statuses), for random lookups over many shards


class IndexV2:
    def __init__(self, layout: Layout, meta: StoreMeta, max_cached_rows: int = MAX_CACHED_ROWS) -> None:
        self.layout, self.meta, self.max_cached_rows = layout, meta, max_cached_rows
        self.committed = frozenset(committed_shards(layout))
        self._order = np.array(sorted(self.committed), dtype=np.int64)  # [C] committed shards, ascending
        self._counts: np.ndarray | None = None  # [C, 2] (ok, failed) per committed shard, from the ledgers
        self._has_ids = layout.index.exists()  # False: created without video_ids
        self._init_caches()

    def _init_caches(self) -> None:
        self._ledgers: OrderedDict[int, ShardLedger] = OrderedDict()
        self._rows: OrderedDict[int, ShardRows] = OrderedDict()
        self._ids: IdIndex | None = None
        self._scanned: dict[str, int] | None = None  # stores created without video_ids only
        self._ok_end: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Small whatever the corpus: shard numbers and counts; maps are reopened lazily by each process.
        return {"layout": self.layout, "meta": self.meta, "committed": self.committed, "_order": self._order,
                "_counts": self._counts, "_has_ids": self._has_ids, "max_cached_rows": self.max_cached_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # ---- per shard, cached

    def ledger(self, shard: int) -> ShardLedger:
        return _cached(self._ledgers, shard, lambda: load_ledger(self.layout, self.meta, shard))

    def rows(self, shard: int) -> ShardRows:
        part = self._rows.get(shard)  # the hot path of every lookup: a cached part, nothing else computed
        if part is not None:
            self._rows.move_to_end(shard)
            return part
        # At its fixed path: no ledger read on this hot path (verify checks the ledger's record of it).
        rows = self.meta.shard_rows(shard)
        return _cached(self._rows, shard, lambda: ShardRows(self.layout.rows_part(shard), rows.start, len(rows)),
                       self.max_cached_rows)

    def files(self, shard: int) -> dict[str, FileRecord]:
        return self.ledger(shard).files

    # ---- counts

    @property
    def counts(self) -> np.ndarray:  # [C, 2] (ok, failed) per committed shard, in shard order
        if self._counts is None:
            self._scan_ledgers()
        return self._counts

    def _scan_ledgers(self) -> list[tuple[str, str]]:
        """Read every committed ledger once (small files): counts, and the failures, which are returned."""
        counts, failures = np.zeros((len(self._order), 2), dtype=np.int64), []
        for i, shard in enumerate(self._order):
            ledger = load_ledger(self.layout, self.meta, int(shard))
            counts[i] = ledger.counts["ok"], ledger.counts["failed"]
            failures += ledger.failures
        self._counts = counts
        return failures

    def ok_end(self) -> np.ndarray:  # [C] number of ok videos up to and including each committed shard
        if self._ok_end is None:
            self._ok_end = np.cumsum(self.counts[:, 0])
        return self._ok_end

    @property
    def video_ids(self) -> OkIds:
        return OkIds(self)

    def status(self) -> StoreStatus:
        failures = self._scan_ledgers()
        ok, failed = (int(x) for x in self.counts.sum(axis=0))
        return StoreStatus(ok=ok, failed=failed, pending=self.meta.n_videos - ok - failed, failures=failures,
                           shards_committed=len(self._order), shards_total=self.meta.n_shards)

    # ---- lookups

    def find(self, video_id: str) -> tuple[int, str] | None:
        """(row, "ok" | "failed" | "pending") of a manifest id; None when the store does not know it."""
        row = self._row(video_id)
        if row is None:
            return None
        shard = self.meta.shard_of(row)
        if shard not in self.committed:
            return row, "pending"
        part = self.rows(shard)
        local = row - part.row_start
        if part.video_id(local) != video_id:
            raise StoreError(f"{self.layout.out}: the id index puts video {video_id!r} at row {row}, but shard {shard}'s "
                             f"rows part holds {part.video_id(local)!r} there; the store is damaged: run `vlpcache verify`")
        return row, "ok" if part.status[local] == 1 else "failed"

    def _row(self, video_id: str) -> int | None:
        if self._has_ids:
            if self._ids is None:
                self._ids = IdIndex(self.layout.index)
            return self._ids.row(video_id)
        if self._scanned is None:  # no id list was given at creation: only committed ids are known
            self._scanned = {}
            for s in self._order:
                part = self.rows(int(s))
                self._scanned.update(zip(part.ids(), range(part.row_start, part.row_start + len(part))))
        return self._scanned.get(video_id)

    def record(self, row: int) -> VideoRecord:
        shard = self.meta.shard_of(row)
        part = self.rows(shard)
        return part.record(row - part.row_start)


class OkIds(Sequence):
    """The ok video ids in manifest order, read shard by shard on demand (a lazy sequence)."""

    def __init__(self, index: IndexV2) -> None:
        self.index = index

    def __len__(self) -> int:
        end = self.index.ok_end()
        return int(end[-1]) if len(end) else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"video_ids index {i} out of range for {n} ok videos")
        i = int(i) % n
        end = self.index.ok_end()
        k = int(np.searchsorted(end, i, side="right"))
        part = self.index.rows(int(self.index._order[k]))
        return part.video_id(int(part.ok_locals[i - (int(end[k - 1]) if k else 0)]))

    def __iter__(self) -> Iterator[str]:
        for shard, (ok, _) in zip(self.index._order, self.index.counts):
            if ok:
                yield from self.index.rows(int(shard)).ok_ids()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"<{len(self)} ok video ids of {self.index.layout.out}>"


def _cached(cache: OrderedDict, key: int, load, limit: int = MAX_CACHED_SHARDS) -> Any:
    value = cache.get(key)
    if value is None:
        value = cache[key] = load()
        if len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value
