"""Tracks from box geometry and appearance: region boxes linked frame to frame, whatever their class.

A stored region's class is the detector's category (or, for "given" boxes, the box's row in the sidecar,
i.e. the object's identity: an oracle the trainer must not use). Tracks are therefore formed here, as a
tracking-by-detection step would (SORT / DeepSORT: Bewley et al. 2016, Wojke et al. 2017): boxes of
consecutive sampled frames are matched greedily, cheapest pair first (as CenterTrack does; Zhou et al.
2020), on a cost of
    |centre_j - (centre_i + velocity_i)| / gate  +  appearance * (1 - cos(feature_i, feature_j)),
where velocity_i is the displacement of box i's track over the previous frame pair (0 when new); a pair
costing more than 1 + appearance stays unmatched, and an unmatched box starts a new track. The classes
are never read.
"""
from __future__ import annotations

import numpy as np

GATE = 0.25  # largest predicted-centre error of a match, in frame widths (demo: <= 0.08 per sampled frame)
APPEARANCE = 0.5  # weight of the feature term against the normalised centre error


def link_tracks(boxes: np.ndarray, feats: np.ndarray, real: np.ndarray, gate: float = GATE,
                appearance: float = APPEARANCE) -> np.ndarray:
    """boxes [N, T, K, 4] normalised x1,y1,x2,y2, feats [N, T, K, D], real [N, T, K] bool ->
    track id [N, T, K] int64 (0, 1, ... per video in order of first appearance; -1 on padding)."""
    N, T, K, _ = boxes.shape
    centre = np.stack([boxes[..., 0] + boxes[..., 2], boxes[..., 1] + boxes[..., 3]], -1) / 2  # [N, T, K, 2]
    f = feats.astype(np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-6)  # [N, T, K, D]
    ids = np.full((N, T, K), -1, np.int64)
    velocity = np.zeros((N, K, 2), np.float32)  # of the box in slot k of the previous frame
    limit = 1.0 + appearance
    for n in range(N):
        next_id = 0
        for t in range(T):
            here = np.flatnonzero(real[n, t])
            if t > 0:
                prev = np.flatnonzero(real[n, t - 1])
            if t == 0 or len(prev) == 0 or len(here) == 0:
                ids[n, t, here] = np.arange(next_id, next_id + len(here))
                next_id += len(here)
                velocity[n] = 0.0
                continue
            guess = centre[n, t - 1, prev] + velocity[n, prev]  # [P, 2]
            dist = np.linalg.norm(centre[n, t, here][None] - guess[:, None], axis=-1) / gate  # [P, H]
            cost = dist + appearance * (1.0 - f[n, t - 1, prev] @ f[n, t, here].T)  # [P, H]
            new_velocity = np.zeros((K, 2), np.float32)
            matched, used = np.zeros(len(here), bool), np.zeros(len(prev), bool)
            for flat in np.argsort(cost, axis=None, kind="stable"):  # cheapest pair first
                r, c = divmod(int(flat), len(here))
                if cost[r, c] >= limit:
                    break
                if used[r] or matched[c] or dist[r, c] >= 1.0:
                    continue
                ids[n, t, here[c]] = ids[n, t - 1, prev[r]]
                new_velocity[here[c]] = centre[n, t, here[c]] - centre[n, t - 1, prev[r]]
                used[r] = matched[c] = True
            fresh = here[~matched]
            ids[n, t, fresh] = np.arange(next_id, next_id + len(fresh))
            next_id += len(fresh)
            velocity[n] = new_velocity
    return ids
