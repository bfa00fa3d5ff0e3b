"""Video tokens built per batch (vectorised), the check that features are finite, an evaluation split
read into memory, and the evaluation sharding that never drops an item. Training streams its videos
(train/stream.py)."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from stores import open_store
from train.model import VideoBatch
from train.tracks import link_tracks

log = logging.getLogger(__name__)
TRACK_GEOM = 7  # per frame: centre x, centre y, width, height, present, 10*dx, 10*dy
REGION_GEOM = 9  # x1, y1, x2, y2, width, height, 10*dx, 10*dy, has a successor


class DataError(ValueError):
    """The features cannot be used as asked (empty split, dims that do not match the checkpoint...)."""


CAPTIONS_COLUMN = "captions"


def video_captions(video_id: str, caption: str, meta: dict[str, str]) -> list[str]:
    """Every caption of a video, for training (one sampled per epoch) and evaluation (all of them) alike:
    the `captions` manifest column, a JSON list of strings holding every caption of the video, `caption`
    included (train.formats writes `caption` = the first), kept by the store as meta; else [caption]."""
    raw = meta.get(CAPTIONS_COLUMN, "")
    if not raw:
        return [caption]
    try:
        got = json.loads(raw)
    except ValueError as e:
        raise DataError(f"video {video_id!r}: the `captions` column must be a JSON list of strings, "
                        f"got {raw[:80]!r}") from e
    if not isinstance(got, list) or not got or not all(isinstance(c, str) for c in got):
        raise DataError(f"video {video_id!r}: the `captions` column must be a non-empty JSON list of strings, "
                        f"got {got!r:.80}")
    if caption.strip() not in {c.strip() for c in got}:
        raise DataError(f"video {video_id!r}: its `caption` {caption[:60]!r} is not in its `captions` list "
                        f"{got[:3]!r}...; the `captions` column lists every caption of the video, `caption` "
                        "included (a column of extra captions only is the old form: add the caption to it)")
    return got


@dataclass
class SplitData:
    video_ids: list[str]
    captions: list[list[str]]  # every caption of each video (video_captions)
    twins: list[str]  # the colour-swapped twin's video id, "" when none
    frame_times: np.ndarray  # [N, T] seconds
    video: VideoBatch  # all videos of the split, features in float16 (cast per batch)

    def __len__(self) -> int:
        return len(self.video_ids)

    def batch(self, idx: torch.Tensor) -> VideoBatch:
        return self.video.index(idx).float()


def geom_dim(units: str, T: int) -> int:
    return TRACK_GEOM * T if units == "track" else REGION_GEOM


def store_signature(meta) -> dict:
    """What a checkpoint must agree with to read a store (meta: the store's StoreMeta)."""
    d = meta.dims
    return {"format_version": meta.format_version, "T": d.T, "K": d.K, "Df": d.Df, "Dr": d.Dr}


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


def displacement(centre, present):
    """Centres [..., T, 2] and presence [..., T] (numpy or torch) -> [..., T-1, 2]: 10 x the move to the next
    frame where the unit is present in both, else 0 (TRACK_GEOM's 10*dx, 10*dy)."""
    both = present[..., 1:] & present[..., :-1]
    return (centre[..., 1:, :] - centre[..., :-1, :]) * both[..., None] * 10.0


def track_tokens(a: dict[str, np.ndarray], max_units: int, width: int = 0) -> tuple[np.ndarray, ...]:
    """One token per region class per video (video_batch passes track ids from `linked` as the class),
    built for the whole batch at once. A video keeps its max_units classes of highest total score (ties:
    lower class), ordered by first appearance; where a class has several boxes in a frame, the
    best-scoring one is its box there. R = the most tracks of a video in the batch (>= 1), or `width` if
    larger: a padded slot's values come from its own video only, so the tokens of a video padded to
    width are those of any batch cut to its R (VideoTokenCache relies on it).
    -> features [N, R, Dr], geometry [N, R, 7T], frame index [N, R] (= T), mask [N, R], class [N, R]."""
    feats, boxes, classes, scores = (a["region_features"], a["region_boxes"], a["region_classes"].astype(np.int64),
                                     a["region_scores"].astype(np.float32))
    N, T, K, Dr = feats.shape
    real = classes >= 0  # [N, T, K]
    n_of, t_of, _ = np.nonzero(real)
    C = int(classes.max()) + 1 if real.any() else 1
    key, inv = np.unique(n_of * C + classes[real], return_inverse=True)  # one entry per (video, class)
    total = np.bincount(inv, weights=scores[real], minlength=len(key))
    first = np.full(len(key), T)
    np.minimum.at(first, inv, t_of)
    vid, cls = key // C, key % C
    by_score = np.lexsort((cls, -total, vid))  # per video: highest total first
    keep = by_score[_rank_in_group(vid[by_score]) < max_units]
    keep = keep[np.lexsort((cls[keep], first[keep], vid[keep]))]  # per video: order of first appearance
    slot = _rank_in_group(vid[keep])
    R = max(1, width, int(slot.max()) + 1 if len(keep) else 1)
    out_c = np.full((N, R), -1, np.int64)  # [N, R] region class of each track
    out_c[vid[keep], slot] = cls[keep]
    out_m = out_c >= 0  # [N, R]
    match = (classes[:, None] == out_c[:, :, None, None]) & out_m[:, :, None, None]  # [N, R, T, K]
    slot_scores = np.where(match, scores[:, None] + 1.0, 0.0)  # +1 so a zero score still wins
    best = slot_scores.argmax(-1)  # [N, R, T]
    here = slot_scores.max(-1) > 0  # [N, R, T]
    n_ix, t_ix = np.arange(N)[:, None, None], np.arange(T)[None, None, :]
    f = feats[n_ix, t_ix, best].astype(np.float32)  # [N, R, T, Dr]
    out_f = ((f * here[..., None]).sum(2) / np.maximum(here.sum(2), 1)[..., None]).astype(np.float16)
    cs = _centre_size(boxes[n_ix, t_ix, best]) * here[..., None]  # [N, R, T, 4]
    step = np.zeros((N, R, T, 2), np.float32)
    step[:, :, :-1] = displacement(cs[..., :2], here)
    geom = np.concatenate([cs, here[..., None], step], axis=-1).astype(np.float32)  # [N, R, T, 7]
    unit_frame = np.full((N, R), T, np.int64)
    return out_f, geom.reshape(N, R, T * TRACK_GEOM), unit_frame, out_m, out_c


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """For a sorted array of group ids, each element's index within its group."""
    if len(group) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    return np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))


def check_finite(a: dict[str, np.ndarray]) -> np.ndarray:
    """[N] True where every float array of the video is finite (NaN/Inf videos must never be trained on)."""
    ok = np.ones(len(a["frame_features"]), bool)
    for name in ("frame_features", "region_features", "region_boxes", "region_scores", "frame_times"):
        x = a[name]
        ok &= np.isfinite(x.reshape(len(x), -1)).all(1)
    return ok


def region_tokens(a: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """One token per box per frame: 6-d geometry plus displacement to the same class (video_batch: the same
    track) in the next frame."""
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


class TrackCache:
    """link_tracks' ids per video, kept by a hash of the video's boxes, region features and padding mask.
    Training reads every video once per epoch and linking (a Python loop over frame pairs) would be redone
    each time: ~10% of an ablation run's CPU. A video's ids depend on its own arrays only, never on the
    other videos of its batch, so a cached entry is bitwise what linking again would give. Bounded (oldest
    out first): a corpus larger than the cache just links again."""

    def __init__(self, size: int = 16384):
        self.size = size
        self._ids: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __call__(self, boxes: np.ndarray, feats: np.ndarray, real: np.ndarray) -> np.ndarray:
        """As link_tracks: boxes [N, T, K, 4], feats [N, T, K, D], real [N, T, K] -> ids [N, T, K]."""
        keys = [hashlib.blake2b(b"".join((str((boxes.dtype, feats.dtype, feats.shape[1:])).encode(), boxes[n].tobytes(),
                                           feats[n].tobytes(), real[n].tobytes())), digest_size=16).digest()
                for n in range(len(boxes))]
        missing = [n for n, k in enumerate(keys) if k not in self._ids]
        if missing:
            for n, ids in zip(missing, link_tracks(boxes[missing], feats[missing], real[missing])):
                self._ids[keys[n]] = ids.astype(np.int32)  # ids < T * K: half the memory of int64
        out = np.stack([self._ids[k] for k in keys]).astype(np.int64) if keys else np.full(real.shape, -1, np.int64)
        for k in keys:
            self._ids.move_to_end(k)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return out


_TRACKS = TrackCache()  # per process: the training loop's and every DataLoader worker's own


def linked(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays with each region's class replaced by its track id from geometry and appearance
    (train/tracks.py): the stored class (a category, or with "given" boxes the object's identity) is never
    what groups regions into tracks."""
    ids = _TRACKS(a["region_boxes"], a["region_features"], a["region_classes"] >= 0)
    return {**a, "region_classes": ids}


def video_batch(a: dict[str, np.ndarray], units: str, max_units: int, width: int = 0) -> VideoBatch:
    """Store arrays of N videos -> video tokens (features kept in float16); regions linked into tracks
    by geometry and appearance first (`linked`). width: track tokens padded to at least this many."""
    a = linked(a)
    tokens = track_tokens(a, max_units, width)[:4] if units == "track" else region_tokens(a)
    unit_f, unit_g, unit_t, unit_m = (torch.from_numpy(np.ascontiguousarray(x)) for x in tokens)
    frames = torch.from_numpy(np.ascontiguousarray(a["frame_features"].astype(np.float16)))  # [N, T, Df]
    return VideoBatch(frames, torch.ones(frames.shape[:2], dtype=torch.bool), unit_f.half(), unit_g.float(),
                      unit_t, unit_m)


class VideoTokenCache:
    """The video tokens of each stored row, so that a video streamed again in a later epoch is not read,
    checked for NaN/Inf, linked and tokenised again (~1/4 of an ablation run's CPU time before). A
    video's tokens depend on its own arrays only, padded track slots included (track_tokens), so the
    batch stacked from cached videos with its unit axis cut to the batch's most tracks is bitwise
    video_batch's (tests/test_ablation_cache.py). Keyed by row: one cache serves one store. keep=False
    (a corpus whose tokens would not fit in memory; an epoch reads each video once, so a partial cache
    would never be hit) drops the entries after each batch."""

    def __init__(self, units: str, max_units: int, keep: bool = True):
        self.units, self.max_units, self.keep = units, max_units, keep
        self._rows: dict[int, tuple[torch.Tensor, ...] | None] = {}  # row -> VideoBatch fields; None = NaN/Inf

    @staticmethod
    def video_bytes(units: str, max_units: int, T: int, K: int, Df: int, Dr: int) -> int:
        """Memory of one video's entry: frames float16 + frame mask, then per unit token its float16
        feature, float32 geometry, int64 frame index and mask."""
        U = max_units if units == "track" else T * K
        return T * (2 * Df + 1) + U * (2 * Dr + 4 * geom_dim(units, T) + 9)

    def finite(self, rows: list[int], read) -> np.ndarray:
        """[n] True where the row's features are all finite. Rows not cached are read (read(rows) -> store
        arrays [n, ...], as ShardSource.read) and tokenised."""
        missing = [r for r in rows if r not in self._rows]
        if missing:
            a = read(missing)
            ok = check_finite(a)  # [n]
            video = video_batch({k: v[ok] for k, v in a.items()}, self.units, self.max_units, self.max_units) \
                if ok.any() else None
            fields = [getattr(video, f) for f in VideoBatch.__dataclass_fields__] if video is not None else []
            for r, good, j in zip(missing, ok, np.cumsum(ok) - 1):  # j: the row's index among the finite ones
                # a copy: a view would keep the whole batch alive
                self._rows[r] = tuple(x[j].clone() for x in fields) if good else None
        return np.array([self._rows[r] is not None for r in rows], dtype=bool)

    def batch(self, rows: list[int]) -> VideoBatch:
        """The VideoBatch of finite rows (after `finite`), as video_batch would build it from their arrays."""
        fields = [torch.stack(x) for x in zip(*(self._rows[r] for r in rows))]
        if self.units == "track":  # unit axis: the batch's most tracks, as track_tokens sizes it
            R = max(1, int(fields[-1].sum(1).max()))
            fields[2:] = [x[:, :R] for x in fields[2:]]
        if not self.keep:
            self._rows.clear()
        return VideoBatch(*fields)


def load_split(features: str, split: str, units: str, max_units: int, expected: dict | None = None) -> tuple[SplitData, dict]:
    """Read the videos of `split` ("" = all stored videos) into memory as video tokens."""
    reader = open_store(features)
    if expected is not None:
        check_signature(store_signature(reader.store_meta), expected, repr(features))
    ids = [v for v in reader.video_ids if not split or reader.meta(v).get("split", "") == split]
    if not ids:
        splits = sorted({reader.meta(v).get("split", "") for v in reader.video_ids})
        raise DataError(f"split {split!r} of store {features!r} has no stored videos (splits present: {splits}, "
                        f"{len(reader.video_ids)} videos stored ok); pick another split or check `vlpcache status`")
    a = reader.read_many(ids)
    finite = check_finite(a)
    if not finite.all():
        log.warning("split %r of %s: skipping %d video(s) whose features contain NaN or Inf: %s", split, features,
                    int((~finite).sum()), [v for v, f in zip(ids, finite) if not f][:10])
        ids = [v for v, f in zip(ids, finite) if f]
        a = {k: ([c for c, f in zip(v, finite) if f] if k == "caption" else v[finite]) for k, v in a.items()}
    video = video_batch(a, units, max_units)
    metas = [reader.meta(v) for v in ids]
    twins = [m.get("twin", "") for m in metas]
    captions = [_eval_captions(v, c, m) for v, c, m in zip(ids, a["caption"], metas)]
    log.info("split %r of %s: %d videos, T=%d, %d %s tokens per video", split, features, len(ids),
             reader.dims.T, video.units.shape[1], units)
    return SplitData(ids, captions, twins, np.asarray(a["frame_times"]), video), store_signature(reader.store_meta)


def _eval_captions(video_id: str, caption: str, meta: dict[str, str]) -> list[str]:
    if CAPTIONS_COLUMN not in meta and "\n" in caption:
        raise DataError(f"video {video_id!r}: its caption holds a line break ({caption[:60]!r}...). Several "
                        "captions of a video are no longer given one per line: list them all in a `captions` "
                        "manifest column (a JSON list; `python -m train.formats msrvtt` writes it) and extract "
                        "again, or remove the line break from a single caption")
    return video_captions(video_id, caption, meta)


def eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices rank, rank + world, ...: every item is evaluated exactly once (nothing dropped or padded)."""
    return torch.arange(rank, n, world_size)
