"""Reading format-1 stores: every ledger holds every record of its shard and is parsed at open.

Kept so that stores written before format 2 still open (O(corpus) at open, as they always were);
vlpcache writes only format 2. `vlpcache migrate OUT` (stores/migrate.py) converts such a store in place.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stores.errors import StoreError
from stores.ledger import (FileRecord, Layout, StoreMeta, StoreStatus, VideoRecord, checked_relpath, committed_shards,
                           load_ledger, read_ledger_json)
from stores.schema import STATUS_CODES


@dataclass(frozen=True)
class LedgerV1:
    shard: int
    row_start: int
    row_stop: int
    videos: tuple[VideoRecord, ...]
    files: dict[str, FileRecord]
    provenance_hash: str
    backend: str
    code_version: str = "unknown"  # kept by `vlpcache migrate`

    @property
    def counts(self) -> dict[str, int]:
        ok = sum(v.status == "ok" for v in self.videos)
        return {"ok": ok, "failed": len(self.videos) - ok}

    def record(self, row: int) -> VideoRecord:
        return self.videos[row - self.row_start]

    @classmethod
    def load(cls, path) -> LedgerV1:
        d = read_ledger_json(path, 1)
        try:
            videos = tuple(
                VideoRecord(row=int(v["row"]), video_id=str(v["video_id"]), caption=str(v["caption"]), status=v["status"],
                            error=v["error"], flags=tuple(v["flags"]), meta=dict(v["meta"]))
                for v in d["videos"]
            )
            ledger = cls(
                shard=int(d["shard"]), row_start=int(d["row_start"]), row_stop=int(d["row_stop"]), videos=videos,
                files={k: FileRecord(checked_relpath(f["path"], path), int(f["nbytes"]), int(f["crc32c"]))
                       for k, f in d["files"].items()},
                provenance_hash=d["provenance_hash"], backend=d["backend"], code_version=str(d.get("code_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: shard ledger is missing or has a bad field ({e!r}); delete it to redo the shard") from e
        if [v.row for v in videos] != list(range(ledger.row_start, ledger.row_stop)):
            raise StoreError(f"{path}: ledger rows do not cover {ledger.row_start}..{ledger.row_stop - 1} in order")
        if any(v.status not in ("ok", "failed") for v in videos):
            raise StoreError(f"{path}: ledger has a video status other than ok/failed")
        if d.get("counts") != ledger.counts:
            raise StoreError(f"{path}: ledger counts {d.get('counts')} disagree with its videos {ledger.counts}")
        return ledger


def load_video_ids(layout: Layout, meta: StoreMeta) -> list[str] | None:
    """OUT/video_ids.json, checked (None when the store was created without ids)."""
    path = layout.video_ids_json
    if not path.exists():
        return None
    try:
        ids = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is unreadable ({e}); delete it (only pending videos' names are lost)") from e
    if not isinstance(ids, list) or len(ids) != meta.n_videos or not all(isinstance(v, str) for v in ids):
        raise StoreError(f"{path}: expected a list of {meta.n_videos} video ids; delete it or re-extract")
    return ids


log = logging.getLogger(__name__)
_HINTED: set[str] = set()  # stores whose migrate hint this process logged: once each, not per open


class IndexV1:
    """Everything in memory: all ledgers parsed at open (the format-1 reader)."""

    def __init__(self, layout: Layout, meta: StoreMeta) -> None:
        self.layout, self.meta = layout, meta
        if str(layout.out) not in _HINTED:
            _HINTED.add(str(layout.out))
            log.warning("%s is a format-1 store: every open parses all its ledgers; `vlpcache migrate %s` converts it "
                        "to format 2 in place (docs/store-format.md)", layout.out, layout.out)
        self.ledgers = {s: load_ledger(layout, meta, s, LedgerV1) for s in sorted(committed_shards(layout))}
        self.committed = set(self.ledgers)
        self._row_of: dict[str, int] = {}
        self._failed: dict[str, tuple[int, str]] = {}
        self.video_ids: Sequence[str] = []
        for ledger in self.ledgers.values():
            for v in ledger.videos:
                if v.video_id in self._row_of or v.video_id in self._failed:
                    raise StoreError(f"video id {v.video_id!r} appears twice in {layout.out}; video ids must be unique in the manifest")
                if v.status == "ok":
                    self._row_of[v.video_id] = v.row
                    self.video_ids.append(v.video_id)
                else:
                    self._failed[v.video_id] = (v.row, v.error or "")
        self._all_ids = load_video_ids(layout, meta)

    def files(self, shard: int) -> dict[str, FileRecord]:
        return self.ledgers[shard].files

    def find(self, video_id: str) -> tuple[int, str] | None:
        """(row, "ok" | "failed" | "pending") of a manifest id, None when unknown."""
        if video_id in self._row_of:
            return self._row_of[video_id], "ok"
        if video_id in self._failed:
            return self._failed[video_id][0], "failed"
        if self._all_ids is not None and video_id in self._all_ids:
            return self._all_ids.index(video_id), "pending"
        return None

    def find_many(self, video_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B] rows (-1: unknown) and [B] status (0 pending or unknown, 1 ok, 2 failed), as IndexV2.find_many."""
        found = [self.find(v) for v in video_ids]
        return (np.array([-1 if f is None else f[0] for f in found], dtype=np.int64),
                np.array([0 if f is None else STATUS_CODES.get(f[1], 0) for f in found], dtype=np.int8))

    def record(self, row: int) -> VideoRecord:
        return self.ledgers[self.meta.shard_of(row)].record(row)

    def status(self) -> StoreStatus:
        done = sum(len(lg.videos) for lg in self.ledgers.values())
        failures = [(v.video_id, v.error or "") for lg in self.ledgers.values() for v in lg.videos if v.status == "failed"]
        return StoreStatus(ok=len(self.video_ids), failed=len(failures), pending=self.meta.n_videos - done,
                           failures=failures, shards_committed=len(self.ledgers), shards_total=self.meta.n_shards)
