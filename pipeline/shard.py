"""The unit of work: one shard of the manifest, processed by one writer and committed atomically.

`plan_shards` cuts the manifest into fixed, order-preserving shards. `process_shard` decodes, encodes
and writes one shard through an Executor (in-process or Ray, pipeline/runners.py) and yields progress
events, then the ShardResult. Batches are cut from the shard's row order and never from arrival
order: a batch's composition decides the bits of its features (a forward pass over 8 videos need not
give the bits of one over 5), so a shard redone after a crash gives the same bits.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.manifest import ManifestRow
from pipeline.work import DecodeStatus, Encoded, StageTimes, VideoTask
from stores import ShardHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int  # first manifest row (inclusive)
    stop: int  # last manifest row (exclusive)

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n_videos: int, shard_size: int) -> list[ShardSpec]:
    """Shard i holds manifest rows [i*S, min((i+1)*S, N)): fixed by the manifest order alone."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    return [ShardSpec(i, start, min(start + shard_size, n_videos)) for i, start in enumerate(range(0, n_videos, shard_size))]


@dataclass
class ShardJob:
    """Everything a shard worker needs; picklable, so it travels to a Ray task."""

    spec: ShardSpec
    rows: list[ManifestRow]  # the shard's manifest rows, in order
    tasks: list[VideoTask | None]  # per row: what to decode; None where the row itself is unusable
    store: ShardHandle  # opens this shard's writer in the task; small whatever the corpus
    batch_videos: int
    max_inflight_videos: int
    retry_failed: bool = False


@dataclass
class ShardProgress:
    index: int
    ok: int  # videos newly stored ok since the last event
    failed: int  # videos newly failed since the last event


@dataclass
class ShardResult:
    index: int
    ok: int = 0
    failed: int = 0
    kept: int = 0  # previously ok rows copied unchanged (--retry-failed)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video_id, error)
    times: StageTimes = field(default_factory=StageTimes)
    wall_s: float = 0.0


class Executor(Protocol):
    """Runs the two compute stages; handles are opaque (values in-process, object refs on Ray)."""

    def submit_decode(self, task: VideoTask) -> Any: ...

    def decode_status(self, handle: Any) -> DecodeStatus: ...

    def submit_encode(self, handles: list[Any], batch_index: int) -> Any: ...

    def encoded(self, handle: Any) -> Encoded: ...


def previous_ok_rows(previous: Any) -> set[int]:
    """Global rows that a committed ledger recorded ok (they are kept on --retry-failed)."""
    return {record.row for record in previous.videos if record.status == "ok"}


class _ShardRun:
    """State of one shard being written; `run()` drives decode -> encode -> put, then commit."""

    def __init__(self, job: ShardJob, executor: Executor, writer: Any) -> None:
        self.job = job
        self.executor = executor
        self.writer = writer
        self.result = ShardResult(job.spec.index)
        self.by_row = {job.spec.start + i: (row, task) for i, (row, task) in enumerate(zip(job.rows, job.tasks))}

    def run(self) -> Iterator[ShardProgress | ShardResult]:
        start = time.perf_counter()
        todo = self._rows_to_do()
        yield ShardProgress(self.job.spec.index, self.result.kept, self.result.failed)
        yield from self._process(todo)
        t = time.perf_counter()
        self.writer.commit()
        self.result.times.store_s += time.perf_counter() - t
        self.result.wall_s = time.perf_counter() - start
        yield self.result

    def _rows_to_do(self) -> list[int]:
        """Rows to decode; fails unusable rows now; keeps previously ok rows on --retry-failed."""
        keep = set()
        if self.job.retry_failed and self.writer.previous is not None:
            keep = previous_ok_rows(self.writer.previous)
        todo = []
        for row_index, (row, task) in self.by_row.items():
            if row_index in keep:
                self.writer.keep(row_index)
                self.result.kept += 1
            elif task is None:
                self._fail(row_index, row.error or "unusable manifest row")
            else:
                todo.append(row_index)
        return todo

    def _process(self, todo: list[int]) -> Iterator[ShardProgress]:
        B = self.job.batch_videos
        batches = [todo[i : i + B] for i in range(0, len(todo), B)]
        decoding: deque[list[tuple[int, Any]]] = deque()  # per batch: (row, decode handle)
        encoding: deque[tuple[Any, dict[int, DecodeStatus]]] = deque()  # (encode handle, statuses)
        next_batch, inflight = 0, 0
        for b in range(len(batches)):
            # Backpressure: submit decodes only while the shard's videos in flight stay bounded.
            while next_batch < len(batches) and (next_batch == b or inflight + len(batches[next_batch]) <= self.job.max_inflight_videos):
                decoding.append([(r, self.executor.submit_decode(self.by_row[r][1])) for r in batches[next_batch]])
                inflight += len(batches[next_batch])
                next_batch += 1
            handles = decoding.popleft()
            statuses = {r: self.executor.decode_status(h) for r, h in handles}
            failed = [r for r in statuses if statuses[r].error is not None]
            for r in failed:
                self._fail(r, statuses[r].error)
                self.result.times.decode_s += statuses[r].decode_s
            inflight -= len(failed)
            ok_handles = [h for r, h in handles if statuses[r].error is None]
            if ok_handles:
                encoding.append((self.executor.submit_encode(ok_handles, b), {r: s for r, s in statuses.items() if s.error is None}))
            if failed:
                yield ShardProgress(self.job.spec.index, 0, len(failed))
            # One batch encodes while the next one decodes; write the older one.
            while len(encoding) > 1 or (encoding and b == len(batches) - 1):
                inflight -= yield from self._write(*encoding.popleft())

    def _write(self, handle: Any, statuses: dict[int, DecodeStatus]) -> Iterator[ShardProgress]:
        encoded = self.executor.encoded(handle)
        self.result.times.encode_s += encoded.encode_s
        self.result.times.batch_splits += encoded.batch_splits
        t = time.perf_counter()
        for r, arrays in zip(encoded.rows, encoded.arrays):
            row = self.by_row[r][0]
            self.writer.put(r, row.video_id, row.caption, arrays, meta=row.meta, flags=statuses[r].flags)
        for r, error in encoded.errors.items():
            self._fail(r, error)
        self.result.times.store_s += time.perf_counter() - t
        self.result.times.decode_s += sum(s.decode_s for s in statuses.values())
        self.result.ok += len(encoded.rows)
        yield ShardProgress(self.job.spec.index, len(encoded.rows), len(encoded.errors))
        return len(statuses)

    def _fail(self, row_index: int, error: str) -> None:
        row = self.by_row[row_index][0]
        self.writer.fail(row_index, row.video_id, row.caption, error, meta=row.meta)
        self.result.failed += 1
        self.result.failures.append((row.video_id, error))
        log.info("video %s failed: %s", row.video_id, error)


def process_shard(job: ShardJob, executor: Executor) -> Iterator[ShardProgress | ShardResult]:
    """Write one shard: yields ShardProgress events, then the ShardResult once committed. Any exception
    aborts the shard (its partial data is dropped) and propagates, so the driver can retry it."""
    writer = job.store.open()
    try:
        yield from _ShardRun(job, executor, writer).run()
    except BaseException:
        writer.abort()
        raise
