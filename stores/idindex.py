"""The store's id index: every manifest video id in row order, and a hash table from id to row.

Both are written once, when the store is created, from an iterable of ids in bounded memory (batches
of BATCH ids), and read through memory maps: opening costs nothing and a lookup touches a few pages,
whatever the corpus size.

- `index/video_ids.arrow`: an Arrow IPC file with one utf8 column `video_id`, row i = manifest row i,
  and its buffer sidecar `index/video_ids.buffers.json` (stores/arrow_buffers.py): readers map the ids
  without pyarrow.
- `index/id_table.npy`: an open-addressing hash table of M = 2^k >= 4/3 N slots, each (hash uint64,
  row int32; -1 = empty); hash = the first 8 bytes (little-endian uint64) of blake2b(utf-8 id,
  digest_size=8); an id's probe sequence starts at slot hash & (M - 1) and steps by 1 (wrapping) up to
  the first empty slot.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import struct
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stores.arrow_buffers import open_columns, write_sidecar
from stores.errors import StoreError
from stores.io import fsync_path

if TYPE_CHECKING:
    import pyarrow as pa  # writing and verify only: readers map the ids through the sidecar

BATCH = 65536
INSERT_SLICE = BATCH // 8  # ids inserted between two releases of the table's pages
IDS_FILE = "video_ids.arrow"
TABLE_FILE = "id_table.npy"
SLOT = np.dtype([("hash", "<u8"), ("row", "<i4")])
_SLOT = struct.Struct("<Qi")  # one slot, for single lookups: unpacking costs less than two numpy scalar reads


def id_hash(video_id: str) -> int:
    return _key_hash(video_id.encode())


def _key_hash(key: bytes) -> int:  # key: an id's utf-8 bytes
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _hashes(ids: list[str]) -> np.ndarray:  # [B] uint64
    return _key_hashes([v.encode() for v in ids])


def _key_hashes(keys: list[bytes]) -> np.ndarray:  # [B] uint64
    return np.frombuffer(b"".join(hashlib.blake2b(k, digest_size=8).digest() for k in keys), dtype="<u8")


def table_slots(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(max(1, n) * 4 / 3)))


def write_id_index(folder: Path, video_ids: Iterable[str], n_videos: int) -> None:
    """Stream ids into folder/{video_ids.arrow, its sidecar, id_table.npy}; StoreError on a count mismatch or
    a repeated id."""
    import pyarrow as pa

    schema = pa.schema([pa.field("video_id", pa.string(), nullable=False)])
    folder.mkdir(parents=True)
    with _TableMap(folder / TABLE_FILE, table_slots(n_videos)) as table:
        same_hash: list[tuple[int, int]] = []  # (row, row) pairs with equal hashes: compared as strings below
        n = 0
        with pa.OSFile(str(folder / IDS_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as ipc:
            for batch in _batches(video_ids):
                if n + len(batch) > n_videos:
                    raise StoreError(f"video_ids has more than n_videos={n_videos} entries; pass one id per manifest row")
                ipc.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                hashes, rows = _hashes(batch), np.arange(n, n + len(batch), dtype=np.int32)
                # By home slot, then a slice at a time: each slice writes one stretch of the table.
                order = np.argsort(hashes & np.uint64(len(table.slots) - 1), kind="stable")
                for i in range(0, len(batch), INSERT_SLICE):
                    part = order[i:i + INSERT_SLICE]
                    same_hash += _insert(table.slots, hashes[part], rows[part])
                    table.release()
                n += len(batch)
        if n != n_videos:
            raise StoreError(f"video_ids has {n} entries but n_videos={n_videos}; pass one id per manifest row")
    sidecar = write_sidecar(folder / IDS_FILE)
    ids = IdIndex(folder)
    for a, b in same_hash:
        if ids.video_id(a) == ids.video_id(b):
            raise StoreError(f"video id {ids.video_id(a)!r} appears twice in the manifest (rows {min(a, b)} and "
                             f"{max(a, b)}); video ids must be unique: fix the manifest")
    ids.close()
    for path in (folder / IDS_FILE, sidecar, folder / TABLE_FILE):
        fsync_path(path)
    fsync_path(folder)


class _TableMap:
    """The id table being written, as a shared file mapping whose pages are handed back to the page cache
    (`release`) after each slice of inserts. The table is 12 bytes x 4/3 N (about 200 MB at 10M ids) and
    random inserts touch all of it, so without this the extract driver would hold the whole table. A
    batch's ids are inserted in home-slot order, INSERT_SLICE at a time, so at most about
    INSERT_SLICE / BATCH of the table (1/8) is mapped at once. Dirty pages stay in the page cache and
    reach the file as usual: MADV_DONTNEED on a shared file mapping drops the mapping, not the data."""

    def __init__(self, path: Path, n_slots: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=SLOT, shape=(n_slots,))  # writes the .npy header
        offset = header.offset
        del header
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), 0)
        self.slots = np.frombuffer(self._map, dtype=SLOT, count=n_slots, offset=offset)  # [M] (hash, row)
        block = max(1, n_slots // 8)
        for i in range(0, n_slots, block):  # -1 = empty, an eighth at a time for the same reason
            self.slots["row"][i:i + block] = -1
            self.release()

    def release(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)

    def __enter__(self) -> _TableMap:
        return self

    def __exit__(self, *exc) -> None:
        self._map.flush()
        del self.slots  # the buffer export must go before the map closes
        try:
            self._map.close()
        except BufferError:  # an exception's traceback still holds a view: the map closes with it
            pass
        self._file.close()


def rebuild_table(ids: pa.ChunkedArray, n_videos: int) -> np.ndarray:
    """The id table of `ids` in memory, built batch by batch like write_id_index (what verify compares the
    stored id_table.npy with)."""
    table = np.zeros(table_slots(n_videos), dtype=SLOT)  # [M] (hash, row)
    table["row"] = -1
    for start in range(0, n_videos, BATCH):
        batch = ids[start: start + BATCH].to_pylist()
        hashes, rows = _hashes(batch), np.arange(start, start + len(batch), dtype=np.int32)
        # The writer's insertion order (home slot, INSERT_SLICE at a time): probing places ids by order.
        order = np.argsort(hashes & np.uint64(len(table) - 1), kind="stable")
        for i in range(0, len(batch), INSERT_SLICE):
            _insert(table, hashes[order[i:i + INSERT_SLICE]], rows[order[i:i + INSERT_SLICE]])
    return table


def _batches(video_ids: Iterable[str]) -> Iterator[list[str]]:
    it = iter(video_ids)
    while batch := [str(v) for v in islice(it, BATCH)]:
        yield batch


def _insert(table: np.ndarray, hashes: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """Vectorised linear-probing insert of one batch; returns row pairs whose hashes are equal."""
    mask = np.uint64(len(table) - 1)
    slot = (hashes & mask).astype(np.int64)
    todo = np.arange(len(hashes))
    pairs: list[tuple[int, int]] = []
    while len(todo):
        s = slot[todo]
        held = table["row"][s]
        free = held < 0
        clash = ~free & (table["hash"][s] == hashes[todo])
        pairs += zip(held[clash].tolist(), rows[todo[clash]].tolist())
        # Among items aiming at the same free slot, the first takes it; the others look at it again
        # next round (now taken), which also catches equal hashes inside one batch.
        cand, cand_slot = todo[free], s[free]
        taken, first = np.unique(cand_slot, return_index=True)
        table["row"][taken] = rows[cand[first]]
        table["hash"][taken] = hashes[cand[first]]
        placed = np.zeros(len(hashes), dtype=bool)
        placed[cand[first]] = True
        move = todo[~free]
        slot[move] = (slot[move] + 1) & int(mask)
        todo = todo[~placed[todo]]
    return pairs


class IdIndex:
    """Memory-mapped id -> row lookups and row -> id; opening maps two files and reads their small headers
    (the .npy header, the ids' buffer sidecar)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self._ids = open_columns(folder / IDS_FILE).strings("video_id")  # [N] utf8
            self._table = np.load(folder / TABLE_FILE, mmap_mode="r")  # [M] (hash, row)
        except (OSError, ValueError) as e:
            raise StoreError(f"{folder}: the store's id index is unreadable ({e}); it is written once, when the "
                             f"store is created: restore it from a backup, or re-extract into a new --out") from e
        if self._ids.null_count:
            raise StoreError(f"{folder / IDS_FILE}: {self._ids.null_count} null video id(s); the index is damaged")
        if self._table.dtype != SLOT or len(self._table) & (len(self._table) - 1):
            raise StoreError(f"{folder / TABLE_FILE}: not a vlpcache id table (dtype {self._table.dtype}, "
                             f"{len(self._table)} slots); the index is damaged")
        self._mask = len(self._table) - 1
        self._bytes = memoryview(self._table.view(np.ndarray).view(np.uint8))  # [12 M] the slots' bytes, for _SLOT

    def __len__(self) -> int:
        return len(self._ids)

    def video_id(self, row: int) -> str:
        return self._ids[row]

    def row(self, video_id: str) -> int | None:
        key = video_id.encode()
        for row in self.matches(key):
            if self._ids.equals(row, key):
                return row
        return None

    def matches(self, key: bytes) -> list[int]:
        """Rows whose slot holds key's hash, in probe order (nearly always one, or none): the candidates
        for key, to be confirmed by comparing ids (`has_id`, or another copy of the id at that row)."""
        h = _key_hash(key)
        slot, mask, unpack, table = h & self._mask, self._mask, _SLOT.unpack_from, self._bytes
        found = []
        for _ in range(mask + 1):
            slot_hash, row = unpack(table, 12 * slot)
            if row < 0:
                break
            if slot_hash == h:
                found.append(row)
            slot = (slot + 1) & mask
        return found

    def has_id(self, row: int, key: bytes) -> bool:
        """Whether the id at row is the one whose utf-8 bytes are key."""
        return self._ids.equals(row, key)

    def rows(self, video_ids: Sequence[str]) -> np.ndarray:
        """[B] int64 rows of many ids at once, -1 for an id not in the index: the probes run in numpy,
        all ids a round (one slot step) at a time; only ids whose hash matches a slot's are compared."""
        keys = [v.encode() for v in video_ids]
        hashes = _key_hashes(keys)  # [B]
        out = np.full(len(keys), -1, dtype=np.int64)  # [B]
        slot = (hashes & np.uint64(self._mask)).astype(np.int64)  # [B]
        todo = np.arange(len(keys))  # ids still probing
        table = self._table.view(np.ndarray)
        slot_hash, slot_row = table["hash"], table["row"]  # [M] each
        for _ in range(self._mask + 1):
            if not len(todo):
                break
            row = slot_row[slot[todo]]  # [T]
            live = row >= 0  # an empty slot ends an id's probe: not in the index
            cand = np.flatnonzero(live & (slot_hash[slot[todo]] == hashes[todo]))
            for c in cand.tolist():
                i, r = int(todo[c]), int(row[c])
                if out[i] < 0 and self._ids.equals(r, keys[i]):
                    out[i] = r
            todo = todo[live & (out[todo] < 0)]
            slot[todo] = (slot[todo] + 1) & self._mask
        return out

    def close(self) -> None:
        self._ids = self._table = self._bytes = None
