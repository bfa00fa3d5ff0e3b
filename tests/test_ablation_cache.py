"""The per-video caches of train/data.py are bitwise what computing again gives, whatever the batch a
video comes in: track linking (TrackCache, links each video once) and the video tokens of streamed rows
(VideoTokenCache, reads and tokenises each video once)."""
import numpy as np
import pytest
import torch

from train.data import TrackCache, VideoTokenCache, check_finite, video_batch
from train.model import VideoBatch
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


def _store_arrays(n, T=5, K=4, Df=12, Dr=10, seed=1):
    """Store arrays of n videos with 0..K objects each (so batches differ in their most tracks), float16
    features with negative values (padded slots keep a signed zero), one NaN video."""
    rng = np.random.default_rng(seed)
    boxes, feats, _ = _videos(n, T, K, Dr, seed)
    objects = rng.integers(0, K + 1, n)
    objects[0] = 0  # a video without regions
    classes = np.where(np.arange(K)[None, None, :] < objects[:, None, None], np.arange(K), -1)
    classes = np.broadcast_to(classes, (n, T, K)).astype(np.int16)
    a = {"frame_features": rng.standard_normal((n, T, Df)).astype(np.float16), "region_features": feats,
         "region_boxes": boxes, "region_scores": rng.uniform(0, 1, (n, T, K)).astype(np.float16),
         "region_classes": classes, "region_counts": (classes >= 0).sum(2).astype(np.int16),
         "frame_times": np.tile(np.arange(T, dtype=np.float32), (n, 1))}
    a["frame_features"][7, 2, 3] = np.nan
    return a


@pytest.mark.parametrize("units,max_units", [("track", 2), ("track", 6), ("region", 2)])
def test_batches_of_cached_video_tokens_equal_video_batch_whatever_the_batch(units, max_units):
    """max_units 2: videos lose tracks; 6: more than any video has, so batches are cut to their most."""
    a = _store_arrays(20)
    tokenised = []  # rows the cache read

    def read(rows):
        return {k: v[rows] for k, v in a.items()}

    def cache_read(rows):
        tokenised.extend(rows)
        return read(rows)

    rng = np.random.default_rng(2)
    for keep in (True, False):
        cache, tokenised[:] = VideoTokenCache(units, max_units, keep=keep), []
        for _ in range(8):  # batches mixing cached and new videos, of different most-track counts
            rows = rng.choice(20, 6, replace=False).tolist()
            finite = cache.finite(rows, cache_read)
            assert np.array_equal(finite, check_finite(read(rows)))
            rows = [r for r, ok in zip(rows, finite) if ok]
            got, want = cache.batch(rows), video_batch(read(rows), units, max_units)
            for f in VideoBatch.__dataclass_fields__:
                x, y = getattr(got, f), getattr(want, f)
                assert x.dtype == y.dtype and x.shape == y.shape, f
                # bitwise, signed zeros of padded slots included
                assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                                   y.view(torch.uint8) if y.is_floating_point() else y), f
        if keep:  # each video read once; 7 (NaN) remembered as such
            assert len(tokenised) == len(set(tokenised)) and 7 in cache._rows and cache._rows[7] is None
        else:
            assert not cache._rows
