"""Tracks from box geometry and appearance: region boxes linked across frames, whatever their class.

A stored region's class is the detector's category (or, for "given" boxes, the box's row in the sidecar,
i.e. the object's identity: an oracle the trainer must not use). Tracks are therefore formed here, as a
tracking-by-detection step would (SORT / DeepSORT: Bewley et al. 2016, Wojke et al. 2017). Each track keeps
its last box, its velocity and the mean of its (normalised) features. A box of frame t is matched to a
track last seen at frame t - dt, dt <= 1 + max_gap (a detector misses an object now and then: DeepSORT's
track age), greedily, cheapest pair first (as CenterTrack does; Zhou et al. 2020), on a cost of
    |centre - (last centre + dt * velocity)| / (dt * gate)  +  appearance * (1 - cos(feature, track mean))
    + GAP_COST * (dt - 1),
where velocity is the track's displacement per frame over its last match (0 when new); a pair whose centre
term is >= 1 or whose cost is >= 1 + appearance stays unmatched, and an unmatched box starts a new track.
The classes are never read.
"""
from __future__ import annotations

import numpy as np

GATE = 0.25  # largest predicted-centre error of a match per frame step, in frame widths (demo: <= 0.08 per sampled frame)
APPEARANCE = 0.5  # weight of the feature term against the normalised centre error
MAX_GAP = 2  # frames a track may go unseen and still be continued (measured on demo val: see docs/training.md)
GAP_COST = 0.2  # per missed frame, so a box prefers the track seen last frame over an older one at equal cost


def link_tracks(boxes: np.ndarray, feats: np.ndarray, real: np.ndarray, gate: float = GATE,
                appearance: float = APPEARANCE, max_gap: int = MAX_GAP) -> np.ndarray:
    """boxes [N, T, K, 4] normalised x1,y1,x2,y2, feats [N, T, K, D], real [N, T, K] bool ->
    track id [N, T, K] int64 (0, 1, ... per video in order of first appearance; -1 on padding)."""
    N, T, K, _ = boxes.shape
    centre = np.stack([boxes[..., 0] + boxes[..., 2], boxes[..., 1] + boxes[..., 3]], -1) / 2  # [N, T, K, 2]
    f = feats.astype(np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-6)  # [N, T, K, D]
    ids = np.full((N, T, K), -1, np.int64)
    limit = 1.0 + appearance
    for n in range(N):
        last_t: list[int] = []  # per track id: frame it was last seen in
        last_c: list[np.ndarray] = []  # [2] its centre there
        vel: list[np.ndarray] = []  # [2] its displacement per frame
        mean_f: list[np.ndarray] = []  # [D] sum of its normalised features
        for t in range(T):
            here = np.flatnonzero(real[n, t])
            live = [i for i in range(len(last_t)) if t - last_t[i] <= 1 + max_gap]
            matched = np.zeros(len(here), bool)
            if len(here) and live:
                dt = t - np.array([last_t[i] for i in live], np.float32)  # [P]
                guess = np.stack([last_c[i] + d * vel[i] for i, d in zip(live, dt)])  # [P, 2]
                dist = np.linalg.norm(centre[n, t, here][None] - guess[:, None], axis=-1) / (dt[:, None] * gate)
                tf = np.stack([mean_f[i] for i in live])
                tf = tf / np.maximum(np.linalg.norm(tf, axis=-1, keepdims=True), 1e-6)  # [P, D]
                cost = dist + appearance * (1.0 - tf @ f[n, t, here].T) + GAP_COST * (dt[:, None] - 1)  # [P, H]
                used = np.zeros(len(live), bool)
                for flat in np.argsort(cost, axis=None, kind="stable"):  # cheapest pair first
                    r, c = divmod(int(flat), len(here))
                    if cost[r, c] >= limit:
                        break
                    if used[r] or matched[c] or dist[r, c] >= 1.0:
                        continue
                    i, k = live[r], here[c]
                    ids[n, t, k] = i
                    vel[i] = (centre[n, t, k] - last_c[i]) / dt[r]
                    last_t[i], last_c[i] = t, centre[n, t, k]
                    mean_f[i] = mean_f[i] + f[n, t, k]
                    used[r] = matched[c] = True
            for k in here[~matched]:
                ids[n, t, k] = len(last_t)
                last_t.append(t)
                last_c.append(centre[n, t, k])
                vel.append(np.zeros(2, np.float32))
                mean_f.append(f[n, t, k].copy())
    return ids
