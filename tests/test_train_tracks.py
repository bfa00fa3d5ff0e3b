"""Tracks from geometry and appearance (train/tracks.py): the stored class is never read, so two objects
of one class stay two tracks, an object keeps its track when another one crosses near it, and a track
survives a detector's miss of up to MAX_GAP frames."""
import numpy as np

from train.tracks import link_tracks


def _scene():
    """2 videos, T=6, K=3. Video 0: A moves right, B moves left along the same row, crossing A between
    frames 2 and 3 (a nearest-centre tracker without velocity would swap them); C enters at frame 3.
    Video 1: one object, absent in frame 2 (missed: the same track after the gap)."""
    T, K, D = 6, 3, 8
    rng = np.random.default_rng(0)
    look = rng.normal(size=(3, D))
    boxes = np.zeros((2, T, K, 4), np.float32)
    feats = np.zeros((2, T, K, D), np.float32)
    real = np.zeros((2, T, K), bool)
    for t in range(T):
        objs = [(0.1 + 0.15 * t, 0.5, 0), (0.9 - 0.15 * t, 0.52, 1)] + ([(0.5, 0.1 + 0.05 * t, 2)] if t >= 3 else [])
        order = rng.permutation(len(objs))  # slots hold objects in a different order every frame
        for k, i in enumerate(order):
            cx, cy, o = objs[i]
            boxes[0, t, k] = [cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05]
            feats[0, t, k] = look[o] + 0.05 * rng.normal(size=D)
            real[0, t, k] = True
        if t != 2:
            boxes[1, t, 0] = [0.4, 0.4, 0.5, 0.5]
            feats[1, t, 0] = look[0]
            real[1, t, 0] = True
    truth = np.full((2, T, K), -1)
    for t in range(T):
        for k in np.flatnonzero(real[0, t]):
            truth[0, t, k] = int(np.argmax(look @ feats[0, t, k]))
    return boxes, feats, real, truth


def test_tracks_follow_each_object_through_a_crossing_and_a_missed_frame():
    boxes, feats, real, truth = _scene()
    ids = link_tracks(boxes, feats, real)
    assert (ids[~real] == -1).all()
    pairs = {(int(a), int(b)) for a, b in zip(ids[0][real[0]], truth[0][real[0]])}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # one track per object, no switch
    assert ids[1, :, 0].tolist() == [0, 0, -1, 0, 0, 0]
    assert link_tracks(boxes, feats, real, max_gap=0)[1, :, 0].tolist() == [0, 0, -1, 1, 1, 1]


def test_a_gap_longer_than_max_gap_or_a_jump_beyond_the_gate_starts_a_new_track():
    """Even with the same features: a box unseen for more than max_gap frames, or one that jumps farther
    than the gate, is a new track."""
    boxes, feats, real, _ = _scene()
    real[1, 1:4, 0] = False  # unseen in frames 1-3: a gap of 3 > MAX_GAP = 2
    assert link_tracks(boxes, feats, real)[1, :, 0].tolist() == [0, -1, -1, -1, 1, 1]
    boxes, feats, real, _ = _scene()
    boxes[1, 4:, 0] = [0.0, 0.0, 0.1, 0.1]  # far from 0.45,0.45
    assert link_tracks(boxes, feats, real)[1, :, 0].tolist() == [0, 0, -1, 0, 1, 1]


def test_a_missed_object_is_continued_along_its_velocity_not_swapped_with_a_neighbour():
    """Two objects of the same look move right side by side, 0.1 apart; the upper one is missed in
    frame 2. Without velocity and gap handling its track would die (or take the lower box)."""
    T, K, D = 5, 2, 4
    boxes = np.zeros((1, T, K, 4), np.float32)
    real = np.ones((1, T, K), bool)
    for t in range(T):
        for k, cy in enumerate((0.3, 0.4)):
            cx = 0.1 + 0.12 * t
            boxes[0, t, k] = [cx - 0.04, cy - 0.04, cx + 0.04, cy + 0.04]
    real[0, 2, 0] = False
    feats = np.ones((1, T, K, D), np.float32)
    ids = link_tracks(boxes, feats, real)
    assert ids[0, :, 0].tolist() == [0, 0, -1, 0, 0] and ids[0, :, 1].tolist() == [1, 1, 1, 1, 1]
