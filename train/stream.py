"""Streaming the features of a store: a torch IterableDataset for DataLoader workers, with exact resume.

    from torch.utils.data import DataLoader
    from train.stream import FeatureStream, StreamSpec
    stream = FeatureStream(StreamSpec("data/features/demo600", split="train", batch_size=64, workers=2))
    for batch in DataLoader(stream, batch_size=None, num_workers=2, pin_memory=True):
        video = batch_video(batch)  # VideoBatch: frame tokens, track/region tokens, masks
        ids, mask = batch["ids"], batch["mask"]  # MiniLM token ids of one caption per video

How the order is made without random access to the corpus (all of it index arithmetic, no I/O):
- The committed shards are cut into pieces (contiguous row ranges of one shard); each epoch permutes the
  pieces with a seeded generator and deals them to the W*R stream slots (R ranks x W workers): the
  slots' pieces are disjoint, so ranks and workers never see the same video in an epoch.
- A slot reads its pieces in order, grouped in windows of at least `shuffle_buffer` rows; the rows of
  a window are permuted (the shuffle buffer). A batch reads whole chunks (one chunk = one video) from the
  few shards of one window, grouped by shard.
- The stream is endless (epoch after epoch); a slot's position is (epoch, rows consumed in the epoch).

Exact resume: every batch carries its slot's position after it; the consumer keeps the latest
position per slot and which worker serves next (DataLoader serves its workers round-robin), and hands
that `StreamState` back to start where it stopped: the batches after a resume are the batches an
uninterrupted run would have seen.

Bad input: rows whose features hold NaN/Inf or whose caption is empty after tokenisation are skipped
with a counted warning; a store still being written streams its committed shards (the pending count is
logged).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stores import open_store
from stores.schema import ARRAYS
from train.data import DataError, check_finite, video_batch
from train.model import VideoBatch
from train.text import CaptionTokenizer, resolve_model_dir

log = logging.getLogger(__name__)
PIECES_PER_SLOT = 8  # shards are cut so that every slot gets several pieces per epoch (balance)


@dataclass
class StreamSpec:
    features: str
    split: str = "train"  # the meta `split` value streamed ("" = every ok video)
    batch_size: int = 64  # videos per batch of this rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 0  # DataLoader workers the stream is read with (0 = the main process)
    shuffle_buffer: int = 10_000  # rows permuted together (a window of whole pieces)
    units: str = "track"
    max_units: int = 8
    text_model_dir: str = ""
    max_tokens: int = 40
    long_captions: str = "truncate"
    shards: tuple[int, ...] = ()  # committed shards streamed; () = those committed at start


@dataclass
class StreamState:
    """Where each slot of this rank stands: (epoch, rows consumed) per worker, and the next worker served."""

    cursors: list[tuple[int, int]] = field(default_factory=list)
    next_worker: int = 0

    def advance(self, worker: int, cursor: tuple[int, int]) -> None:
        self.cursors[worker] = cursor
        self.next_worker = (worker + 1) % len(self.cursors)

    def to_dict(self) -> dict:
        return {"cursors": torch.tensor(self.cursors, dtype=torch.int64).reshape(-1, 2),
                "next_worker": self.next_worker}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls([tuple(int(x) for x in row) for row in d["cursors"].tolist()], int(d["next_worker"]))


class ShardSource:
    """Per-process access to a store by rows, through the public reader (`stores.open_store`): with the
    store index, opening is O(1) and a row's record / a shard's data are read on demand, so no worker
    holds every ledger."""

    def __init__(self, features: str):
        self.reader = open_store(features)
        self.meta = self.reader.store_meta

    def committed(self) -> list[int]:
        pending = set(self.reader.pending_shards())
        return [s for s in range(self.meta.n_shards) if s not in pending]

    def record(self, row: int):
        return self.reader.record(row)

    def read(self, rows: list[int]) -> dict[str, np.ndarray]:
        """Arrays [n, ...] of the given ok rows (whole chunks, each shard file opened once), in order."""
        a = self.reader.read_rows(rows)
        return {name: a[name] for name in ARRAYS}


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


class StreamPlan:
    """The row order of every slot in every epoch, from index arithmetic only."""

    def __init__(self, shards: list[int], shard_size: int, n_videos: int, slots: int, seed: int, buffer: int):
        self.slots, self.seed, self.buffer = slots, seed, max(1, buffer)
        cuts = max(1, math.ceil(PIECES_PER_SLOT * slots / max(1, len(shards))))
        self.pieces: list[tuple[int, int]] = []  # (row start, row stop)
        for s in shards:
            start, stop = s * shard_size, min((s + 1) * shard_size, n_videos)
            step = max(1, math.ceil((stop - start) / cuts))
            self.pieces += [(a, min(a + step, stop)) for a in range(start, stop, step)]
        if len(self.pieces) < slots:
            raise DataError(f"{len(self.pieces)} rows to stream cannot feed {slots} stream slots "
                            "(ranks x DataLoader workers); use fewer workers or ranks")

    def rows(self, epoch: int, slot: int) -> np.ndarray:
        """[n] the rows slot `slot` reads in `epoch`, in order."""
        order = _rng(self.seed, epoch).permutation(len(self.pieces))[slot::self.slots]
        out, window = [], []
        for i, p in enumerate(order):
            window.append(np.arange(*self.pieces[p]))
            if sum(len(w) for w in window) >= self.buffer or i == len(order) - 1:
                rows = np.concatenate(window)
                out.append(rows[_rng(self.seed, epoch, slot, len(out)).permutation(len(rows))])
                window = []
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _captions_of(record) -> list[str]:
    """The video's captions: `caption` plus a `captions` meta column (a JSON list), duplicates dropped."""
    extra = record.meta.get("captions", "")
    if not extra:
        return [record.caption]
    try:
        more = json.loads(extra)
    except ValueError as e:
        raise DataError(f"video {record.video_id!r}: the `captions` column must be a JSON list of strings, "
                        f"got {extra[:80]!r}") from e
    if not isinstance(more, list) or not all(isinstance(c, str) for c in more):
        raise DataError(f"video {record.video_id!r}: the `captions` column must be a JSON list of strings, got {more!r}")
    return list(dict.fromkeys([record.caption, *more]))


class FeatureStream(IterableDataset):
    """Endless batches of one rank: dicts with the video tokens, one caption per video (sampled per
    epoch, seeded) as MiniLM token ids, the video ids, and the slot position after the batch."""

    def __init__(self, spec: StreamSpec, state: StreamState | None = None):
        super().__init__()
        self.spec = spec
        source = ShardSource(spec.features)
        self.meta = source.meta
        self.shard_size, self.n_videos = source.meta.shard_size, source.meta.n_videos
        committed = source.committed()
        shards = list(spec.shards) if spec.shards else committed
        lost = sorted(set(shards) - set(committed))
        if lost:
            raise DataError(f"shards {lost[:10]} of {spec.features!r} were streamed before but are no longer "
                            "committed; resume against the store the run started on")
        if not shards:
            raise DataError(f"store {spec.features!r} has no committed shard yet ({source.meta.n_shards} pending); "
                            "wait for `vlpcache extract` to commit one, see `vlpcache status`")
        pending = source.meta.n_shards - len(committed)
        if pending:
            log.warning("store %s is still being written: streaming %d committed shards, %d pending (not used "
                        "by this run)", spec.features, len(shards), pending)
        self.shards = tuple(shards)
        self.n_workers = max(1, spec.workers)
        self.plan = StreamPlan(list(shards), self.shard_size, self.n_videos, spec.world_size * self.n_workers,
                               spec.seed, spec.shuffle_buffer)
        self.state = state or StreamState([(0, 0)] * self.n_workers, 0)
        if len(self.state.cursors) != self.n_workers:
            raise DataError(f"stream state has {len(self.state.cursors)} worker cursors, the stream {self.n_workers}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.n_workers:
            raise DataError(f"FeatureStream was made for {self.n_workers} DataLoader workers (StreamSpec.workers); "
                            "read it with as many")
        worker = (physical + self.state.next_worker) % self.n_workers  # DataLoader starts with physical 0
        return _SlotReader(self, worker).batches()


class _SlotReader:
    """One worker's side of the stream: reads its slot's rows, skips bad ones, yields batches."""

    def __init__(self, stream: FeatureStream, worker: int):
        s = stream.spec
        self.stream, self.spec, self.worker = stream, s, worker
        self.slot = s.rank * stream.n_workers + worker
        self.source = ShardSource(s.features)
        self.tokenizer = CaptionTokenizer(resolve_model_dir(s.text_model_dir), s.max_tokens, s.long_captions)
        self.epoch, self.pos = stream.state.cursors[worker]
        self.skipped = {"nonfinite": 0, "empty_caption": 0}
        self._rows = None
        self.splits_seen: set[str] = set()

    def _epoch_rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self.stream.plan.rows(self.epoch, self.slot)
        return self._rows

    def _next_raw(self, n: int) -> list[int]:
        """Up to n next rows of the slot's order in the current epoch ([] at its end)."""
        rows = self._epoch_rows()
        take = rows[self.pos:self.pos + n]
        self.pos += len(take)
        return take.tolist()

    def _next_epoch(self) -> None:
        self.epoch, self.pos, self._rows = self.epoch + 1, 0, None

    def _wanted(self, row: int):
        """The ledger record if the row is an ok video of the split, else None."""
        record = self.source.record(row)
        self.splits_seen.add(record.meta.get("split", ""))
        if record.status != "ok" or (self.spec.split and record.meta.get("split", "") != self.spec.split):
            return None
        return record

    def _caption(self, record) -> str:
        captions = _captions_of(record)
        return captions[int(_rng(self.spec.seed, self.epoch, record.row).integers(len(captions)))]

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches within one epoch each (an epoch's incomplete last batch is dropped, so a batch never
        holds a video twice)."""
        B, empty_epochs, yielded = self.spec.batch_size, 0, False
        while True:
            rows, records, captions, arrays = [], [], [], []
            while len(rows) < B:
                raw = self._next_raw(B - len(rows))
                if not raw:  # end of the epoch
                    empty_epochs = 0 if yielded else empty_epochs + 1
                    if empty_epochs >= 2:
                        raise DataError(f"stream slot {self.slot} of {self.spec.features!r} found fewer than "
                                        f"{B} usable {self.spec.split!r} videos in whole epochs (split values seen: "
                                        f"{sorted(self.splits_seen)}); check the split name, or lower the batch "
                                        "size or the number of workers/ranks")
                    self._next_epoch()
                    yielded, rows, records, captions, arrays = False, [], [], [], []
                    continue
                for row, rec, caption, a in self._read([(r, rec) for r in raw if (rec := self._wanted(r)) is not None]):
                    rows.append(row), records.append(rec), captions.append(caption), arrays.append(a)
            yielded = True
            yield self._batch(rows, records, captions, arrays)

    def _read(self, items: list) -> list:
        """Read the rows (grouped by shard), drop non-finite features and empty captions (counted)."""
        by_shard: dict[int, list] = {}
        for row, rec in items:
            by_shard.setdefault(row // self.stream.shard_size, []).append((row, rec))
        got = {}
        for part in by_shard.values():
            a = self.source.read([r for r, _ in part])
            finite = check_finite(a)  # [n] bool
            captions = [self._caption(rec) for _, rec in part]
            words = self.tokenizer.word_counts(captions)
            for i, (row, rec) in enumerate(part):
                if not finite[i]:
                    self._skip("nonfinite", rec.video_id, "its features contain NaN or Inf")
                elif words[i] == 0:
                    self._skip("empty_caption", rec.video_id, f"its caption {captions[i]!r} is empty after tokenisation")
                else:
                    got[row] = (row, rec, captions[i], {k: v[i] for k, v in a.items()})
        return [got[r] for r, _ in items if r in got]  # the stream's order

    def _skip(self, kind: str, video_id: str, why: str) -> None:
        self.skipped[kind] += 1
        log.warning("skipping video %r: %s (%d skipped so far for this reason by stream slot %d)",
                    video_id, why, self.skipped[kind], self.slot)

    def _batch(self, rows, records, captions, arrays) -> dict[str, Any]:
        a = {k: np.stack([x[k] for x in arrays]) for k in ARRAYS}
        video = video_batch(a, self.spec.units, self.spec.max_units)
        tokens = self.tokenizer(captions)
        return {"video": {f: getattr(video, f) for f in VideoBatch.__dataclass_fields__},
                "ids": tokens.ids, "mask": tokens.mask, "phrase": tokens.phrase, "truncated": tokens.truncated,
                "rows": torch.tensor(rows), "video_ids": [r.video_id for r in records], "captions": captions,
                "worker": self.worker, "cursor": (self.epoch, self.pos), "skipped": dict(self.skipped)}


def batch_video(batch: dict[str, Any]) -> VideoBatch:
    """The VideoBatch of a streamed batch (features as stored: float16; `.float()` casts them)."""
    return VideoBatch(**batch["video"])
