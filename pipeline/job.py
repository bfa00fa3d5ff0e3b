"""The extraction job driver: manifest -> shard plan -> runner -> store, with resume, progress and stats.

The driver holds no feature data and writes nothing a crash could tear: shards are written and
committed by their own writer (stores' commit protocol), the resolved config and the run stats are
written atomically. A rerun of the same job therefore finds only committed shards and redoes the rest.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import ConfigError, JobConfig, save_config
from pipeline.lock import OutLock
from pipeline.manifest import ManifestIndex, ManifestRow, scan_manifest
from pipeline.runners import Event, JobStopped, ShardFailed, ShardRetry, make_runner
from pipeline.shard import ShardJob, ShardProgress, ShardResult, ShardSpec, plan_shards
from pipeline.work import StageTimes, VideoTask

log = logging.getLogger(__name__)

CONFIG_FILE = "extract_config.yaml"
STATS_DIR = "runs"


@dataclass
class RunStats:
    """What one run did; written to OUT/runs/<start>-<pid>.json and summarised on stdout."""

    out: str
    runner: str
    started: str
    n_videos: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # committed by an earlier run
    shards_done: int = 0
    shards_failed: list[dict[str, Any]] = field(default_factory=list)  # index, attempts, error
    shard_retries: int = 0
    videos_ok: int = 0  # stored ok in this run
    videos_failed: int = 0  # recorded failed in this run
    videos_kept: int = 0  # --retry-failed: earlier ok rows kept unchanged
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    store_ok: int = 0  # whole store after the run
    store_failed: int = 0
    store_pending: int = 0
    wall_s: float = 0.0
    videos_per_s: float = 0.0
    times: dict[str, float] = field(default_factory=dict)  # summed stage seconds (decode, encode, store)
    weights: dict[str, str] = field(default_factory=dict)  # role -> weight file sha256, or "random:seed=N"
    exit_reason: str = ""

    @property
    def failure_rate(self) -> float:
        return self.store_failed / self.n_videos if self.n_videos else 0.0


def reason_of(error: str) -> str:
    """A short bucket for the summary: the error's prefix up to the first ':' (e.g. 'decode')."""
    head = error.split(":", 1)[0].strip()
    return head if len(head) <= 40 else head[:40]


def _video_task(row_index: int, row: ManifestRow, video_root: Path) -> VideoTask | None:
    if row.error is not None:
        return None
    boxes = row.meta.get("boxes", "")
    boxes_path = str(boxes if os.path.isabs(boxes) else video_root / boxes) if boxes else None
    try:
        window = row.window
    except ValueError:
        row.error = f"start/end {row.meta.get('start')!r}/{row.meta.get('end')!r} are not numbers (seconds)"
        return None
    return VideoTask(row_index, row.video_id, row.path, window, boxes_path, row.span)


class Job:
    """One extraction run over a resolved JobConfig."""

    def __init__(self, config: JobConfig) -> None:
        from extractors.config import ExtractorConfig

        config.validate()
        try:
            self.extractor = ExtractorConfig.from_dict(config.extractor)
        except ValueError as e:
            raise ConfigError(f"extractor config: {e}") from e
        self.config = config
        self.out = Path(config.run.out)
        inp = config.input
        # One streaming pass; each shard's rows are read back when its job is built (bounded memory).
        self.manifest: ManifestIndex = scan_manifest(inp.manifest, inp.video_root or None, inp.format,
                                                     inp.path_template, stride=config.run.shard_size)
        if not len(self.manifest):
            raise ConfigError(f"manifest {inp.manifest} has no rows: nothing to extract")
        self.video_root = Path(inp.video_root) if inp.video_root else Path(self.manifest.source).parent

    def rows_and_tasks(self, start: int, stop: int) -> tuple[list[ManifestRow], list[VideoTask | None]]:
        """Manifest rows [start, stop) and what to decode for each (None where the row is unusable)."""
        rows = self.manifest.rows(start, stop)
        return rows, [_video_task(start + i, row, self.video_root) for i, row in enumerate(rows)]

    def provenance(self) -> dict[str, Any]:
        """What decides the features' bits: a rerun with anything else here is refused by the store."""
        from extractors import extractor_provenance

        return {
            "extractor": extractor_provenance(self.extractor),
            "extractor_config": self.extractor.to_dict(),
            "manifest": {"format": self.manifest.format, "rows": len(self.manifest), "sha256": self.manifest.fingerprint},
        }

    def run(self, on_runner_ready=None) -> RunStats:
        """Run to the end, to a failure rate above the limit, or to a job-level error (JobStopped, raised
        after the run's stats are written). `on_runner_ready(runner)` lets tests reach the workers. One
        job at a time per output folder (pipeline/lock.py)."""
        run = self.config.run
        stats = RunStats(str(self.out), run.runner, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        stats.n_videos = len(self.manifest)
        start = time.perf_counter()
        with OutLock(self.out, run.lock_lease_s):
            try:
                self._run(stats, on_runner_ready)
            except JobStopped as e:
                stats.exit_reason = str(e)
                self._finish(stats, start)
                raise
            self._finish(stats, start)
        return stats

    def _run(self, stats: RunStats, on_runner_ready) -> None:
        self._remove_stale_partials()
        todo = None
        existing = self._existing_dims()
        if existing is not None:  # a rerun: find the work left before building any model
            store = self._open_store(existing)
            todo = self._pending_shards(store, stats)
        if todo == []:
            save_config(self.config, self.extractor, self.out / CONFIG_FILE)
        else:
            runner = make_runner(self.config)
            try:
                store = self._open_store(runner.dims)  # checks the models' dims against an existing store
                todo = self._pending_shards(store, stats)
                save_config(self.config, self.extractor, self.out / CONFIG_FILE)
                if on_runner_ready is not None:
                    on_runner_ready(runner)
                self._consume(runner.run(self.shard_jobs(todo, store)), sum(len(s) for s in todo), stats)
            finally:
                runner.close()

    def _remove_stale_partials(self) -> None:
        """Holding OUT's lock, every partial file or shard in OUT is a killed run's leftover: a shard writer
        only clears its own shard's, so one killed after its ledger was written would stay for good."""
        import shutil

        from stores.ledger import Layout

        layout = Layout(self.out)
        stale = list(layout.partial.iterdir()) if layout.partial.is_dir() else []
        for folder in (layout.out, layout.ledgers, self.out / STATS_DIR):
            stale += folder.glob("*.partial") if folder.is_dir() else []
        for path in stale:
            log.info("removing %s, left by a killed run", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _existing_dims(self):
        from stores import open_store
        from stores.ledger import Layout

        return open_store(self.out).dims if Layout(self.out).store_json.exists() else None

    def _open_store(self, dims):
        """Creates OUT (the ids streamed from the manifest, once), or checks that it is this job's store
        (StoreError otherwise)."""
        from stores import create_store
        from stores.ledger import Layout

        run = self.config.run
        new = not Layout(self.out).store_json.exists()
        return create_store(self.out, run.store, dims=dims, n_videos=len(self.manifest), shard_size=run.shard_size,
                            provenance=self.provenance(), compression=run.compression,
                            video_ids=self.manifest.video_ids() if new else None)

    def _pending_shards(self, store, stats: RunStats) -> list[ShardSpec]:
        committed = store.committed_shards()
        shards = plan_shards(len(self.manifest), self.config.run.shard_size)
        stats.shards_total = len(shards)
        todo = [s for s in shards if s.index not in committed]
        if self.config.run.retry_failed:
            todo += [s for s in shards if s.index in committed and self._has_failures(s)]
            todo.sort(key=lambda s: s.index)
        stats.shards_skipped = len(shards) - len(todo)
        log.info("%d shards: %d committed earlier, %d to do", len(shards), len(committed), len(todo))
        return todo

    def shard_jobs(self, todo: list[ShardSpec], store) -> Iterator[ShardJob]:
        """Each shard's job, built only when the runner takes it: one shard's rows in memory at a time."""
        return (self._shard_job(spec, store) for spec in todo)

    def _has_failures(self, spec: ShardSpec) -> bool:
        from stores.ledger import Layout, ShardLedger

        return ShardLedger.load(Layout(self.out).ledger(spec.index)).counts["failed"] > 0

    def _shard_job(self, spec: ShardSpec, store) -> ShardJob:
        run = self.config.run
        rows, tasks = self.rows_and_tasks(spec.start, spec.stop)
        return ShardJob(
            spec=spec,
            rows=rows,
            tasks=tasks,
            store=store.handle(spec.index),
            batch_videos=run.batch_videos,
            max_inflight_videos=run.max_inflight_videos,
            retry_failed=run.retry_failed,
        )

    def _consume(self, events, total: int, stats: RunStats) -> None:
        times = StageTimes()
        reasons: Counter[str] = Counter()
        committed = [0, 0]  # ok, failed videos of the shards this run committed
        with tqdm(total=total, unit="video", disable=not self.config.run.progress, dynamic_ncols=True) as bar:
            for event in events:
                self._on_event(event, bar, stats, times, reasons)
                if isinstance(event, ShardResult) and self._failing(event, committed, stats):
                    events.close()  # stops the runner's loop; committed shards stay
                    break
        stats.failed_by_reason = dict(reasons.most_common())
        stats.times = {k: round(v, 4) for k, v in asdict(times).items()}

    @staticmethod
    def _on_event(event: Event, bar: tqdm, stats: RunStats, times: StageTimes, reasons: Counter) -> None:
        if isinstance(event, ShardProgress):
            stats.videos_failed += event.failed
            bar.update(event.ok + event.failed)
            bar.set_postfix(failed=stats.videos_failed, refresh=False)
        elif isinstance(event, ShardRetry):
            stats.shard_retries += 1
            stats.videos_failed -= event.undo_failed
            bar.update(-(event.undo_ok + event.undo_failed))
        elif isinstance(event, ShardResult):
            stats.shards_done += 1
            stats.videos_ok += event.ok
            stats.videos_kept += event.kept
            times.add(event.times)
            reasons.update(reason_of(error) for _, error in event.failures)
        elif isinstance(event, ShardFailed):
            stats.shards_failed.append({"index": event.index, "attempts": event.attempts, "error": event.error})

    def _failing(self, result: ShardResult, committed: list[int], stats: RunStats) -> bool:
        """Checked as the job goes: once enough videos are committed, a failure rate above the limit stops
        the job early (most likely a wrong --video-root or a broken decoder, not bad videos)."""
        run = self.config.run
        committed[0] += result.ok + result.kept
        committed[1] += result.failed
        done = sum(committed)
        if done < max(1, run.failure_check_after) or committed[1] / done <= run.max_failure_rate:
            return False
        stats.exit_reason = (f"stopped early: {committed[1]} of the {done} videos committed so far failed "
                             f"({committed[1] / done:.3f} > --max-failure-rate {run.max_failure_rate}); the "
                             f"committed shards are kept. Check the failures (vlpcache status {self.out}), then "
                             f"rerun to resume, with a higher --max-failure-rate if they are expected")
        log.error("%s", stats.exit_reason)
        return True

    def _finish(self, stats: RunStats, start: float) -> None:
        from stores import open_store

        stats.wall_s = time.perf_counter() - start
        stats.videos_per_s = (stats.videos_ok + stats.videos_failed) / stats.wall_s if stats.wall_s else 0.0
        status = open_store(self.out).status
        stats.store_ok, stats.store_failed, stats.store_pending = status.ok, status.failed, status.pending
        stats.weights = dict(self.provenance()["extractor"]["weights_sha256"])
        limit = self.config.run.max_failure_rate
        if stats.exit_reason:  # stopped early or on a job-level error: that is the reason
            pass
        elif stats.shards_failed:
            stats.exit_reason = (
                f"{len(stats.shards_failed)} shard(s) could not be written after retries "
                f"(first: shard {stats.shards_failed[0]['index']}: {stats.shards_failed[0]['error']}); rerun to resume"
            )
        elif stats.failure_rate > limit:
            stats.exit_reason = f"failure rate {stats.failure_rate:.3f} exceeds --max-failure-rate {limit}"
        self._write_stats(stats)

    def _write_stats(self, stats: RunStats) -> None:
        from stores.io import atomic_write_json

        stamp = stats.started.replace(":", "").replace("+0000", "Z")
        path = self.out / STATS_DIR / f"{stamp}-{os.getpid()}.json"
        try:
            atomic_write_json(path, {**asdict(stats), "failure_rate": stats.failure_rate})
        except OSError as e:  # a full disk must not hide the job's own outcome behind this one
            log.warning("could not write the run stats %s: %s", path, e)
            return
        log.info("run stats: %s", path)
