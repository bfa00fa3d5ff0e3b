"""Moment retrieval on merged sequences, end to end through train.evaluate with hand-made embeddings:
positions -> segments, the tie rule of the window decoder, the IoU, and the localization head reading
the phrase-region match of each text against the video of each segment."""
import itertools

import torch
import torch.nn.functional as F

from train.config import load_config
from train.evaluate import Embeddings, best_window, moment_retrieval
from train.model import VideoTextModel


def test_best_window_matches_brute_force_and_breaks_plateau_ties_by_length():
    score = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(0))
    for q, (s, e) in enumerate(best_window(score).tolist()):
        best = max((score[q, a, b].item(), a, b) for a, b in itertools.product(range(6), range(6)) if a <= b)
        assert (s, e - 1) == best[1:]
    plateau = torch.tensor([0.0, 0, 1, 1, 1, 0])  # start + end logits constant over positions 2..4
    assert best_window((plateau[:, None] + plateau[None, :])[None]).tolist() == [[2, 5]]


def _model_and_embeddings(N=8, T=4, E=8):
    cfg = load_config(None, ["loss.loc_weight=1.0", "model.dim=16", "model.embed_dim=8", "model.heads=2"])
    model = VideoTextModel(cfg, Df=4, Dr=4, G=7 * T, T=T).eval()
    with torch.no_grad():  # the head decides by the match alone: start = end = match of the segment's video
        for lin in (model.loc.query, model.loc.start, model.loc.end, model.loc.boundary, model.loc.segment):
            lin.weight.zero_()
            lin.bias.zero_()
    g = torch.Generator().manual_seed(1)
    regions = torch.eye(E)[:N, None]  # [N, 1, E]: video i's single track points along axis i
    emb = Embeddings(video=F.normalize(torch.randn(N, E, generator=g), dim=-1),
                     text=F.normalize(torch.randn(N, E, generator=g), dim=-1),
                     text_cls=torch.randn(N, 16, generator=g), frames=torch.randn(N, T, 16, generator=g),
                     units=regions.clone(), unit_mask=torch.ones(N, 1, dtype=torch.bool),
                     regions=regions, region_mask=torch.ones(N, 1, dtype=torch.bool))
    return model, cfg, emb


def test_moment_retrieval_with_the_head_finds_each_captions_video_exactly():
    model, cfg, emb = _model_and_embeddings()
    out = moment_retrieval(model, cfg, emb, seed=0)
    assert out["moment_queries"] == 8
    assert out["moment_R@1_IoU0.7"] == 100.0 and out["moment_mIoU"] == 100.0


def test_moment_retrieval_with_swapped_regions_finds_the_twin():
    """Regions of videos 2k and 2k+1 swapped (a colour-swapped twin pair): every caption lands on the
    other video of its pair, which never overlaps its own."""
    model, cfg, emb = _model_and_embeddings()
    swap = torch.arange(8) ^ 1
    emb.regions = emb.regions[swap]
    out = moment_retrieval(model, cfg, emb, seed=0)
    assert out["moment_R@1_IoU0.3"] == 0.0 and out["moment_mIoU"] == 0.0
