"""The streaming dataset on real (zarr) stores: disjoint rank/worker partitions, exact resume through a
real DataLoader with workers, seeded caption sampling, bad rows skipped and counted, a store still being
written, and the vectorised track tokens against the per-video definition."""
import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _train_helpers import _arrays, _caption, _scene, make_synthetic_store
from stores import create_store, open_store
from stores.schema import Dims
from train.data import DataError, track_tokens
from train.stream import FeatureStream, StreamPlan, StreamSpec, StreamState, _RankReader

DIMS = Dims(T=4, K=3, Df=16, Dr=24)


def _store(out, captions, metas=None, shards_to_commit=None, shard_size=8, seed=0):
    """A zarr store whose row i has caption captions[i] (and meta metas[i])."""
    rng = np.random.default_rng(seed)
    basis = {"color": rng.standard_normal((4, DIMS.Dr)), "shape": rng.standard_normal((4, DIMS.Dr)),
             "frame_color": rng.standard_normal((4, DIMS.Df)), "frame_shape": rng.standard_normal((4, DIMS.Df))}
    n = len(captions)
    w = create_store(out, "zarr", dims=DIMS, n_videos=n, shard_size=shard_size, provenance={"t": "stream"},
                     video_ids=[f"v{i:03d}" for i in range(n)])
    n_shards = (n + shard_size - 1) // shard_size
    for shard in (range(n_shards) if shards_to_commit is None else shards_to_commit):
        sw = w.shard_writer(shard)
        for row in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
            meta = {"split": "train", **((metas or {}).get(row, {}))}
            sw.put(row, f"v{row:03d}", captions[row], _arrays(_scene(rng, 2), rng, DIMS, basis), meta=meta)
        sw.commit()
    return out


def _take(stream, n, workers):
    it = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    out = []
    for _ in range(n):
        b = next(it)
        stream.state.advance(b["cursor"])
        out.append(b)
    return out


def test_slots_are_disjoint_and_cover_every_row_each_epoch():
    plan = StreamPlan(shards=[0, 1, 2, 4], shard_size=10, n_videos=50, slots=6, seed=3, buffer=7)
    for epoch in range(3):
        parts = [plan.order(epoch, s).take(0, 50) for s in range(6)]
        flat = sum(parts, [])
        assert len(flat) == len(set(flat)) == 40 and set(flat) == set(range(30)) | set(range(40, 50))
        assert all(parts)  # every slot has rows to read
    assert plan.order(0, 0).take(0, 50) != plan.order(1, 0).take(0, 50)  # reshuffled per epoch
    order = plan.order(2, 1)
    assert sum((order.take(p, 3) for p in range(0, len(order), 3)), []) == order.take(0, 50)  # across windows


def test_a_worker_holds_one_window_of_rows_and_a_bounded_number_of_shards(tmp_path):
    """A worker walks every shard in an epoch; it keeps the rows order of one shuffle window and the maps
    (shard files, rows parts) of the shards of two windows, not the epoch's rows or every shard's maps."""
    store = _store(tmp_path / "s", ["a red circle moves left"] * 48, shard_size=4)  # 12 shards
    stream = FeatureStream(StreamSpec(str(store), batch_size=4, shuffle_buffer=8))  # windows of 2 shards
    worker = _RankReader(stream, 0)
    reader, seen, held_rows, held_shards = worker.source.reader, set(), 0, 0
    for _, batch in zip(range(24), worker.batches()):  # two epochs
        seen |= {int(r) // 4 for r in batch["rows"]}
        held_rows = max(held_rows, len(worker._order._rows))
        held_shards = max(held_shards, len(reader._open), len(reader.index._rows))
    assert seen == set(range(12)) and (worker.epoch, worker.pos) == (1, 48)
    assert held_rows == 8 and held_shards <= 4  # unbounded: 48 rows, 12 shards


def test_resume_through_dataloader_workers_sees_the_same_batches(tmp_path):
    store = make_synthetic_store(tmp_path / "s", n_train=40, n_test=8)
    spec = StreamSpec(str(store), batch_size=6, workers=2, shuffle_buffer=8, seed=5)
    full = [b["rows"].tolist() for b in _take(FeatureStream(spec), 9, 2)]  # crosses epochs of both workers
    first = FeatureStream(spec)
    head = [b["rows"].tolist() for b in _take(first, 5, 2)]
    saved = StreamState.from_dict(first.state.to_dict())  # as the checkpoint stores it
    tail = [b["rows"].tolist() for b in _take(FeatureStream(spec, saved), 4, 2)]
    assert head + tail == full
    assert all(len(set(rows)) == len(rows) == 6 for rows in full)  # no video twice in a batch
    for b in full:
        assert not set(b) & set(range(40, 48))  # only the train split
    # two ranks read disjoint videos within an epoch
    ranks = [[r for b in _take(FeatureStream(StreamSpec(str(store), batch_size=3, rank=k, world_size=2, workers=0,
                                                         seed=5)), 3, 0) for r in b["rows"].tolist()] for k in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_several_captions_one_sampled_per_epoch_seeded(tmp_path):
    choices = ["a red circle moves left", "a small red ball rolls to the left", "red round thing going left"]
    metas = {i: {"captions": json.dumps(choices)} for i in range(8)}  # every caption, `caption` included
    store = _store(tmp_path / "s", [choices[0]] * 8, metas)
    seen = {}
    for epoch_batch in _take(FeatureStream(StreamSpec(str(store), batch_size=8, seed=1)), 6, 0):
        for vid, cap in zip(epoch_batch["video_ids"], epoch_batch["captions"]):
            seen.setdefault(vid, []).append(cap)
    assert all(c in choices for caps in seen.values() for c in caps)
    assert len({c for caps in seen.values() for c in caps}) == 3  # every caption gets sampled
    again = [b["captions"] for b in _take(FeatureStream(StreamSpec(str(store), batch_size=8, seed=1)), 6, 0)]
    first = [b["captions"] for b in _take(FeatureStream(StreamSpec(str(store), batch_size=8, seed=1)), 6, 0)]
    assert again == first
    bad = _store(tmp_path / "bad", ["a"] * 8, {0: {"captions": "not json"}})
    with pytest.raises(DataError, match="captions` column must be a JSON list"):
        _take(FeatureStream(StreamSpec(str(bad), batch_size=8)), 1, 0)
    old = _store(tmp_path / "old", [choices[0]] * 8, {0: {"captions": json.dumps(choices[1:])}})  # extras only
    with pytest.raises(DataError, match="is not in its `captions` list"):
        _take(FeatureStream(StreamSpec(str(old), batch_size=8)), 1, 0)


def _corrupt_with_nan(store, row: int, value: float = np.nan) -> None:
    """Write float16 NaN (or `value`) over the first value of a video's frame features, in place in its
    uncompressed zarr chunk (the writer refuses non-finite values; a foreign writer or a bad disk does not)."""
    reader = open_store(store)
    shard_size = reader.store_meta.shard_size
    shard_reader = reader._shard(row // shard_size)
    offset, _ = shard_reader.spans["frame_features"][row % shard_size]
    path = shard_reader.paths["frame_features"]
    reader.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], np.float16).tobytes())


def test_nonfinite_features_and_empty_captions_are_skipped_and_counted(tmp_path, caplog):
    captions = [_caption(_scene(np.random.default_rng(i), 1)) for i in range(16)]
    captions[3] = "   "  # empty after tokenisation
    store = _store(tmp_path / "s", captions)
    _corrupt_with_nan(store, 9)
    with caplog.at_level(logging.WARNING, logger="train.stream"):
        batches = _take(FeatureStream(StreamSpec(str(store), batch_size=5)), 3, 0)  # the epoch: 15 usable rows
    rows = sorted(r for b in batches for r in b["rows"].tolist())
    assert rows == [r for r in range(16) if r not in (3, 9)]
    assert sorted(len(b["rows"]) for b in batches) == [4, 5, 5]  # the NaN video's batch is one smaller
    assert batches[-1]["skipped"] == {"nonfinite": 1, "empty_caption": 1}
    assert "'v009': its features contain NaN or Inf" in caplog.text and "'v003': its caption" in caplog.text


def test_batches_are_the_same_with_the_per_row_caches_and_without(tmp_path, monkeypatch):
    """Three epochs of a stream whose rows' records and video tokens are kept after their first read,
    against one that reads and tokenises every batch afresh (cache_mb=0, no record cache): the same
    batches, bit for bit, NaN video and empty caption skipped and counted alike."""
    import train.stream

    captions = [_caption(_scene(np.random.default_rng(i), 1 + i % 2)) for i in range(16)]
    captions[3] = "   "
    store = _store(tmp_path / "s", captions)
    _corrupt_with_nan(store, 9)
    spec = StreamSpec(str(store), batch_size=4, seed=2)
    kept = _RankReader(FeatureStream(spec), 0)
    monkeypatch.setattr(train.stream, "ROW_CACHE", 0)
    fresh = _RankReader(FeatureStream(StreamSpec(str(store), batch_size=4, seed=2, cache_mb=0)), 0)
    assert kept.videos.keep and kept._rows is not None and not fresh.videos.keep and fresh._rows is None
    for a, b in zip(range(9), zip(kept.batches(), fresh.batches())):  # 3 per epoch: 14 usable rows
        a, b = b
        for key in ("ids", "mask", "phrase", "rows", "video_ids", "captions", "cursor", "skipped"):
            assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key
        for f, x in a["video"].items():
            y = b["video"][f]
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                                                      y.view(torch.uint8) if y.is_floating_point() else y), f
    assert a["skipped"] == {"nonfinite": 3, "empty_caption": 3} and a["cursor"][0] == 2
    assert len(kept.videos._rows) == 15 and len(kept._rows) == 16 and not fresh.videos._rows


def test_store_being_written_streams_committed_shards(tmp_path, caplog):
    store = _store(tmp_path / "s", ["a blue square moves up"] * 24, shards_to_commit=[0, 2])
    with caplog.at_level(logging.WARNING, logger="train.stream"):
        stream = FeatureStream(StreamSpec(str(store), batch_size=4))
    assert "still being written: streaming 2 committed shards, 1 pending" in caplog.text
    rows = {r for b in _take(stream, 8, 0) for r in b["rows"].tolist()}
    assert rows <= set(range(8)) | set(range(16, 24)) and len(rows) == 16
    # resuming keeps the shards the run started with, even after more were committed
    assert FeatureStream(StreamSpec(str(store), batch_size=4, shards=(0, 2))).shards == (0, 2)
    empty = _store(tmp_path / "e", ["x"] * 8, shards_to_commit=[])
    with pytest.raises(DataError, match="no committed shard yet"):
        FeatureStream(StreamSpec(str(empty), batch_size=4))


def test_trainer_skips_bad_videos_counts_them_and_trains_on_committed_shards(tmp_path, caplog):
    """The bad-input list through the trainer: a NaN and an Inf video, an empty caption, a pending shard."""
    from train.config import TrainConfig, apply_overrides
    from train.trainer import Trainer

    captions = [_caption(_scene(np.random.default_rng(i), 1)) for i in range(24)]
    captions[3] = "   "  # empty after tokenisation
    store = _store(tmp_path / "s", captions, shards_to_commit=[0, 1])  # shard 2 still being written
    _corrupt_with_nan(store, 9)
    _corrupt_with_nan(store, 12, np.inf)
    cfg = apply_overrides(TrainConfig(), ["optim.steps=3", "optim.batch_size=5", "data.workers=0",
                                          "data.eval_split=", "run.ckpt_every=0", "run.log_every=1"])
    with caplog.at_level(logging.WARNING, logger="train.stream"):
        trainer = Trainer(cfg, str(store), tmp_path / "run")
        records = [trainer.train_step() for _ in range(3)]  # 3 batches of 5: the epoch's 15 captioned rows
    trainer.checkpoint()
    assert "still being written: streaming 2 committed shards, 1 pending" in caplog.text
    assert "'v009': its features contain NaN or Inf" in caplog.text and "'v012': its features" in caplog.text
    assert "'v003': its caption '   ' is empty after tokenisation" in caplog.text
    # the counts the trainer logs to metrics.jsonl with every step
    assert (records[-1]["skipped_nonfinite"], records[-1]["skipped_empty_caption"]) == (2, 1)
    assert all(np.isfinite(r["loss"]) for r in records)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["stream_shards"].tolist() == [0, 1]  # a resume streams these, whatever is committed since


def _track_tokens_per_video(a, max_units):
    """The per-video definition the vectorised version must match (the former Python loop)."""
    feats, boxes, classes, scores = (a["region_features"], a["region_boxes"], a["region_classes"],
                                     a["region_scores"].astype(np.float32))
    N, T, K, Dr = feats.shape
    out_f = np.zeros((N, max_units, Dr), np.float16)
    out_g = np.zeros((N, max_units, T, 7), np.float32)
    out_c = np.full((N, max_units), -1, np.int64)
    for n in range(N):
        cls = classes[n]
        present = sorted(set(cls[cls >= 0].tolist()))
        total = {c: float(scores[n][cls == c].sum()) for c in present}
        keep = sorted(present, key=lambda c: (-total[c], c))[:max_units]
        keep.sort(key=lambda c: (int(np.argmax((cls == c).any(1))), c))
        for j, c in enumerate(keep):
            slot_scores = np.where(cls == c, scores[n] + 1.0, 0.0)
            best, here = slot_scores.argmax(1), slot_scores.max(1) > 0
            out_f[n, j] = feats[n, np.arange(T), best].astype(np.float32)[here].mean(0).astype(np.float16)
            b = boxes[n, np.arange(T), best]
            cs = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
            cs = cs * here[:, None]
            step = np.zeros((T, 2), np.float32)
            both = here[1:] & here[:-1]
            step[:-1] = (cs[1:, :2] - cs[:-1, :2]) * both[:, None] * 10.0
            out_g[n, j] = np.concatenate([cs, here[:, None], step], axis=1)
            out_c[n, j] = c
    R = max(1, int((out_c >= 0).sum(1).max()))
    return out_f[:, :R], out_g[:, :R].reshape(N, R, T * 7), out_c[:, :R]


def test_vectorised_track_tokens_match_the_per_video_definition():
    rng = np.random.default_rng(0)
    N, T, K, Dr = 12, 5, 6, 8
    classes = rng.integers(-1, 7, (N, T, K)).astype(np.int16)  # repeated classes in a frame, padding, gaps
    classes[0] = -1  # a video without any region
    a = {"region_features": rng.standard_normal((N, T, K, Dr)).astype(np.float16),
         "region_boxes": rng.uniform(0, 1, (N, T, K, 4)).astype(np.float32),
         "region_scores": rng.choice([0.0, 0.5, 1.0], (N, T, K)).astype(np.float16),  # ties and zero scores
         "region_classes": classes}
    for max_units in (3, 8):
        feats, geom, _, mask, cls = track_tokens(a, max_units)
        ref_f, ref_g, ref_c = _track_tokens_per_video(a, max_units)
        assert np.array_equal(cls, ref_c) and np.array_equal(mask, ref_c >= 0)
        np.testing.assert_allclose(feats.astype(np.float32), ref_f.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(geom, ref_g, atol=1e-6)
