"""Each objective on hand-made inputs with a known answer: aligned < shuffled, masked padding changes
nothing. (The cross-rank gather is tested in tests/test_train_dist.py.)"""
import pytest
import torch
import torch.nn.functional as F

import math

from torch import nn

from train.config import load_config
from train.losses import (ClipWordLoss, GlobalContrastiveLoss, LocalizationLoss, RegionAlignmentLoss,
                          alignment_similarity, hard_groups)
from train.model import LocalizationHead, VideoTextModel
from train.moments import plan_merge, unit_presence
from train.objectives import TextBatch, compact, text_units, word_mask


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_global_aligned_beats_shuffled():
    v = _unit(8, 16)
    loss = GlobalContrastiveLoss()
    scale = torch.tensor(20.0)
    assert loss(v, v, scale) < loss(v, v[torch.roll(torch.arange(8), 1)], scale)


def _matched_units(B=6, P=3, E=16):
    regions = _unit(B, P, E, seed=3)
    units = regions.clone()
    mask = torch.ones(B, P, dtype=torch.bool)
    return units, mask, regions, mask.clone()


def test_alignment_aligned_beats_shuffled_and_diagonal_is_best():
    units, umask, regions, rmask = _matched_units()
    s = alignment_similarity(units, umask, regions, rmask)
    assert torch.equal(s.argmax(1), torch.arange(6))
    loss = RegionAlignmentLoss()
    perm = torch.roll(torch.arange(6), 1)
    assert loss(units, umask, regions, rmask) < loss(units[perm], umask[perm], regions, rmask)


def test_alignment_padding_changes_nothing_when_masked():
    units, umask, regions, rmask = _matched_units()
    s = alignment_similarity(units, umask, regions, rmask)
    junk_u, junk_r = _unit(6, 2, 16, seed=8), _unit(6, 5, 16, seed=9)
    pu = torch.cat([units, junk_u], 1)
    pum = torch.cat([umask, torch.zeros(6, 2, dtype=torch.bool)], 1)
    pr = torch.cat([regions, junk_r], 1)
    prm = torch.cat([rmask, torch.zeros(6, 5, dtype=torch.bool)], 1)
    assert torch.allclose(alignment_similarity(pu, pum, pr, prm), s, atol=1e-6)
    # and unmasked, the same junk does change the score (the mask is what protects it)
    assert not torch.allclose(alignment_similarity(pu, torch.ones_like(pum), pr, torch.ones_like(prm)), s, atol=1e-3)


def test_alignment_is_bidirectional():
    """A region no phrase mentions lowers S (regions->words); a phrase no region shows lowers it too."""
    units, umask, regions, rmask = _matched_units(B=1)
    base = alignment_similarity(units, umask, regions, rmask)
    extra_region = torch.cat([regions, _unit(1, 1, 16, seed=11)], 1)
    assert alignment_similarity(units, umask, extra_region, torch.ones(1, 4, dtype=torch.bool)) < base - 0.05
    extra_unit = torch.cat([units, _unit(1, 1, 16, seed=12)], 1)
    assert alignment_similarity(extra_unit, torch.ones(1, 4, dtype=torch.bool), regions, rmask) < base - 0.05


def test_phrase_units_pool_clauses_content_units_compact_and_word_mask_drops_specials():
    tokens = torch.arange(6, dtype=torch.float)[None, :, None].repeat(1, 1, 2)  # [1, 6, 2] token t = (t, t)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    phrase = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    content = torch.tensor([[0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    text = TextBatch(tokens, mask, phrase, content)
    units, umask = text_units(tokens, text, "phrase")
    assert units[0, :, 0].tolist() == [1.5, 3.0] and umask.tolist() == [[True, True]]
    units, umask = text_units(tokens, text, "content", P=3)
    assert units[0, :, 0].tolist() == [2.0, 4.0, 0.0] and umask.tolist() == [[True, True, False]]
    assert word_mask(mask).tolist() == [[False, True, True, True, False, False]]
    assert compact(tokens, content, P=1)[0][0, :, 0].tolist() == [2.0]  # overflow dropped, not wrapped


def test_clip_word_aligned_beats_shuffled_and_ignores_padding():
    B, C, E = 4, 3, 16
    clips = _unit(B, C, E, seed=4)
    words = torch.cat([clips, _unit(B, 2, E, seed=5)], 1)  # [B, 5, E]: 3 matching content words + 2 masked
    mask = torch.tensor([[True] * 3 + [False] * 2] * B)
    loss = ClipWordLoss(temperature=0.07, temporal_weight=0.0)
    aligned = loss.correspondence(clips, words, mask)
    assert aligned < loss.correspondence(clips, words[torch.roll(torch.arange(B), 1)], mask)
    other_padding = torch.cat([clips, _unit(B, 2, E, seed=6)], 1)
    assert torch.allclose(loss.correspondence(clips, other_padding, mask), aligned)


def test_temporal_aware_loss_rewards_the_shifted_clip_and_its_neighbours_more_weakly():
    """Queries that point exactly at clip c + delta score below queries pointing at c + delta's
    neighbour, which score below queries pointing at another video: the neighbour weighting."""
    B, C, E = 2, 5, 32
    keys = _unit(B, C, E, seed=20)
    loss = ClipWordLoss(temperature=0.07, sigma=0.5)
    c = torch.arange(C)

    def queries(offset_video, offset_clip):
        idx_c = (c + 1 + offset_clip).clamp(0, C - 1)
        return keys[(torch.arange(B) + offset_video) % B][:, idx_c][None]  # [1, B, C, E] for delta = +1

    exact, neighbour = (loss.temporal(keys, queries(0, k), [1]) for k in (0, 1))
    other = loss.temporal(keys, queries(1, 0), [1])
    assert exact < neighbour < other


class _LeakyContext(nn.Module):
    """The old form: the query of clip c is projected from the window (c - 1, c, c + 1), so it holds
    the clip it must find."""

    def __init__(self, Df: int, dim: int, E: int):
        super().__init__()
        self.clip = nn.Linear(Df, dim)
        self.context = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, E))
        self.key = nn.Linear(dim, E)
        self.shift = nn.Embedding(5, 3 * dim)

    def forward(self, frames, clip_frames, shifts):
        B, T, D = frames.shape
        clip = self.clip(frames.reshape(B, T // clip_frames, clip_frames, D).mean(2))
        padded = F.pad(clip, (0, 0, 1, 1))
        window = torch.cat([padded[:, :-2], clip, padded[:, 2:]], dim=-1)  # [B, C, 3d]
        q = torch.stack([self.context(window + self.shift.weight[d + 2]) for d in shifts])
        return None, F.normalize(self.key(clip), dim=-1), F.normalize(q, dim=-1)


def _train_temporal(clips_fn, params, steps=60, B=8, T=8, D=16, seed=0):
    """Train on fresh random frames (no temporal structure at all); -> mean loss on held-out random frames."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on the shared cores
    try:
        return _fit_and_score(clips_fn, params, steps, B, T, D)
    finally:
        torch.set_num_threads(threads)


def _fit_and_score(clips_fn, params, steps, B, T, D):
    loss = ClipWordLoss(temperature=0.07, sigma=0.5)
    opt = torch.optim.Adam(params, lr=3e-3)
    shifts = [-2, -1, 1, 2]
    for _ in range(steps):
        _, keys, queries = clips_fn(torch.randn(B, T, D), 2, shifts)
        opt.zero_grad()
        loss.temporal(keys, queries, shifts).backward()
        opt.step()
    with torch.no_grad():
        return sum(float(loss.temporal(*clips_fn(torch.randn(B, T, D), 2, shifts)[1:], shifts)) for _ in range(10)) / 10


def test_temporal_loss_cannot_beat_chance_on_random_features_but_the_leaky_form_does():
    """On frames with no temporal structure nothing predicts clip c + delta from clip c, so the published
    form (query = clip c warped by delta) stays at its chance value log(BC - 1); the leaky window form
    copies the neighbour it holds and falls far below it."""
    B, T, D = 8, 8, 16
    chance = math.log(B * (T // 2) - 1)
    cfg = load_config(None, ["model.dim=32", "model.embed_dim=32", "model.heads=2", "loss.max_shift=2"])
    model = VideoTextModel(cfg, Df=D, Dr=4, G=7 * T, T=T)
    locvtp = [p for n, p in model.named_parameters() if n.startswith(("clip_", "shift", "video.frame_in"))]
    ours = _train_temporal(model.clips, locvtp, B=B, T=T, D=D)
    leaky = _LeakyContext(D, 32, 32)
    leaked = _train_temporal(leaky, leaky.parameters(), B=B, T=T, D=D)
    assert ours > chance - 0.05, (ours, chance)
    assert leaked < chance - 0.5, (leaked, chance)


def test_localization_loss_rewards_the_right_spans_and_members():
    G, M, T = 2, 3, 4
    plan = plan_merge(torch.arange(G * M).reshape(G, M), T, 2, torch.Generator().manual_seed(0))
    S = M * T
    start, end = plan.spans[..., 0], plan.spans[..., 1] - 1
    member = F.one_hot(plan.owner.clamp(min=0), M).float().transpose(1, 2) * 10  # [G, M, S]
    right = {"start": F.one_hot(start, S).float() * 10, "end": F.one_hot(end, S).float() * 10, "member": member}
    wrong = {k: v.roll(1, dims=1) for k, v in right.items()}
    loss = LocalizationLoss()
    assert loss(right, plan.spans, plan.owner) < 0.01 < loss(wrong, plan.spans, plan.owner)


def test_plan_merge_crops_have_random_lengths_and_boundaries_off_the_clip_grid():
    T, M = 8, 4
    plan = plan_merge(torch.arange(40).reshape(10, M), T, 4, torch.Generator().manual_seed(0))
    lengths = plan.spans[..., 1] - plan.spans[..., 0]
    assert lengths.min() >= 4 and lengths.max() <= T and len(set(lengths.flatten().tolist())) > 2
    starts = plan.spans[..., 0].flatten()
    assert (starts % T != 0).float().mean() > 0.5  # boundaries are not at multiples of T
    for g in range(10):  # positions follow the spans; padding only at the end
        for m in range(M):
            a, b = plan.spans[g, m].tolist()
            assert (plan.owner[g, a:b] == m).all() and (plan.video[g, a:b] == g * M + m).all()
            first = int(plan.frame[g, a])
            assert plan.frame[g, a:b].tolist() == list(range(first, first + b - a))
        n = int(lengths[g].sum())
        assert plan.valid[g, :n].all() and not plan.valid[g, n:].any()


def test_hard_groups_merge_similar_videos():
    centers = _unit(3, 8, seed=10)
    feats = F.normalize(centers.repeat_interleave(4, 0) + 0.01 * torch.randn(12, 8), dim=-1)
    groups = hard_groups(feats, 4, torch.Generator().manual_seed(0))
    assert sorted(sorted((g // 4).tolist()) for g in groups) == [[0] * 4, [1] * 4, [2] * 4]
    assert sorted(groups.flatten().tolist()) == list(range(12))


def test_localization_head_localizes_by_the_region_match():
    """A fresh head given a per-position match that favours each text's own segment puts every text's
    start and end on its own segment; the same head with the match pointing at another segment (as a
    twin would) does not. The [CLS] query is the same for both, so the match is what localizes."""
    torch.manual_seed(0)
    G, M, T, d, Df = 2, 4, 3, 16, 8
    head = LocalizationHead(d, 4, 0.0, M * T, init_temperature=0.05, Df=Df).eval()
    plan = plan_merge(torch.arange(G * M).reshape(G, M), T, 2, torch.Generator().manual_seed(0))
    seq, texts = torch.randn(G, M * T, Df), torch.randn(G, M, d)
    right = F.one_hot(plan.owner.clamp(min=0), M).float().transpose(1, 2) * plan.valid[:, None]  # [G, M, S]
    with torch.no_grad():
        for match, ok in ((right, True), (right.roll(1, dims=1), False)):
            out = head(seq, plan.valid, texts, match)
            s, e = out["start"].argmax(-1), out["end"].argmax(-1)
            hit = (plan.owner.gather(1, s) == torch.arange(M)) & (plan.owner.gather(1, e) == torch.arange(M))
            assert bool(hit.all()) is ok
    loss = LocalizationLoss()
    with torch.no_grad():
        assert (loss(head(seq, plan.valid, texts, right), plan.spans, plan.owner)
                < loss(head(seq, plan.valid, texts, right.roll(1, 1)), plan.spans, plan.owner))


def test_track_presence_reads_the_per_frame_flag():
    T = 3
    geom = torch.zeros(1, 2, T, 7)
    geom[0, 0, :, 4] = 1.0  # track 0 visible throughout
    geom[0, 1, 2, 4] = 1.0  # track 1 enters at frame 2
    mask = torch.tensor([[True, True]])
    vis = unit_presence(geom.reshape(1, 2, 7 * T), torch.full((1, 2), T), mask, T, "track")
    assert vis[0].tolist() == [[True, True, True], [False, False, True]]
