"""Streaming the features of a store: a torch IterableDataset for DataLoader workers, with exact resume.

    from torch.utils.data import DataLoader
    from train.stream import FeatureStream, StreamSpec, batch_video
    stream = FeatureStream(StreamSpec("data/features/demo600", split="train", batch_size=64, workers=2))
    for batch in DataLoader(stream, batch_size=None, num_workers=2, pin_memory=True):
        video = batch_video(batch)  # VideoBatch: frame tokens, track/region tokens, masks
        ids, mask = batch["ids"], batch["mask"]  # MiniLM token ids of one caption per video
        stream.state.advance(batch["cursor"])  # stream.state.to_dict() resumes exactly

How the order is made without random access to the corpus (index arithmetic, then records):
- The committed shards are cut into pieces (contiguous row ranges of one shard); each epoch permutes the
  pieces with a seeded generator and deals them to the ranks: ranks read disjoint videos in an epoch.
- A rank reads its pieces in order, grouped in windows of at least `shuffle_buffer` rows; the rows of
  a window are permuted (the shuffle buffer). A batch is the next `batch_size` usable rows (ok, of the
  split, non-empty caption: from the records only) within one epoch; it reads whole chunks (one chunk =
  one video) of the window's few shards, grouped by shard.
- With W DataLoader workers, every worker walks the rank's order through the records, and worker w
  reads the data of batches w, w + W, ...: DataLoader serves its workers round-robin, so the batches
  come in the order one process would make them, whatever W.
- The stream is endless; its position is (epoch, rows of the epoch's order consumed). Every batch
  carries the position after it; handing the last one back (`StreamState`) restarts the stream exactly
  there: the batches after a resume are the batches an uninterrupted run sees.

Bad input: videos whose features hold NaN/Inf (found when the batch is read: the batch is one smaller)
or whose caption is empty after tokenisation are skipped with a counted warning; a store still being
written streams its committed shards (the pending count is logged).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stores import open_store
from stores.schema import ARRAYS
from train.data import DataError, VideoTokenCache, video_captions
from train.model import VideoBatch
from train.text import CaptionTokenizer, resolve_model_dir

log = logging.getLogger(__name__)
PIECES_PER_SLOT = 8  # shards are cut so that every rank gets several pieces per epoch (balance)


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
    cache_mb: int = 256  # each worker keeps every video's tokens when all the streamed rows' fit in this


@dataclass
class StreamState:
    """Where this rank's stream stands: (epoch, rows of the epoch's order consumed) after the last batch."""

    cursor: tuple[int, int] = (0, 0)

    def advance(self, cursor) -> None:
        self.cursor = (int(cursor[0]), int(cursor[1]))

    def to_dict(self) -> dict:
        return {"cursor": torch.tensor(self.cursor, dtype=torch.int64)}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        epoch, pos = d["cursor"].tolist()
        return cls((int(epoch), int(pos)))


class ShardSource:
    """Per-process access to a store by rows, through the public reader (`stores.open_store`): with the
    store index, opening is O(1) and a row's record / a shard's data are read on demand, so no worker
    holds every ledger. open_shards: how many shards' files and rows parts at most stay mapped (no more
    than the reader's defaults; the defaults when 0)."""

    def __init__(self, features: str, open_shards: int = 0):
        bounds = {"max_open_shards": min(64, open_shards), "max_cached_rows": min(1024, open_shards)} \
            if open_shards else {}
        self.reader = open_store(features, **bounds)
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


@dataclass(slots=True)
class _Row:
    """What the stream needs of a row's record."""

    video_id: str
    split: str
    captions: list[str]  # every caption (train.data.video_captions); [] = not an ok video of the split


ROW_CACHE = 20_000  # records kept per worker (~300 bytes each) when the stream has no more rows


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
        self.sizes = np.array([b - a for a, b in self.pieces], dtype=np.int64)  # [pieces] rows in each
        # A window closes once it holds >= buffer rows, so it has at most this many pieces (each of one
        # shard); a batch can straddle two windows.
        self.window_pieces = min(len(self.pieces), math.ceil(self.buffer / int(self.sizes.min())))

    def order(self, epoch: int, slot: int) -> EpochOrder:
        """The rows slot `slot` reads in `epoch`, in order (made one shuffle window at a time)."""
        return EpochOrder(self, epoch, slot)


class EpochOrder:
    """One slot's row order in one epoch: its pieces (a seeded permutation of all pieces, dealt to the
    slots) in windows of >= buffer rows, each window's rows permuted. Only the window being read is
    materialised: a reader holds ~buffer rows, never the epoch's rows (8 MB a worker at 1M videos)."""

    def __init__(self, plan: StreamPlan, epoch: int, slot: int):
        self.plan, self.key = plan, (plan.seed, epoch, slot)
        pieces = _rng(plan.seed, epoch).permutation(len(plan.pieces))[slot::plan.slots]  # [P] piece numbers
        filled = np.cumsum(plan.sizes[pieces])  # [P] rows up to and including each piece
        self.windows: list[np.ndarray] = []  # piece numbers of each window, in order
        start = 0
        for i, rows in enumerate(filled):
            if rows - (filled[start - 1] if start else 0) >= plan.buffer or i == len(pieces) - 1:
                self.windows.append(pieces[start:i + 1])
                start = i + 1
        self.ends = np.cumsum([plan.sizes[w].sum() for w in self.windows], dtype=np.int64)  # [windows]
        self._window, self._rows = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, w: int) -> np.ndarray:
        """[rows of window w] permuted; the last one asked for is kept."""
        if w != self._window:
            rows = np.concatenate([np.arange(*self.plan.pieces[p]) for p in self.windows[w]])
            self._window, self._rows = w, rows[_rng(*self.key, w).permutation(len(rows))]
        return self._rows

    def take(self, pos: int, n: int) -> list[int]:
        """Rows pos .. pos + n - 1 of the order (fewer at its end)."""
        out: list[int] = []
        while len(out) < n and pos < len(self):
            w = int(np.searchsorted(self.ends, pos, side="right"))
            start = int(self.ends[w - 1]) if w else 0
            part = self.window(w)[pos - start:pos - start + n - len(out)].tolist()
            out += part
            pos += len(part)
        return out


class FeatureStream(IterableDataset):
    """Endless batches of one rank: dicts with the video tokens, one caption per video (sampled per
    epoch, seeded) as MiniLM token ids, the video ids, and the stream position after the batch."""

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
        self.plan = StreamPlan(list(shards), self.shard_size, self.n_videos, spec.world_size, spec.seed,
                               spec.shuffle_buffer)
        self.state = state or StreamState()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if (info.num_workers if info is not None else 1) != self.n_workers:
            raise DataError(f"FeatureStream was made for {self.n_workers} DataLoader workers (StreamSpec.workers); "
                            "read it with as many")
        return _RankReader(self, info.id if info is not None else 0).batches()


class _RankReader:
    """One worker's side of its rank's stream. Every worker walks the rank's row order through the
    records only (status, split, caption) to find where each batch starts and ends; worker w reads the
    data of batches w, w + W, w + 2W... after the start position, as DataLoader serves them round-robin."""

    def __init__(self, stream: FeatureStream, worker: int):
        s = stream.spec
        self.stream, self.spec, self.worker, self.n_workers = stream, s, worker, stream.n_workers
        # The shards of the window being read and of the next (a batch can straddle two): a worker walks
        # every shard of the corpus in an epoch, and the reader's defaults (64 shards' files, 1,024 rows
        # parts) would keep ~90 MB of rows parts and up to 64 shard files mapped per worker at 1M videos.
        self.source = ShardSource(s.features, 2 * stream.plan.window_pieces)
        self.tokenizer = CaptionTokenizer(resolve_model_dir(s.text_model_dir), s.max_tokens, s.long_captions)
        # Every epoch reads the same rows again (a rank's pieces change, the rows do not), so per-row work
        # is kept where the whole stream fits; at corpus scale an epoch reads a video once: nothing kept.
        rows, d = int(stream.plan.sizes.sum()), stream.meta.dims
        self.videos = VideoTokenCache(s.units, s.max_units, keep=rows * VideoTokenCache.video_bytes(
            s.units, s.max_units, d.T, d.K, d.Df, d.Dr) <= s.cache_mb << 20)
        self._rows: dict[int, _Row] | None = {} if rows <= ROW_CACHE else None
        self.epoch, self.pos = stream.state.cursor
        self.skipped = {"nonfinite": 0, "empty_caption": 0}
        self._order: EpochOrder | None = None
        self.splits_seen: set[str] = set()

    def _epoch_order(self) -> EpochOrder:
        if self._order is None:
            self._order = self.stream.plan.order(self.epoch, self.spec.rank)
        return self._order

    def _row(self, row: int) -> _Row:
        got = self._rows.get(row) if self._rows is not None else None
        if got is None:
            record = self.source.record(row)
            split = record.meta.get("split", "")
            usable = record.status == "ok" and (not self.spec.split or split == self.spec.split)
            got = _Row(record.video_id, split, video_captions(record.video_id, record.caption, record.meta)
                       if usable else [])
            if self._rows is not None:
                self._rows[row] = got
        return got

    def _caption(self, row: int, captions: list[str]) -> str:
        if len(captions) == 1:  # the draw below could only give 0
            return captions[0]
        return captions[int(_rng(self.spec.seed, self.epoch, row).integers(len(captions)))]

    def _usable(self, rows: list[int]) -> list[tuple[int, str, str]]:
        """(row, video id, caption) of the rows that are ok videos of the split with a non-empty caption."""
        picked = []
        for row in rows:
            r = self._row(row)
            self.splits_seen.add(r.split)
            if r.captions:
                picked.append((row, r.video_id, self._caption(row, r.captions)))
        words = self.tokenizer.word_counts([c for _, _, c in picked])
        for (row, video_id, caption), n in zip(picked, words):
            if n == 0 and row % self.n_workers == self.worker:  # one worker reports each
                self._skip("empty_caption", video_id, f"its caption {caption!r} is empty after tokenisation")
        return [p for p, n in zip(picked, words) if n > 0]

    def _next_batch_rows(self) -> list[tuple[int, str, str]]:
        """The next batch's rows within one epoch (an epoch's incomplete last batch is dropped, so a batch
        never holds a video twice); moves the position past them."""
        B, empty_epochs = self.spec.batch_size, 0
        while True:
            items, order, whole_epoch = [], self._epoch_order(), self.pos == 0
            while len(items) < B and self.pos < len(order):
                take = order.take(self.pos, B - len(items))
                self.pos += len(take)
                items += self._usable(take)
            if len(items) == B:
                return items
            empty_epochs = empty_epochs + 1 if whole_epoch else 0
            if empty_epochs >= 2:
                raise DataError(f"rank {self.spec.rank} of the stream of {self.spec.features!r} found fewer than "
                                f"{B} usable {self.spec.split!r} videos in whole epochs (split values seen: "
                                f"{sorted(self.splits_seen)}); check the split name, or lower the batch size or "
                                "the number of ranks")
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None

    def batches(self) -> Iterator[dict[str, Any]]:
        k = 0
        while True:
            items = self._next_batch_rows()
            if k % self.n_workers == self.worker:
                yield self._batch(items)
            k += 1

    def _batch(self, items: list[tuple[int, str, str]]) -> dict[str, Any]:
        # rows not cached are read grouped by shard, whole chunks
        finite = self.videos.finite([row for row, _, _ in items], self.source.read)  # [n] bool
        for (_, video_id, _), ok in zip(items, finite):
            if not ok:
                self._skip("nonfinite", video_id, "its features contain NaN or Inf")
        if not finite.any():
            raise DataError(f"every video of a batch of {self.spec.features!r} has NaN/Inf features: "
                            f"{[v for _, v, _ in items][:10]}; run `vlpcache verify` and re-extract")
        items = [it for it, ok in zip(items, finite) if ok]
        video = self.videos.batch([row for row, _, _ in items])
        captions = [c for _, _, c in items]
        tokens = self.tokenizer(captions)
        return {"video": {f: getattr(video, f) for f in VideoBatch.__dataclass_fields__},
                "ids": tokens.ids, "mask": tokens.mask, "phrase": tokens.phrase, "truncated": tokens.truncated,
                "rows": torch.tensor([row for row, _, _ in items]), "video_ids": [v for _, v, _ in items],
                "captions": captions, "worker": self.worker, "cursor": (self.epoch, self.pos),
                "skipped": dict(self.skipped)}

    def _skip(self, kind: str, video_id: str, why: str) -> None:
        self.skipped[kind] += 1
        log.warning("skipping video %r: %s (%d skipped so far for this reason by stream worker %d of rank %d)",
                    video_id, why, self.skipped[kind], self.worker, self.spec.rank)


def batch_video(batch: dict[str, Any]) -> VideoBatch:
    """The VideoBatch of a streamed batch (features as stored: float16; `.float()` casts them)."""
    return VideoBatch(**batch["video"])
