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
# Rows parts kept open (LRU): each costs ~22 KB of Python objects plus the pages of its map that were
# touched (file-backed and shared between processes; a lookup touches ~100 KB with the kernel's fault-around,
# a record or caption read most of the file: ~250 KB with WebVid-like metadata). 1,024 covers every shard
# of a 1M-video store at 1,000 videos per shard, so random lookups there open each part once; the bound
# is then ~23 MB private and at most ~250 MB of shared page cache, whatever the corpus size.
MAX_CACHED_ROWS = 1024


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
        """(row, "ok" | "failed" | "pending") of a manifest id; None when the store does not know it.

        A row whose slot holds the id's hash is confirmed against one copy of the id: the shard's rows
        part when the shard is committed (the part is needed for the status anyway), else video_ids.arrow.
        Only when the rows part disagrees is video_ids.arrow asked too: a hash collision, or damage."""
        if not self._has_ids:
            row = self._scanned_row(video_id)
            return None if row is None else self._status(video_id, row, video_id.encode())
        if self._ids is None:
            self._ids = IdIndex(self.layout.index)
        key = video_id.encode()
        for row in self._ids.matches(key):
            if row // self.meta.shard_size not in self.committed:
                if self._ids.has_id(row, key):
                    return row, "pending"
                continue
            found = self._status(video_id, row, key)
            if found is not None:
                return found
        return None

    def _status(self, video_id: str, row: int, key: bytes) -> tuple[int, str] | None:
        shard = row // self.meta.shard_size
        if shard not in self.committed:
            return row, "pending"
        part = self.rows(shard)
        local = row - part.row_start
        if part.has_id(local, key):
            return row, "ok" if part.status[local] == 1 else "failed"
        if self._ids is None or self._ids.has_id(row, key):  # the index (or the scan of the parts) put the id here
            raise StoreError(f"{self.layout.out}: the id index puts video {video_id!r} at row {row}, but shard {shard}'s "
                             f"rows part holds {part.video_id(local)!r} there; the store is damaged: run `vlpcache verify`")
        return None  # another id with the same hash

    def find_many(self, video_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """find() for many ids at once: [B] rows (-1: unknown) and [B] int8 status (0 pending or unknown,
        1 ok, 2 failed). The id table is probed in numpy (IdIndex.rows); then each shard's rows part is
        taken from the cache once, its statuses gathered at once, and each id checked against it."""
        rows = self._rows_of(video_ids)  # [B]
        status = np.zeros(len(rows), dtype=np.int8)  # [B]
        shards = np.where(rows >= 0, rows // self.meta.shard_size, -1)  # [B]
        order = np.argsort(shards, kind="stable")
        cut = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, cut):  # the asked ids of one shard
            shard = int(shards[group[0]]) if len(group) else -1
            if shard < 0 or shard not in self.committed:
                continue
            part = self.rows(shard)
            local = rows[group] - part.row_start  # [G]
            for i, at in zip(group.tolist(), local.tolist()):
                if not part.has_id(at, video_ids[i].encode()):
                    raise StoreError(f"{self.layout.out}: the id index puts video {video_ids[i]!r} at row {rows[i]}, but "
                                     f"shard {shard}'s rows part holds {part.video_id(at)!r} there; the store is damaged: "
                                     f"run `vlpcache verify`")
            status[group] = part.status[local]
        return rows, status

    def _rows_of(self, video_ids: Sequence[str]) -> np.ndarray:  # [B] rows, -1 where unknown
        if self._has_ids:
            if self._ids is None:
                self._ids = IdIndex(self.layout.index)
            return self._ids.rows(video_ids)
        return np.array([-1 if (r := self._scanned_row(v)) is None else r for v in video_ids], dtype=np.int64)

    def _scanned_row(self, video_id: str) -> int | None:
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
