"""The two compute stages of a shard, free of Ray so that the in-process runner and the Ray actors
run the very same code: Decoder (one video -> sampled frames) and ModelRunner (the frames of a batch
of videos -> the store's per-video arrays).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from extractors.api import Clip, DecodeError
from extractors.backends import require_backend
from extractors.config import ExtractorConfig, SamplingConfig
from stores.schema import ARRAYS, Dims

log = logging.getLogger(__name__)


@dataclass
class VideoTask:
    """What a decode needs to know about one manifest row."""

    row: int  # global manifest row
    video_id: str
    path: str  # absolute video path
    window: tuple[float, float] | None = None  # (start, end) seconds, from the manifest's start/end columns
    boxes_path: str | None = None  # "given" region source: absolute path of the boxes sidecar
    span: tuple[int, int] | None = None  # (offset, size) of the video inside `path`: a tar member, read in place


@dataclass
class DecodeStatus:
    """The small half of a decode result: the shard writer needs only this, not the frames."""

    row: int
    error: str | None  # None = decoded
    decode_s: float  # wall time of this decode
    flags: tuple[str, ...] = ()  # the clip's flags (short, keyframe, ...), recorded in the ledger


@dataclass
class Decoded:
    """The frames of one video, on their way to a model actor."""

    row: int
    clip: Clip
    given_boxes: list[np.ndarray] | None = None  # T × [n, 4] pixel boxes, "given" region source only


@dataclass
class Encoded:
    """The store arrays of a batch of videos, in the batch's order."""

    rows: list[int]
    arrays: list[dict[str, np.ndarray]]  # per video, keyed by stores.schema names, per-video shapes
    encode_s: float  # wall time of the forward passes
    batch_splits: int = 0  # times the batch was halved after an out-of-memory error
    errors: dict[int, str] = field(default_factory=dict)  # row -> error, for videos the models failed on

    @classmethod
    def failed(cls, row: int, error: str) -> Encoded:
        return cls([], [], 0.0, 0, {row: error})

    @classmethod
    def join(cls, parts: list[Encoded], encode_s: float | None = None) -> Encoded:
        """The parts of a batch encoded piece by piece, as one result in the parts' order."""
        return cls(rows=[r for p in parts for r in p.rows], arrays=[a for p in parts for a in p.arrays],
                   encode_s=sum(p.encode_s for p in parts) if encode_s is None else encode_s,
                   batch_splits=sum(p.batch_splits for p in parts),
                   errors={r: e for p in parts for r, e in p.errors.items()})


# errno values that a network file system (NFS, SMB, FUSE) returns for a moment and then not: worth a retry
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR, errno.EBUSY,
                              errno.ENOLCK, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH})
_ERRNO = re.compile(r"\[Errno (\d+)\]")


def transient_errno(error: BaseException) -> int | None:
    """The transient errno behind `error` (an OSError, or a DecodeError whose message carries one from the
    decoder process, where the OSError itself cannot travel), else None."""
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return error.errno
    if isinstance(error, DecodeError) and (m := _ERRNO.search(str(error))) and int(m.group(1)) in TRANSIENT_ERRNOS:
        return int(m.group(1))
    return None


class Decoder:
    """VideoTask -> (DecodeStatus, Decoded | None). A bad video is a result, never an exception: it must not
    stop its shard. The decode runs in a subprocess killed after `timeout_s` (decord can hang holding the
    GIL, so a thread cannot stop it). A transient I/O error (EIO, ESTALE, ...) is retried `io_retries`
    times with exponential backoff before the video is recorded failed. An exception that is neither a
    decode error nor an OSError on the video is a bug of ours, not of the video: it propagates and stops
    the job rather than filling the ledger with failures."""

    def __init__(self, sampling: SamplingConfig, timeout_s: float, need_boxes: bool, io_retries: int = 3,
                 io_backoff_s: float = 1.0) -> None:
        require_backend(sampling.backend)  # a missing decoder stops the job at start, naming the package
        self.sampling = sampling
        self.timeout_s = timeout_s
        self.need_boxes = need_boxes
        self.io_retries = io_retries
        self.io_backoff_s = io_backoff_s

    def __call__(self, task: VideoTask) -> tuple[DecodeStatus, Decoded | None]:
        start = time.perf_counter()
        for attempt in range(self.io_retries + 1):
            try:
                clip = self._decode(task)
                boxes = self._given_boxes(task, clip) if self.need_boxes else None
                break
            except (DecodeError, OSError) as e:
                code = transient_errno(e)
                if code is None or attempt == self.io_retries:
                    error = f"decode: {e}" if code is None else f"decode: I/O error after {attempt + 1} attempts: {e}"
                    return DecodeStatus(task.row, error, time.perf_counter() - start), None
                delay = self.io_backoff_s * 2**attempt
                log.warning("video %s: transient %s, retry %d/%d in %.1f s: %s", task.video_id, errno.errorcode[code],
                            attempt + 1, self.io_retries, delay, e)
                time.sleep(delay)
            except ValueError as e:  # an unreadable boxes sidecar: this video's input, recorded
                return DecodeStatus(task.row, f"decode: {e}", time.perf_counter() - start), None
        status = DecodeStatus(task.row, None, time.perf_counter() - start, tuple(clip.flags))
        return status, Decoded(task.row, clip, boxes)

    def _decode(self, task: VideoTask) -> Clip:
        from extractors.decode import decode_clip_killable

        try:
            os.stat(task.path)  # unlike os.path.isfile, keeps a transient errno apart from a missing file
        except FileNotFoundError:
            raise DecodeError(f"video file not found: {task.path} (check --video-root and the manifest's path)") from None
        if not os.path.isfile(task.path):
            raise DecodeError(f"not a file: {task.path}")
        return decode_clip_killable(task.path, self.sampling, task.window, self.timeout_s, task.span)

    @staticmethod
    def _given_boxes(task: VideoTask, clip: Clip) -> list[np.ndarray]:
        from extractors.regions import given_boxes_for_clip

        if not task.boxes_path:
            raise DecodeError(f"regions.kind is 'given' but video {task.video_id!r} has no 'boxes' column in the manifest")
        if not os.path.isfile(task.boxes_path):
            raise DecodeError(f"boxes sidecar not found: {task.boxes_path}")
        return given_boxes_for_clip(task.boxes_path, clip)


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def is_input_error(error: BaseException) -> bool:
    """An error that one video's frames cause (rejected input, too big to fit even alone): recorded as that
    video's failure. Anything else (TypeError, AttributeError, ...) is a bug of ours and stops the job."""
    return isinstance(error, ValueError) or _is_oom(error)


class ModelRunner:
    """list[Decoded] -> Encoded. Holds the frame encoder and the region source; the frames of all the
    batch's videos go through each model together. An out-of-memory error halves the batch and retries;
    a failed batch is redone video by video, and a video whose own input fails is recorded failed."""

    def __init__(self, extractor: dict, device: str = "cpu", threads: int = 0) -> None:
        import torch

        from extractors import build_extraction_stage

        if threads > 0:
            torch.set_num_threads(threads)
        self.config = ExtractorConfig.from_dict(extractor)
        self.device = device
        # One stage for both models: with a shared trunk it runs once per frame for frames and regions.
        self.stage = build_extraction_stage(self.config, device)
        self.dims = Dims(
            T=self.config.num_frames, K=self.config.regions.max_boxes, Df=self.stage.frame_dim, Dr=self.stage.region_dim
        )

    def __call__(self, batch: list[Decoded]) -> Encoded:
        start = time.perf_counter()
        try:
            arrays, splits = self._run(batch)
            return Encoded([d.row for d in batch], arrays, time.perf_counter() - start, splits)
        except Exception as e:
            if len(batch) == 1:
                if not is_input_error(e):
                    raise
                return Encoded([], [], time.perf_counter() - start, 0, {batch[0].row: f"encode: {type(e).__name__}: {e}"})
            log.warning("a batch of %d videos failed (%s: %s); encoding its videos one by one", len(batch), type(e).__name__, e)
        # One bad video must not fail its batch-mates: each alone, so only the culprit is recorded failed.
        return Encoded.join([self([d]) for d in batch], encode_s=time.perf_counter() - start)

    def _run(self, batch: list[Decoded]) -> tuple[list[dict[str, np.ndarray]], int]:
        try:
            return self._forward(batch), 0
        except Exception as e:
            if not _is_oom(e) or len(batch) == 1:
                raise
            self._release_memory()
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d videos: retrying as %d + %d", len(batch), half, len(batch) - half)
            first, s1 = self._run(batch[:half])
            second, s2 = self._run(batch[half:])
            return first + second, 1 + s1 + s2

    def _release_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _forward(self, batch: list[Decoded]) -> list[dict[str, np.ndarray]]:
        T = self.dims.T
        frames = [f for d in batch for f in d.clip.frames]  # B*T × [H, W, 3]
        for d in batch:
            if len(d.clip.frames) != T:
                raise ValueError(f"row {d.row}: decoder returned {len(d.clip.frames)} frames, the plan says T={T}")
        given = [b for d in batch for b in d.given_boxes] if batch and batch[0].given_boxes is not None else None
        out = self.stage(frames, given)  # frame_features [B*T, Df]; regions: boxes [B*T, K, 4], features [B*T, K, Dr]
        frame_features, regions = out.frame_features, out.regions
        return [self._video_arrays(d, slice(i * T, (i + 1) * T), frame_features, regions) for i, d in enumerate(batch)]

    @staticmethod
    def _video_arrays(d: Decoded, s: slice, frame_features: np.ndarray, regions) -> dict[str, np.ndarray]:
        values = {
            "frame_features": frame_features[s],  # [T, Df]
            "region_features": regions.features[s],  # [T, K, Dr]
            "region_boxes": regions.boxes[s],  # [T, K, 4]
            "region_scores": regions.scores[s],  # [T, K]
            "region_classes": regions.classes[s],  # [T, K]
            "region_counts": regions.counts[s],  # [T]
            "frame_times": d.clip.times,  # [T]
        }
        return {name: np.ascontiguousarray(values[name], dtype=ARRAYS[name].dtype) for name in ARRAYS}


def encode_isolating_crashes(rows: list[int], items: list, first: Encoded | str,
                             attempt: Callable[[list[int], list], Encoded | str]) -> Encoded:
    """A batch whose forward pass killed its model process (`first` says how): retried whole once (an
    outside kill leaves the same bits), then video by video on fresh processes, so that only a video that
    kills the process alone is recorded failed ("model worker crashed: ..."). `attempt(rows, items)` runs
    one try on a live process and returns its Encoded, or why the process died."""
    if isinstance(first, Encoded):
        return first
    log.warning("the model process died on rows %s: %s; retrying the batch whole on a fresh one", rows, first)
    outcome = attempt(rows, items)
    if isinstance(outcome, Encoded) or len(rows) == 1:
        return outcome if isinstance(outcome, Encoded) else Encoded.failed(rows[0], outcome)
    log.warning("rows %s killed the model process twice (%s): encoding them one by one", rows, outcome)
    parts = []
    for row, item in zip(rows, items):
        part = attempt([row], [item])
        parts.append(part if isinstance(part, Encoded) else Encoded.failed(row, part))
    return Encoded.join(parts)


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over videos (decode, encode) or calls (store)."""

    decode_s: float = 0.0
    encode_s: float = 0.0
    store_s: float = 0.0
    batch_splits: int = 0

    def add(self, other: StageTimes) -> None:
        self.decode_s += other.decode_s
        self.encode_s += other.encode_s
        self.store_s += other.store_s
        self.batch_splits += other.batch_splits
