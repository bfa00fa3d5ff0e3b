"""The per-video cache of track linking (train/data.py TrackCache) is bitwise what linking again gives,
whatever the batch a video comes in, and links each video only once."""
import numpy as np

from train.data import TrackCache
from train.tracks import link_tracks


def _videos(n, T=6, K=4, D=16, seed=0):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.2, 0.8, (n, 1, K, 2)) + np.cumsum(rng.normal(0, 0.03, (n, T, K, 2)), axis=1)
    boxes = np.concatenate([centre - 0.05, centre + 0.05], -1).astype(np.float32)  # [n, T, K, 4]
    feats = rng.standard_normal((n, T, K, D)).astype(np.float16)
    real = rng.random((n, T, K)) < 0.8  # missed boxes: tracks break and restart
    return boxes, feats, real


def test_cached_ids_equal_linking_in_any_batch_and_each_video_is_linked_once():
    boxes, feats, real = _videos(12)
    cache = TrackCache(size=100)
    first = cache(boxes[:8], feats[:8], real[:8])
    assert first.dtype == np.int64 and np.array_equal(first, link_tracks(boxes[:8], feats[:8], real[:8]))
    order = np.array([11, 3, 9, 0, 5, 10])  # cached and new videos mixed, another batch composition
    got = cache(boxes[order], feats[order], real[order])
    assert np.array_equal(got, link_tracks(boxes[order], feats[order], real[order]))
    assert len(cache._ids) == 11  # 8 + the 3 new ones: cached videos were not linked again


def test_same_boxes_other_features_are_another_entry_and_the_cache_is_bounded():
    boxes, feats, real = _videos(6)
    other = feats.copy()
    other[0, 0, 0, 0] += 1  # appearance enters the linking cost: another key
    cache = TrackCache(size=100)
    cache(boxes[:1], feats[:1], real[:1])
    cache(boxes[:1], other[:1], real[:1])
    assert len(cache._ids) == 2
    small = TrackCache(size=4)
    assert np.array_equal(small(boxes, feats, real), link_tracks(boxes, feats, real)) and len(small._ids) == 4
