"""Each objective on hand-made inputs with a known answer: aligned < shuffled, masked padding changes
nothing, and the global loss with a mocked cross-rank gather equals the one-process loss."""
import pytest
import torch
import torch.nn.functional as F

from train.losses import (ClipWordLoss, GlobalContrastiveLoss, LocalizationLoss, RegionAlignmentLoss,
                          alignment_similarity, hard_groups, localization_targets)
from train.model import LocalizationHead
from train.objectives import group_match, merge_sequence, text_units, word_mask


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_global_aligned_beats_shuffled():
    v = _unit(8, 16)
    loss = GlobalContrastiveLoss()
    scale = torch.tensor(20.0)
    assert loss(v, v, scale) < loss(v, v[torch.roll(torch.arange(8), 1)], scale)


def test_global_mocked_gather_equals_one_process():
    """Two simulated ranks: each sees its half plus the other's (detached) half through the gather."""
    video, text = _unit(8, 16, seed=1), _unit(8, 16, seed=2)
    scale = torch.tensor(10.0)
    v_full, t_full = video.clone().requires_grad_(), text.clone().requires_grad_()
    ref = GlobalContrastiveLoss()(v_full, t_full, scale)
    ref.backward()
    halves_v, halves_t = video.chunk(2), text.chunk(2)
    for rank in range(2):
        def gather(x, rank=rank):  # the rank's own tensor comes in detached, like dist.all_gather's
            parts = [h.clone() for h in (halves_v if x.shape == halves_v[0].shape and torch.equal(x, halves_v[rank]) else halves_t)]
            return parts
        v_local = halves_v[rank].clone().requires_grad_()
        t_local = halves_t[rank].clone().requires_grad_()
        loss = GlobalContrastiveLoss(rank, 2, gather)(v_local, t_local, scale)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        loss.backward()
        # gradients reach the local rows only: W x the one-process gradient of those rows, so that DDP's
        # mean over the W ranks gives every parameter its one-process gradient
        assert torch.allclose(v_local.grad, 2 * v_full.grad.chunk(2)[rank], atol=1e-6)
        assert torch.allclose(t_local.grad, 2 * t_full.grad.chunk(2)[rank], atol=1e-6)


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


def test_phrase_units_pool_clauses_and_word_mask_drops_specials():
    tokens = torch.arange(6, dtype=torch.float)[None, :, None].repeat(1, 1, 2)  # [1, 6, 2] token t = (t, t)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    phrase = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    units, umask = text_units(tokens, mask, phrase, "phrase")
    assert units[0, :, 0].tolist() == [1.5, 3.0] and umask.tolist() == [[True, True]]
    assert word_mask(mask).tolist() == [[False, True, True, True, False, False]]


def test_clip_word_aligned_beats_shuffled_and_ignores_padding():
    B, C, E = 4, 3, 16
    clips = _unit(B, C, E, seed=4)
    words = torch.cat([clips, _unit(B, 2, E, seed=5)], 1)  # [B, 5, E]: 3 matching words + 2 padding
    mask = torch.tensor([[True] * 3 + [False] * 2] * B)
    shift = torch.zeros(2, E)
    loss = ClipWordLoss(temperature=0.07, temporal_weight=0.0)
    aligned = loss(clips, clips, words, mask, shift)
    shuffled = loss(clips, clips, words[torch.roll(torch.arange(B), 1)], mask, shift)
    assert aligned < shuffled
    other_padding = torch.cat([clips, _unit(B, 2, E, seed=6)], 1)
    assert torch.allclose(loss(clips, clips, other_padding, mask, shift), aligned)


def test_temporal_aware_part_encodes_order():
    """Shift +1 points to direction u, shift -1 to w; keys drift from w to u over time. The loss is lower
    when the clips are in that order than when the same clips are reversed in time."""
    B, C, E = 3, 4, 16
    u, w = torch.eye(E)[0], torch.eye(E)[1]
    c = torch.arange(C, dtype=torch.float)[:, None]
    keys = F.normalize(c * u + (C - 1 - c) * w, dim=-1)[None].repeat(B, 1, 1)  # [B, C, E]
    keys = F.normalize(keys + 0.05 * _unit(B, C, E, seed=13), dim=-1)
    queries = torch.zeros(B, C, E)
    shift = torch.stack([w, u]) * 3  # embeddings of shift -1 and +1
    loss = ClipWordLoss(temperature=0.07, temporal_weight=1.0)
    assert loss._temporal(queries, keys, shift) < loss._temporal(queries, keys.flip(1), shift) - 0.1


def test_localization_loss_and_targets():
    G, M, T = 2, 3, 4
    slots = torch.tensor([[2, 0, 1], [0, 1, 2]])
    start, end = localization_targets(slots, T)
    assert start.tolist() == [[8, 0, 4], [0, 4, 8]] and end.tolist() == [[11, 3, 7], [3, 7, 11]]
    S = M * T
    right = {"start": F.one_hot(start, S).float() * 10, "end": F.one_hot(end, S).float() * 10,
             "segment": F.one_hot(torch.argsort(slots, 1), M).float() * 10}
    wrong = {k: v.roll(1, dims=-1) for k, v in right.items()}
    loss = LocalizationLoss()
    assert loss(right, slots, T) < 0.01 < loss(wrong, slots, T)


def test_merge_sequence_places_videos_by_slot():
    frames = torch.arange(4)[:, None, None].float().repeat(1, 2, 1)  # video v's frames hold v
    merged = merge_sequence(frames, torch.tensor([[0, 1, 2]]), torch.tensor([[2, 0, 1]]))
    assert merged[0, :, 0].tolist() == [1, 1, 2, 2, 0, 0]


def test_hard_groups_merge_similar_videos():
    centers = _unit(3, 8, seed=10)
    feats = F.normalize(centers.repeat_interleave(4, 0) + 0.01 * torch.randn(12, 8), dim=-1)
    groups = hard_groups(feats, 4, torch.Generator().manual_seed(0))
    assert sorted(sorted((g // 4).tolist()) for g in groups) == [[0] * 4, [1] * 4, [2] * 4]
    assert sorted(groups.flatten().tolist()) == list(range(12))


def test_group_match_indexes_each_text_against_the_video_in_each_segment():
    s_loc = torch.arange(16, dtype=torch.float).reshape(4, 4)  # s_loc[i, j] = 4 i + j
    groups, slots = torch.tensor([[2, 0, 1]]), torch.tensor([[1, 2, 0]])  # segments hold videos 1, 2, 0
    assert group_match(s_loc, groups, slots)[0].tolist() == [[9, 10, 8], [1, 2, 0], [5, 6, 4]]


def test_localization_head_localizes_by_the_phrase_region_match():
    """A fresh head given a match that favours each text's own video (by 1 S_loc unit) puts every
    text's start and end inside its own segment and matches every segment to its text; the same head
    with the match pointing at the wrong videos (as a twin would) does not. The [CLS] query alone is
    the same for both, so the match is what localizes."""
    torch.manual_seed(0)
    G, M, T, d = 2, 4, 3, 16
    head = LocalizationHead(d, 4, 0.0, M * T, init_temperature=0.05).eval()
    seq, texts = torch.randn(G, M * T, d), torch.randn(G, M, d)
    slots = torch.stack([torch.randperm(M) for _ in range(G)])  # [G, M] segment of text m's video
    right = F.one_hot(slots, M).float()  # [G, M text, M segment]
    with torch.no_grad():
        for match, ok in ((right, True), (right.roll(1, dims=2), False)):
            out = head(seq, texts, T, match)
            hit = (out["start"].argmax(-1) // T == slots) & (out["end"].argmax(-1) // T == slots)
            seg_hit = out["segment"].argmax(-1) == torch.argsort(slots, 1)  # segment k -> its text
            assert bool(hit.all()) is ok and bool(seg_hit.all()) is ok
    loss = LocalizationLoss()
    with torch.no_grad():
        assert loss(head(seq, texts, T, right), slots, T) < loss(head(seq, texts, T, right.roll(1, 2)), slots, T)
