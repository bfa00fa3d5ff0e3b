"""Features of one split, read from a store into memory, turned into video tokens; the epoch sampler
with an exact resume position; the evaluation sharding that never drops an item."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from stores import open_store
from train.model import VideoBatch

log = logging.getLogger(__name__)
TRACK_GEOM = 7  # per frame: centre x, centre y, width, height, present, 10*dx, 10*dy
REGION_GEOM = 9  # x1, y1, x2, y2, width, height, 10*dx, 10*dy, has a successor


class DataError(ValueError):
    """The features cannot be used as asked (empty split, dims that do not match the checkpoint...)."""


@dataclass
class SplitData:
    video_ids: list[str]
    captions: list[str]
    twins: list[str]  # the colour-swapped twin's video id, "" when none
    frame_times: np.ndarray  # [N, T] seconds
    video: VideoBatch  # all videos of the split, features in float16 (cast per batch)

    def __len__(self) -> int:
        return len(self.video_ids)

    def batch(self, idx: torch.Tensor) -> VideoBatch:
        return self.video.index(idx).float()


def geom_dim(units: str, T: int) -> int:
    return TRACK_GEOM * T if units == "track" else REGION_GEOM


def store_signature(reader) -> dict:
    """What a checkpoint must agree with to read a store."""
    d = reader.dims
    return {"format_version": reader.store_meta.format_version, "T": d.T, "K": d.K, "Df": d.Df, "Dr": d.Dr}


def check_signature(got: dict, expected: dict, what: str) -> None:
    diff = {k: (expected.get(k), got[k]) for k in got if expected.get(k) != got[k]}
    if diff:
        raise DataError(f"store {what} does not match the checkpoint: " +
                        ", ".join(f"{k} checkpoint={a} store={b}" for k, (a, b) in diff.items()) +
                        "; extract the features with the checkpoint's extraction config or train a new model")


def _centre_size(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] x1,y1,x2,y2 -> [..., 4] cx, cy, w, h."""
    return np.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
                     boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], axis=-1)


def track_tokens(a: dict[str, np.ndarray], max_units: int) -> tuple[np.ndarray, ...]:
    """One token per region class per video (with "given" boxes, class = object index = one object).
    Where a class has several boxes in a frame, the best-scoring one is its box there.
    -> features [N, R, Dr], geometry [N, R, 7T], frame index [N, R] (= T), mask [N, R], class [N, R]."""
    feats, boxes, classes, scores = (a["region_features"], a["region_boxes"], a["region_classes"],
                                     a["region_scores"].astype(np.float32))
    N, T, K, Dr = feats.shape
    out_f = np.zeros((N, max_units, Dr), np.float16)  # [N, R, Dr]
    out_g = np.zeros((N, max_units, T, TRACK_GEOM), np.float32)  # [N, R, T, 7]
    out_m = np.zeros((N, max_units), bool)  # [N, R]
    out_c = np.full((N, max_units), -1, np.int64)  # [N, R] region class of each track
    for n in range(N):
        cls = classes[n]  # [T, K]
        present = sorted(set(cls[cls >= 0].tolist()))
        total = {c: float(scores[n][cls == c].sum()) for c in present}
        keep = sorted(present, key=lambda c: (-total[c], c))[:max_units]
        keep.sort(key=lambda c: (int(np.argmax((cls == c).any(1))), c))  # order of first appearance
        for j, c in enumerate(keep):
            slot_scores = np.where(cls == c, scores[n] + 1.0, 0.0)  # [T, K]; +1 so a zero score still wins
            best = slot_scores.argmax(1)  # [T]
            here = slot_scores.max(1) > 0  # [T]
            f = feats[n, np.arange(T), best].astype(np.float32)  # [T, Dr]
            out_f[n, j] = (f[here].mean(0)).astype(np.float16)
            cs = _centre_size(boxes[n, np.arange(T), best]) * here[:, None]  # [T, 4]
            step = np.zeros((T, 2), np.float32)
            both = here[1:] & here[:-1]
            step[:-1] = (cs[1:, :2] - cs[:-1, :2]) * both[:, None] * 10.0  # displacement to the next frame
            out_g[n, j] = np.concatenate([cs, here[:, None], step], axis=1)
            out_m[n, j] = True
            out_c[n, j] = c
    R = max(1, int(out_m.sum(1).max()))  # drop slots no video uses
    unit_frame = np.full((N, R), T, np.int64)
    return out_f[:, :R], out_g[:, :R].reshape(N, R, T * TRACK_GEOM), unit_frame, out_m[:, :R], out_c[:, :R]


def region_tokens(a: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """One token per box per frame: 6-d geometry plus displacement to the same class in the next frame."""
    feats, boxes, classes = a["region_features"], a["region_boxes"], a["region_classes"]
    N, T, K, Dr = feats.shape
    real = classes >= 0  # [N, T, K]
    cs = _centre_size(boxes)  # [N, T, K, 4]
    nxt = np.zeros((N, T, K, 3), np.float32)  # 10*dx, 10*dy, has successor
    for t in range(T - 1):
        same = (classes[:, t, :, None] == classes[:, t + 1, None, :]) & real[:, t, :, None] & real[:, t + 1, None, :]
        has = same.any(2)  # [N, K]
        j = same.argmax(2)  # [N, K] first matching slot in the next frame
        nc = np.take_along_axis(cs[:, t + 1, :, :2], j[..., None], axis=1)  # [N, K, 2]
        nxt[:, t, :, :2] = (nc - cs[:, t, :, :2]) * has[..., None] * 10.0
        nxt[:, t, :, 2] = has
    geom = np.concatenate([boxes, cs[..., 2:], nxt], axis=-1) * real[..., None]  # [N, T, K, 9]
    frame = np.broadcast_to(np.arange(T)[None, :, None], (N, T, K))
    return (feats.reshape(N, T * K, Dr), geom.reshape(N, T * K, REGION_GEOM).astype(np.float32),
            frame.reshape(N, T * K).astype(np.int64), real.reshape(N, T * K))


def video_batch(a: dict[str, np.ndarray], units: str, max_units: int) -> VideoBatch:
    """Store arrays of N videos -> video tokens (features kept in float16)."""
    tokens = track_tokens(a, max_units)[:4] if units == "track" else region_tokens(a)
    unit_f, unit_g, unit_t, unit_m = (torch.from_numpy(np.ascontiguousarray(x)) for x in tokens)
    frames = torch.from_numpy(np.ascontiguousarray(a["frame_features"].astype(np.float16)))  # [N, T, Df]
    return VideoBatch(frames, torch.ones(frames.shape[:2], dtype=torch.bool), unit_f.half(), unit_g.float(),
                      unit_t, unit_m)


def load_split(features: str, split: str, units: str, max_units: int, max_videos: int = 0,
               expected: dict | None = None) -> tuple[SplitData, dict]:
    """Read the videos of `split` ("" = all stored videos) into memory as video tokens."""
    reader = open_store(features)
    if expected is not None:
        check_signature(store_signature(reader), expected, repr(features))
    ids = [v for v in reader.video_ids if not split or reader.meta(v).get("split", "") == split]
    if max_videos:
        ids = ids[:max_videos]
    if not ids:
        splits = sorted({reader.meta(v).get("split", "") for v in reader.video_ids})
        raise DataError(f"split {split!r} of store {features!r} has no stored videos (splits present: {splits}, "
                        f"{len(reader.video_ids)} videos stored ok); pick another split or check `vlpcache status`")
    a = reader.read_many(ids)
    video = video_batch(a, units, max_units)
    twins = [reader.meta(v).get("twin", "") for v in ids]
    log.info("split %r of %s: %d videos, T=%d, %d %s tokens per video", split, features, len(ids),
             reader.dims.T, video.units.shape[1], units)
    return SplitData(ids, list(a["caption"]), twins, np.asarray(a["frame_times"]), video), store_signature(reader)


class EpochSampler:
    """Global batches from a seeded permutation per epoch; this rank takes its slice of each.
    The state (epoch, next batch) is saved in checkpoints so a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise DataError(f"optim.batch_size={batch_size} must be divisible by the world size {world_size}")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.batch_size = min(batch_size, n - n % world_size)
        if self.batch_size < 2:
            raise DataError(f"{n} training videos cannot make a contrastive batch over {world_size} rank(s)")
        self.epoch, self.position = 0, 0

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        """This rank's indices of the next global batch (incomplete last batches are skipped)."""
        if (self.position + 1) * self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._perm()[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        local = self.batch_size // self.world
        return batch[self.rank * local:(self.rank + 1) * local]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices rank, rank + world, ...: every item is evaluated exactly once (nothing dropped or padded)."""
    return torch.arange(rank, n, world_size)
