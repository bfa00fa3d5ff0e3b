"""The four objectives. None knows the process group: each computes its loss over the batch it is given
(under W ranks the trainer gathers the union batch, train/distributed.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def symmetric_infonce(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of row-wise and column-wise cross-entropy; the positive of row i is column labels[i] (= i)."""
    labels = torch.arange(logits.shape[0], device=logits.device) if labels is None else labels
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class GlobalContrastiveLoss(nn.Module):
    """(1) Symmetric InfoNCE on normalised [CLS] embeddings over the batch it is given (under W ranks the
    trainer hands it the union batch, train/distributed.py), plus optional extra negatives (a feature
    queue of past embeddings, train/queue.py): queued videos join every text's row, queued texts every
    video's row."""

    def forward(self, video: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """video, text [B, E] (row i of one matches row i of the other); negatives: (video [n, E], text
        [n, E]), constants -> scalar."""
        logits = scale * text @ video.t()  # [B_text, B_video]
        if negatives is None or len(negatives[0]) == 0:
            return symmetric_infonce(logits)
        q_video, q_text = negatives
        labels = torch.arange(len(video), device=video.device)
        t2v = torch.cat([logits, scale * text @ q_video.t()], dim=1)  # [B, B + n]
        v2t = torch.cat([logits.t(), scale * video @ q_text.t()], dim=1)  # [B, B + n]
        return 0.5 * (F.cross_entropy(t2v, labels) + F.cross_entropy(v2t, labels))


def _focal_attention(scores: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """softmax over the last axis of lam * scores with masking, then DemoVLP's focal mask: keep weights
    above 1/(number of real slots) and renormalise. scores [..., K], mask broadcastable [..., K]."""
    logits = (lam * scores).masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    n_real = mask.sum(-1, keepdim=True).clamp(min=1)
    alpha = alpha * (alpha >= 1.0 / n_real)  # the argmax always survives (its weight >= 1/n)
    return alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-12)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _unit_attention(a: torch.Tensor, um: torch.Tensor, rm: torch.Tensor, lam: float) -> torch.Tensor:
    """Units attend to regions: a normalised over the units (masked), focal softmax over regions."""
    a_u = F.normalize(a * um, dim=2)
    return _focal_attention(a_u, rm.expand_as(a_u), lam)


def _attended_cosine(weights: torch.Tensor, dots: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """cos(x_p, sum_k w_pk y_k) for unit-norm x, y from w [..., P, K], dots x_p . y_k [..., P, K] and the
    Gram matrix y_k . y_l [..., K, K] -> [..., P] (0 where all weights are 0, as F.cosine_similarity gives)."""
    num = (weights * dots).sum(-1)
    sq = ((weights @ gram) * weights).sum(-1)
    return num / sq.clamp(min=1e-16).sqrt().clamp(min=1e-8)


def unit_region_attention(units: torch.Tensor, unit_mask: torch.Tensor, regions: torch.Tensor,
                          region_mask: torch.Tensor, lam: float = 20.0) -> torch.Tensor:
    """The weights alpha_tk with which each unit (phrase/word) of one text attends to each region of one
    video: units [P, E], regions [R, E] -> [P, R] (rows of padded units are meaningless)."""
    a = F.leaky_relu(units @ regions.t(), 0.1)[None, None]  # [1, 1, P, R]
    return _unit_attention(a, unit_mask[None, None, :, None], region_mask[None, None, None, :], lam)[0, 0]


def alignment_similarity(units: torch.Tensor, unit_mask: torch.Tensor, regions: torch.Tensor,
                         region_mask: torch.Tensor, lam: float = 20.0) -> torch.Tensor:
    """DemoVLP's bidirectional fine-grained score S_loc = S_w->r + S_r->w for every text-video pair.

    units [Bt, P, E] (phrases or words) and regions [Bv, R, E], both L2-normalised, with masks
    [Bt, P] / [Bv, R] (True = real). Returns [Bt, Bv]. Padding never contributes on either side.
    """
    dots = torch.einsum("ipe,jre->ijpr", units, regions)  # [Bt, Bv, P, R]
    a = F.leaky_relu(dots, 0.1)
    um = unit_mask[:, None, :, None]  # [Bt, 1, P, 1]
    rm = region_mask[None, :, None, :]  # [1, Bv, 1, R]
    # cos(u_p, c_p) with c_p = sum_k alpha_pk r_k, computed without forming c_p ([Bt, Bv, P, E]):
    # u_p . c_p = sum_k alpha_pk (u_p . r_k) and |c_p|^2 = alpha_p G alpha_p^T, G the regions' Gram matrix.
    alpha = _unit_attention(a, um, rm, lam)  # [Bt, Bv, P, R]
    gram_r = torch.einsum("jre,jke->jrk", regions, regions)  # [Bv, R, R]
    s_u2r = _masked_mean(_attended_cosine(alpha, dots, gram_r[None]), unit_mask[:, None].float())
    # regions attend to units: a normalised over the regions (masked), softmax over units
    a_r = F.normalize(a * rm, dim=3).transpose(2, 3)  # [Bt, Bv, R, P]
    beta = _focal_attention(a_r, um.transpose(2, 3).expand_as(a_r), lam)  # [Bt, Bv, R, P]
    gram_u = torch.einsum("ipe,iqe->ipq", units, units)  # [Bt, P, P]
    s_r2u = _masked_mean(_attended_cosine(beta, dots.transpose(2, 3), gram_u[:, None]), region_mask[None].float())
    return s_u2r + s_r2u  # [Bt, Bv]


class RegionAlignmentLoss(nn.Module):
    """(2) Contrastive loss on S_loc over the batch, in both directions (text->video and video->text)."""

    def __init__(self, lam: float = 20.0, temperature: float = 0.05):
        super().__init__()
        self.lam, self.temperature = lam, temperature

    def forward(self, units, unit_mask, regions, region_mask) -> torch.Tensor:
        return self.from_similarity(alignment_similarity(units, unit_mask, regions, region_mask, self.lam))

    def from_similarity(self, s: torch.Tensor) -> torch.Tensor:
        """s [B, B] = S_loc of every text-video pair of the batch."""
        return symmetric_infonce(s / self.temperature)


class ClipWordLoss(nn.Module):
    """(3) LocVTP (Cao et al., ECCV 2022, arXiv 2207.10362), Sec. 3.2-3.3.

    Clip-word correspondence discovery: within a matched pair, the positive word of clip c is the content
    word most similar to it, w*(c) = argmax_w softmax_w(v_c . w) (function words and corpus-wide words are
    never candidates, see train/words.py), and the positive clip of a content word likewise; each is
    contrasted (InfoNCE, temperature T) against every content word / clip of the batch.

    Temporal-aware contrastive: the context projection head warps clip c by a signed shift delta,
    q = g(v_c + e_delta), and q must retrieve the key of clip c + delta among all clips of the batch.
    Temporal neighbours are weaker positives: the target puts weight exp(-|c' - (c + delta)| / sigma) on
    each clip c' of the same video (normalised), none on other videos. The query's own clip c is no
    candidate: q is built from it, and nothing else of its video enters q, so the loss cannot be lowered
    by copying (tests/test_train_losses.py: on random features it stays at its chance value log(BC - 1)).
    """

    def __init__(self, temperature: float = 0.07, temporal_weight: float = 1.0, sigma: float = 0.5):
        super().__init__()
        self.temperature, self.temporal_weight, self.sigma = temperature, temporal_weight, sigma

    def forward(self, clips: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, keys: torch.Tensor,
                queries: torch.Tensor, shifts: list[int]) -> torch.Tensor:
        """clips/keys [B, C, E], words [B, L, E], word_mask [B, L] (content words), queries [D, B, C, E]
        for the signed shifts [D]; all features L2-normalised."""
        loss = self.correspondence(clips, words, word_mask)
        if self.temporal_weight > 0 and clips.shape[1] > 1:
            loss = loss + self.temporal_weight * self.temporal(keys, queries, shifts)
        return loss

    def correspondence(self, clips: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        B, C, E = clips.shape
        L = words.shape[1]
        has_words = word_mask.any(1)  # [B]
        if not bool(has_words.any()):
            return clips.sum() * 0.0
        flat_words, flat_mask = words.reshape(B * L, E), word_mask.reshape(B * L)
        within = torch.einsum("bce,ble->bcl", clips, words).masked_fill(~word_mask[:, None], float("-inf"))
        # clip -> word: positive = the best content word of its own caption
        pos_word = within.argmax(-1) + (torch.arange(B, device=words.device) * L)[:, None]  # [B, C]
        logits = (clips.reshape(B * C, E) @ flat_words.t() / self.temperature).masked_fill(~flat_mask[None], float("-inf"))
        keep = has_words.repeat_interleave(C)
        loss_c2w = F.cross_entropy(logits[keep], pos_word.reshape(-1)[keep])
        # word -> clip: positive = the best clip of its own video
        pos_clip = within.argmax(1) + (torch.arange(B, device=words.device) * C)[:, None]  # [B, L]
        logits_w = flat_words @ clips.reshape(B * C, E).t() / self.temperature  # [B*L, B*C]
        loss_w2c = F.cross_entropy(logits_w[flat_mask], pos_clip.reshape(-1)[flat_mask])
        return 0.5 * (loss_c2w + loss_w2c)

    def temporal(self, keys: torch.Tensor, queries: torch.Tensor, shifts: list[int]) -> torch.Tensor:
        B, C, E = keys.shape
        dev = keys.device
        flat_keys = keys.reshape(B * C, E)
        c = torch.arange(C, device=dev)
        own = torch.eye(B * C, dtype=torch.bool, device=dev)  # the query's own clip: never a candidate
        same_video = torch.block_diag(*[torch.ones(C, C, device=dev)] * B).bool()  # [BC, BC]
        losses = []
        for q, delta in zip(queries, shifts):
            target_c = c + delta  # [C]
            ok = (target_c >= 0) & (target_c < C)
            if not bool(ok.any()):
                continue
            dist = (c[None, :] - target_c[:, None]).abs().float()  # [C query, C key]
            weight = torch.exp(-dist / self.sigma).repeat(B, B) * same_video * ~own  # [BC, BC]
            target = weight / weight.sum(1, keepdim=True).clamp(min=1e-12)
            logits = (q.reshape(B * C, E) @ flat_keys.t() / self.temperature).masked_fill(own, float("-inf"))
            rows = ok.repeat(B)
            logp = torch.log_softmax(logits[rows], dim=1).masked_fill(own[rows], 0.0)
            losses.append(-(target[rows] * logp).sum(1).mean())
        return torch.stack(losses).mean() if losses else keys.sum() * 0.0


def hard_groups(feats: torch.Tensor, m: int, generator: torch.Generator, hard: bool = True) -> torch.Tensor:
    """TemPVL hard sampling: split the batch into groups of m, each a seed plus its m-1 most similar
    unassigned videos (by normalised features), seeds in random order. Returns [G, m] indices;
    B mod m leftover videos are not merged."""
    B = feats.shape[0]
    order = torch.randperm(B, generator=generator).tolist()
    if not hard:
        return torch.tensor(order[: (B // m) * m], dtype=torch.long).reshape(-1, m)
    sims = (feats @ feats.t()).detach().float()
    free = torch.ones(B, dtype=torch.bool)
    groups = []
    for seed in order:
        if not free[seed] or int(free.sum()) < m:
            continue
        free[seed] = False
        cand = sims[seed].masked_fill(~free, float("-inf"))
        mates = cand.topk(m - 1).indices
        free[mates] = False
        groups.append([seed, *mates.tolist()])
    return torch.tensor(groups, dtype=torch.long).reshape(-1, m)


def span_scores(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Score of every span [s, e] for every text from the localization head's outputs (start/end/member
    [G, M, S] logits, -inf on padding) -> [G, M, S, S] (s > e and spans over padding: -inf):
        log p_start(s) + log p_end(e) + sum_{s <= p <= e} (log p(m | p) + log M),
    the last term being the evidence that the positions inside show text m rather than another (positive
    where the head prefers m over uniform, negative elsewhere), so a span ends where its text stops."""
    G, M, S = out["start"].shape
    real = torch.isfinite(out["member"][:, :1])  # [G, 1, S]
    start, end = torch.log_softmax(out["start"], -1), torch.log_softmax(out["end"], -1)  # [G, M, S]
    member = torch.log_softmax(out["member"].masked_fill(~real, 0.0), dim=1) + math.log(M)
    evidence = member.masked_fill(~real, -1e4)  # a span over padding is never the best
    cum = F.pad(evidence.cumsum(-1), (1, 0))  # [G, M, S + 1]
    inside = cum[..., None, 1:] - cum[..., :-1, None]  # [G, M, S, S] sum over [s, e]
    order = torch.ones(S, S, dtype=torch.bool, device=start.device).triu()
    score = start[..., :, None] + end[..., None, :] + inside
    return score.masked_fill(~order, float("-inf"))


class LocalizationLoss(nn.Module):
    """(4) TemPVL on merged sequences: start/end cross-entropy over the positions for each text, the
    position -> text membership (which of the M texts each real position shows), and the cross-entropy
    of the right span among all spans under `span_scores` (what decoding maximises)."""

    def forward(self, out: dict[str, torch.Tensor], spans: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """out: start/end/member [G, M, S] logits; spans [G, M, 2] (start, end exclusive) of text m's
        segment; owner [G, S] text shown at each position (-1 = padding)."""
        G, M, S = out["start"].shape
        loss = F.cross_entropy(out["start"].reshape(G * M, S), spans[..., 0].reshape(-1))
        loss = loss + F.cross_entropy(out["end"].reshape(G * M, S), spans[..., 1].reshape(-1) - 1)
        member = out["member"].transpose(1, 2).reshape(G * S, M)  # [G*S, M]
        real = owner.reshape(-1) >= 0
        loss = loss + F.cross_entropy(member[real], owner.reshape(-1)[real])
        span = spans[..., 0] * S + spans[..., 1] - 1  # [G, M] index of [start, end - 1] in the flat S x S
        return loss + F.cross_entropy(span_scores(out).reshape(G * M, S * S), span.reshape(-1))
