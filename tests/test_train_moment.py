"""Moment retrieval on merged sequences of random crops, end to end through train.evaluate with
hand-made embeddings: the plan's spans, the tie rule of the window decoder, the IoU, and the
localization head reading the per-position region match (the regions visible at each position)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import load_config
from train.data import SplitData
from train.evaluate import Embeddings, best_window, moment_retrieval
from train.model import VideoBatch, VideoTextModel


def test_best_window_matches_brute_force_and_breaks_plateau_ties_by_length():
    score = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(0))
    for q, (s, e) in enumerate(best_window(score).tolist()):
        best = max((score[q, a, b].item(), a, b) for a, b in itertools.product(range(6), range(6)) if a <= b)
        assert (s, e - 1) == best[1:]
    plateau = torch.tensor([0.0, 0, 1, 1, 1, 0])  # start + end logits constant over positions 2..4
    assert best_window((plateau[:, None] + plateau[None, :])[None]).tolist() == [[2, 5]]


def _split(N, T, Df=4, Dr=4):
    g = torch.Generator().manual_seed(2)
    geom = torch.zeros(N, 1, T, 7)
    geom[..., 4] = 1.0  # each video's single track is visible in every frame
    video = VideoBatch(torch.randn(N, T, Df, generator=g), torch.ones(N, T, dtype=torch.bool),
                       torch.randn(N, 1, Dr, generator=g), geom.reshape(N, 1, 7 * T), torch.full((N, 1), T),
                       torch.ones(N, 1, dtype=torch.bool))
    ids = [f"v{i}" for i in range(N)]
    return SplitData(ids, [f"caption {i}" for i in ids], [f"v{i ^ 1}" for i in range(N)], np.zeros((N, T)), video)


def _model_and_embeddings(N=4, T=6, E=8):
    cfg = load_config(None, ["loss.loc_weight=1.0", "loss.loc_videos=4", "loss.loc_min_frames=3", "model.dim=16",
                             "model.embed_dim=8", "model.heads=2"])
    model = VideoTextModel(cfg, Df=4, Dr=4, G=7 * T, T=T).eval()
    with torch.no_grad():  # the head decides by the match alone: start = end = match at the position
        for lin in (model.loc.query, model.loc.start, model.loc.end, model.loc.boundary, model.loc.member):
            lin.weight.zero_()
            lin.bias.zero_()
    g = torch.Generator().manual_seed(1)
    regions = torch.eye(E)[:N, None]  # [N, 1, E]: video i's single track points along axis i
    emb = Embeddings(video=F.normalize(torch.randn(N, E, generator=g), dim=-1),
                     text=F.normalize(torch.randn(N, E, generator=g), dim=-1),
                     text_cls=torch.randn(N, 16, generator=g), frames=torch.randn(N, T, 16, generator=g),
                     units=regions.clone(), unit_mask=torch.ones(N, 1, dtype=torch.bool),
                     regions=regions, region_mask=torch.ones(N, 1, dtype=torch.bool))
    return model, cfg, emb, _split(N, T)


def test_moment_retrieval_with_the_head_finds_each_captions_crop_exactly():
    model, cfg, emb, split = _model_and_embeddings()
    out = moment_retrieval(model, cfg, emb, split, seed=0, device=torch.device("cpu"))
    assert out["moment_queries"] == 4
    assert out["moment_R@1_IoU0.7"] == 100.0 and out["moment_mIoU"] == 100.0 and out["moment_exact"] == 100.0


def test_moment_retrieval_with_swapped_regions_finds_the_twin():
    """Regions of videos 2k and 2k+1 swapped (a colour-swapped twin pair, here in one group): every
    caption lands on the other video of its pair, which never overlaps its own."""
    model, cfg, emb, split = _model_and_embeddings()
    emb.regions = emb.regions[torch.arange(4) ^ 1]
    out = moment_retrieval(model, cfg, emb, split, seed=0, device=torch.device("cpu"))
    assert out["moment_R@1_IoU0.3"] == 0.0 and out["moment_mIoU"] == 0.0


def test_window_baseline_is_scored_on_the_same_queries():
    """Without the head the same plan is decoded by the window baseline: frame tokens equal to each
    caption's own text embedding make it find every crop exactly."""
    model, cfg, emb, split = _model_and_embeddings()
    cfg.loss.loc_weight = 0.0
    with torch.no_grad():
        model.proj_video.weight.copy_(torch.eye(16)[:8])
        model.proj_video.bias.zero_()
    emb.text = torch.eye(8)[:4]
    emb.frames = torch.eye(16)[:4, None].repeat(1, 6, 1)  # video i's frames project onto axis i
    out = moment_retrieval(model, cfg, emb, split, seed=0, device=torch.device("cpu"))
    assert out["moment_queries"] == 4 and out["moment_exact"] == 100.0


def test_multi_caption_evaluation_scores_caption_i_against_video_i_div_q():
    """q = 2 captions per video through evaluate(): text rows follow their videos, the retrieval metrics
    use the multi-caption protocol, binding and moments are left out."""
    from train.evaluate import evaluate, split_captions
    from train.objectives import TextBatch

    N, T, q, L = 4, 6, 2, 5
    model, cfg, _, split = _model_and_embeddings(N=N, T=T)
    split.captions = [[f"a red circle {i}", f"the same clip, told again {i}"] for i in range(N)]
    captions, got_q = split_captions(split.captions)
    assert got_q == q and captions[2:4] == ["a red circle 1", "the same clip, told again 1"]
    mask = torch.ones(N * q, L, dtype=torch.bool)
    text = TextBatch(torch.randn(N * q, L, 384, generator=torch.Generator().manual_seed(3)), mask,
                     torch.zeros(N * q, L, dtype=torch.long), mask.clone())
    out = evaluate(model, cfg, split, text, torch.device("cpu"))
    assert out["captions_per_video"] == 2.0 and out["videos"] == 4.0
    assert "t2v_R@1" in out and "t2vavg_R@1" in out and "v2t_R@1" in out
    assert "binding_acc" not in out and not any(k.startswith("moment") for k in out)


def test_span_scores_end_a_span_where_the_membership_changes():
    """Flat start/end logits (no boundary evidence): the membership alone puts each text's best span on
    exactly its own positions; padding is never inside a span."""
    from train.losses import span_scores

    owner = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1]])  # [G=1, S=10]
    M, S = 3, owner.shape[1]
    member = (F.one_hot(owner.clamp(min=0), M).float().transpose(1, 2) * 3.0)  # [1, M, S]
    pad = (owner < 0)[:, None]
    out = {"start": torch.zeros(1, M, S).masked_fill(pad, float("-inf")),
           "end": torch.zeros(1, M, S).masked_fill(pad, float("-inf")), "member": member.masked_fill(pad, float("-inf"))}
    spans = best_window(span_scores(out)[0]).tolist()
    assert spans == [[0, 3], [3, 5], [5, 9]]


def _moving_split(units: str, N=8, T=4, K=2, Df=6, Dr=5):
    """N videos of K moving boxes (one absent in frame 0), tokens built by the real data path
    (train.data.video_batch: linking, then track or region tokens)."""
    from train.data import video_batch

    rng = np.random.default_rng(0)
    start = rng.uniform(0.2, 0.6, (N, 1, K, 2)) + 0.05 * np.arange(T)[None, :, None, None] * rng.choice([-1, 1], (N, 1, K, 2))
    boxes = np.concatenate([start - 0.1, start + 0.1], -1).astype(np.float32)  # [N, T, K, 4]
    classes = np.broadcast_to(np.arange(K, dtype=np.int16), (N, T, K)).copy()
    classes[:, 0, 1] = -1  # the second object enters at frame 1
    feats = np.repeat(rng.standard_normal((N, 1, K, Dr)), T, 1) + 0.05 * rng.standard_normal((N, T, K, Dr))
    a = {"frame_features": rng.standard_normal((N, T, Df)).astype(np.float16),
         "region_features": feats.astype(np.float16), "region_boxes": boxes * (classes >= 0)[..., None],
         "region_classes": classes, "region_scores": (classes >= 0).astype(np.float16)}
    ids = [f"v{i}" for i in range(N)]
    return SplitData(ids, [[f"caption {i}"] for i in ids], [f"v{i ^ 1}" for i in range(N)], np.zeros((N, T)),
                     video_batch(a, units, max_units=K))


def _clip_model(units: str, T=4, Df=6, Dr=5):
    from train.data import geom_dim

    cfg = load_config(None, [f"model.units={units}", "loss.loc_videos=4", f"loss.loc_min_frames={T}",
                             "model.dim=16", "model.embed_dim=8", "model.heads=2", "model.dropout=0.0"])
    torch.manual_seed(0)
    return VideoTextModel(cfg, Df=Df, Dr=Dr, G=geom_dim(units, T), T=T).eval(), cfg


@pytest.mark.parametrize("units", ["track", "region"])
def test_a_window_on_a_whole_crop_is_encoded_as_the_clip_itself(units):
    """Crops of all T frames (loc_min_frames = T): the window on a video's crop is that video, so its clip
    (frames, tokens of what is visible, geometry and displacements rebuilt from the window) must encode to
    the retrieval embedding of the video, through the real encoder."""
    from train.moments import plan_merge, window_clips

    split = _moving_split(units)
    model, cfg = _clip_model(units)
    groups = torch.randperm(8, generator=torch.Generator().manual_seed(0)).reshape(2, 4)
    plan = plan_merge(groups, 4, 4, torch.Generator().manual_seed(1))
    spans = plan.spans.reshape(-1, 2)
    windows = torch.stack([torch.arange(2).repeat_interleave(4), spans[:, 0], spans[:, 1] - spans[:, 0]], 1)
    with torch.no_grad():
        got = model.global_video(model.encode_video(window_clips(split.video, groups, plan, windows, units).float()))
        want = model.global_video(model.encode_video(split.batch(groups.reshape(-1))))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_clip_window_baseline_finds_each_caption_and_is_scored_by_moment_metrics():
    """A caption whose embedding is its video's retrieval embedding: the clip-encoded window baseline must
    put it on exactly its video's crop (every other candidate window mixes two videos), decoded by
    best_window and scored by moment_metrics like the frame-sum baseline, on the same queries."""
    from train.evaluate import embed_split
    from train.metrics import moment_metrics
    from train.objectives import TextBatch

    split = _moving_split("track")
    model, cfg = _clip_model("track")
    mask = torch.ones(8, 5, dtype=torch.bool)
    text = TextBatch(torch.randn(8, 5, 384, generator=torch.Generator().manual_seed(3)), mask,
                     torch.zeros(8, 5, dtype=torch.long), mask.clone())
    emb = embed_split(model, cfg, split, text, torch.device("cpu"))
    emb.text = emb.video.clone()
    out = moment_retrieval(model, cfg, emb, split, seed=0, device=torch.device("cpu"))
    clip = {k: v for k, v in out.items() if k.startswith("window_clip_")}
    assert set(clip) == {k.replace("moment_", "window_clip_", 1) for k in moment_metrics(np.zeros((1, 2)), np.ones((1, 2)))}
    assert clip["window_clip_exact"] == 100.0 and out["moment_queries"] == 8
    assert "moment_R@1_IoU0.7" in out  # the frame-sum baseline, on the same plan
