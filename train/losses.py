"""The four objectives. None knows the process group: rank and world size come in through the
constructor (and the gather function can be swapped, so a test checks it in one process)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], list[torch.Tensor]]


def dist_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """all_gather without autograd: every rank's tensor, in rank order."""
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return out


def symmetric_infonce(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of row-wise and column-wise cross-entropy; the positive of row i is column labels[i] (= i)."""
    labels = torch.arange(logits.shape[0], device=logits.device) if labels is None else labels
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by `factor` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class GlobalContrastiveLoss(nn.Module):
    """(1) Symmetric InfoNCE on normalised [CLS] embeddings, negatives from every rank.

    Under W ranks every rank computes the same loss over the gathered [B, B] logits, with gradients
    through its own rows only (open_clip's scheme). DDP then averages parameter gradients over ranks,
    which would leave the feature path with 1/W of the one-process gradient over the union batch; the
    local rows' gradients are therefore multiplied by W. The temperature's gradient is already whole on
    every rank, so it is not scaled. Net effect: every parameter gets its one-process gradient."""

    def __init__(self, rank: int = 0, world_size: int = 1, gather: Gather | None = None):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.gather = gather or dist_gather

    def forward(self, video: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """video, text [b, E] (this rank's rows, row i of one matches row i of the other) -> scalar."""
        if self.world_size > 1:
            videos, texts = self.gather(video.detach()), self.gather(text.detach())
            # Put the local tensors back in (gradients flow through this rank's part only), scaled by W
            # so DDP's mean over ranks restores the whole gradient.
            videos[self.rank] = _ScaleGrad.apply(video, float(self.world_size))
            texts[self.rank] = _ScaleGrad.apply(text, float(self.world_size))
            video, text = torch.cat(videos), torch.cat(texts)  # [B, E], B = b * world_size
        return symmetric_infonce(scale * text @ video.t())  # [B_text, B_video]


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
    a = F.leaky_relu(torch.einsum("ipe,jre->ijpr", units, regions), 0.1)  # [Bt, Bv, P, R]
    um = unit_mask[:, None, :, None]  # [Bt, 1, P, 1]
    rm = region_mask[None, :, None, :]  # [1, Bv, 1, R]
    alpha = _unit_attention(a, um, rm, lam)  # [Bt, Bv, P, R]
    ctx = torch.einsum("ijpr,jre->ijpe", alpha, regions)  # [Bt, Bv, P, E]
    s_u2r = _masked_mean(F.cosine_similarity(units[:, None], ctx, dim=-1), unit_mask[:, None].float())
    # regions attend to units: a normalised over the regions (masked), softmax over units
    a_r = F.normalize(a * rm, dim=3).transpose(2, 3)  # [Bt, Bv, R, P]
    beta = _focal_attention(a_r, um.transpose(2, 3).expand_as(a_r), lam)  # [Bt, Bv, R, P]
    ctx_r = torch.einsum("ijrp,ipe->ijre", beta, units)  # [Bt, Bv, R, E]
    s_r2u = _masked_mean(F.cosine_similarity(regions[None], ctx_r, dim=-1), region_mask[None].float())
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
    """(3) LocVTP: clip-word correspondence discovery + temporal-aware contrastive.

    Within a matched pair, the positive word of a clip is argmax_words softmax(clip . word) and the
    positive clip of a word is argmax_clips; each is contrasted (InfoNCE, temperature T) against every
    word / clip of the batch. Temporal-aware part: the context query of clip c shifted by s in {-1, +1}
    must find the key of clip c+s among all clips of the batch (its own video's other clips included),
    so clip features carry temporal order.
    """

    def __init__(self, temperature: float = 0.07, temporal_weight: float = 1.0):
        super().__init__()
        self.temperature, self.temporal_weight = temperature, temporal_weight

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                shift: torch.Tensor) -> torch.Tensor:
        """queries/keys [B, C, E] (context-projected / plain clips), words [B, L, E], word_mask [B, L],
        shift [2, E] embeddings of shifts -1 / +1; all features L2-normalised."""
        B, C, E = queries.shape
        L = words.shape[1]
        flat_words = words.reshape(B * L, E)
        flat_mask = word_mask.reshape(B * L)
        within = torch.einsum("bce,ble->bcl", queries, words).masked_fill(~word_mask[:, None], float("-inf"))
        has_words = word_mask.any(1)  # [B]
        # clip -> word: positive = the best word of its own caption
        pos_word = within.argmax(-1) + (torch.arange(B, device=words.device) * L)[:, None]  # [B, C]
        logits = (queries.reshape(B * C, E) @ flat_words.t()) / self.temperature  # [B*C, B*L]
        logits = logits.masked_fill(~flat_mask[None], float("-inf"))
        keep = has_words.repeat_interleave(C)
        loss_c2w = F.cross_entropy(logits[keep], pos_word.reshape(-1)[keep])
        # word -> clip: positive = the best clip of its own video
        pos_clip = within.argmax(1) + (torch.arange(B, device=words.device) * C)[:, None]  # [B, L]
        logits_w = (flat_words @ queries.reshape(B * C, E).t()) / self.temperature  # [B*L, B*C]
        loss_w2c = F.cross_entropy(logits_w[flat_mask], pos_clip.reshape(-1)[flat_mask])
        loss = 0.5 * (loss_c2w + loss_w2c)
        if self.temporal_weight > 0 and C > 1:
            loss = loss + self.temporal_weight * self._temporal(queries, keys, shift)
        return loss

    def _temporal(self, queries: torch.Tensor, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        B, C, E = queries.shape
        flat_keys = keys.reshape(B * C, E)
        losses = []
        for s, emb in ((-1, shift[0]), (1, shift[1])):
            src = torch.arange(max(0, -s), C - max(0, s), device=queries.device)  # clips with a neighbour at c+s
            q = F.normalize(queries[:, src] + emb, dim=-1).reshape(-1, E)  # [B*|src|, E]
            target = ((torch.arange(B, device=queries.device) * C)[:, None] + src[None] + s).reshape(-1)
            losses.append(F.cross_entropy(q @ flat_keys.t() / self.temperature, target))
        return torch.stack(losses).mean()


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


def localization_targets(slots: torch.Tensor, segment_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [G, M]: position of text m's video in the merged sequence -> start/end frame indices [G, M]."""
    return slots * segment_len, slots * segment_len + segment_len - 1


class LocalizationLoss(nn.Module):
    """(4) TemPVL: start/end cross-entropy for each text over the merged sequence, plus the segment ->
    text classification (which of the M texts each video segment shows)."""

    def forward(self, out: dict[str, torch.Tensor], slots: torch.Tensor, segment_len: int) -> torch.Tensor:
        G, M, S = out["start"].shape
        start, end = localization_targets(slots, segment_len)  # [G, M]
        loss = F.cross_entropy(out["start"].reshape(G * M, S), start.reshape(-1))
        loss = loss + F.cross_entropy(out["end"].reshape(G * M, S), end.reshape(-1))
        # segment k shows the video of the text whose slot is k
        text_of_segment = torch.argsort(slots, dim=1)  # [G, M]
        return loss + F.cross_entropy(out["segment"].reshape(G * M, M), text_of_segment.reshape(-1))
