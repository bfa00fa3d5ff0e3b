"""One module that turns a batch into the weighted objectives, so DDP wraps a single forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.distributed import RankGather
from train.losses import (ClipWordLoss, GlobalContrastiveLoss, LocalizationLoss, RegionAlignmentLoss,
                          alignment_similarity, hard_groups)
from train.model import TextOut, VideoBatch, VideoOut, VideoTextModel
from train.moments import MergePlan, plan_merge, position_match, unit_presence
from train.words import content_chunks
from train.queue import FeatureQueue


@dataclass
class TextBatch:
    inputs: torch.Tensor  # [B, L, 384] frozen MiniLM features, or [B, L] ids for live MiniLM
    mask: torch.Tensor  # [B, L] bool
    phrase: torch.Tensor  # [B, L] int64 clause index, -1 = special/joiner/padding
    content: torch.Tensor  # [B, L] bool, token of a content word (train/words.py)

    def to(self, device: torch.device) -> "TextBatch":
        return TextBatch(self.inputs.to(device), self.mask.to(device), self.phrase.to(device),
                         self.content.to(device))

    def rows(self, idx: torch.Tensor) -> "TextBatch":
        """The captions idx, cut to their longest real length (padding past it costs time, changes nothing)."""
        mask = self.mask[idx]
        L = max(int(mask.sum(1).max()), 1)
        return TextBatch(self.inputs[idx][:, :L], mask[:, :L], self.phrase[idx][:, :L], self.content[idx][:, :L])


def text_units(tokens: torch.Tensor, text: TextBatch, unit: str, P: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment units of the text side: each contextual content-word token ("content", LocVTP/DemoVLP's
    word level without function words), the mean token feature per chunk of consecutive content words
    ("chunk", RAKE's stopword-delimited phrases, train/words.py), every word token ("word"), or the mean
    token feature per clause of the demo-grammar splitter ("phrase", comparison only). tokens [B, L, d]
    -> units [B, P, d], mask [B, P]; P = 0 sizes the unit axis to this batch."""
    if unit == "word":
        return tokens, word_mask(text.mask)
    if unit == "content":
        return compact(tokens, text.content, P)
    index = content_chunks(text.content & text.mask) if unit == "chunk" else text.phrase  # [B, L], -1 = none
    P = P or int(index.max().clamp(min=0)) + 1
    onehot = (index[..., None] == torch.arange(P, device=index.device)).float()  # [B, L, P]
    count = onehot.sum(1)  # [B, P]
    units = torch.einsum("blp,bld->bpd", onehot, tokens) / count.clamp(min=1)[..., None]
    return units, count > 0


def compact(tokens: torch.Tensor, keep: torch.Tensor, P: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each row moved to the front: tokens [B, L, d], keep [B, L] -> [B, P, d], [B, P]."""
    B, L, d = tokens.shape
    P = P or max(1, int(keep.sum(1).max()))
    slot = keep.long().cumsum(1) - 1  # [B, L] destination of each kept token
    out = tokens.new_zeros(B, P + 1, d)
    dest = torch.where(keep & (slot < P), slot, torch.full_like(slot, P))  # dropped tokens go to slot P
    out = out.scatter(1, dest[..., None].expand(B, L, d), tokens * keep[..., None])
    umask = torch.arange(P, device=tokens.device)[None] < keep.sum(1, keepdim=True)
    return out[:, :P], umask


def word_mask(mask: torch.Tensor) -> torch.Tensor:
    """Real word tokens: the mask without [CLS] (first) and [SEP] (last real token)."""
    words = mask.clone()
    words[:, 0] = False
    last = mask.sum(1) - 1  # [B]
    words[torch.arange(mask.shape[0], device=mask.device), last] = False
    return words


class Objectives(nn.Module):
    """The weighted terms of a batch. Every term compares a row with the other rows of the batch: under W
    ranks `gather` (train/distributed.py) hands each loss the union batch of every rank, so each term
    equals its one-process value over the union batch, gradients included. `queue` (train/queue.py)
    adds past global embeddings as extra negatives of the global term."""

    def __init__(self, model: VideoTextModel, cfg: TrainConfig, gather: RankGather | None = None,
                 queue: FeatureQueue | None = None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.gather = gather or RankGather()
        self.queue = queue
        self.global_loss = GlobalContrastiveLoss()
        self.align_loss = RegionAlignmentLoss(cfg.loss.align_lambda, cfg.loss.align_temperature)
        self.clip_word_loss = ClipWordLoss(cfg.loss.clip_word_temperature, cfg.loss.temporal_weight,
                                           cfg.loss.temporal_sigma)
        self.loc_loss = LocalizationLoss()
        self.shifts = [d for d in range(-cfg.loss.max_shift, cfg.loss.max_shift + 1) if d != 0]

    def forward(self, video: VideoBatch, text: TextBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """generator: the same seed on every rank (the localization groups are drawn from the union batch)."""
        m, lc, g = self.model, self.cfg.loss, self.gather
        vo, to = m.encode_video(video), m.encode_text(text.inputs, text.mask)
        terms: dict[str, torch.Tensor] = {}
        if lc.global_weight > 0:
            gv, gt = g(m.global_video(vo)), g(m.global_text(to))  # [B_union, E]
            negatives = self.queue.negatives() if self.queue is not None else None
            terms["global"] = lc.global_weight * self.global_loss(gv, gt, m.scale(), negatives)
            if self.queue is not None:
                self.queue.stage(gv, gt)
        use_loc = lc.loc_weight > 0 and video.frames.shape[0] * g.world_size >= lc.loc_videos
        if lc.align_weight > 0 or use_loc:  # the alignment's units and regions, also the head's match
            units, umask, regions, rmask = align_inputs(m, vo, to, video, text, lc.align_unit)
            aligned = (g(units, pad_dims=(1,)), g(umask, pad_dims=(1,)), g(regions, pad_dims=(1,)),
                       g(rmask, pad_dims=(1,)))  # [B_union, P, E], [B_union, P], [B_union, R, E], [B_union, R]
        if lc.align_weight > 0:
            terms["align"] = lc.align_weight * self.align_loss.from_similarity(
                alignment_similarity(*aligned, lc.align_lambda))
        if lc.clip_word_weight > 0:
            clips, keys, queries = m.clips(video.frames, lc.clip_frames, self.shifts)
            words = F.normalize(m.word(to.tokens), dim=-1)
            terms["clip_word"] = lc.clip_word_weight * self.clip_word_loss(
                g(clips), g(words, pad_dims=(1,)), g(text.content & text.mask, pad_dims=(1,)), g(keys),
                g(queries, dim=1), self.shifts)
        if use_loc:
            union = VideoBatch(*(g(getattr(video, f), pad_dims=(1,) if f.startswith("unit") else ())
                                 for f in VideoBatch.__dataclass_fields__))  # inputs of the merged sequences
            terms["loc"] = lc.loc_weight * self._localization(union, g(to.cls), aligned, generator)
        return terms

    def _localization(self, video: VideoBatch, text_cls: torch.Tensor, aligned, generator: torch.Generator
                      ) -> torch.Tensor:
        lc, T = self.cfg.loss, video.frames.shape[1]
        groups = hard_groups(F.normalize(text_cls, dim=-1).cpu(), lc.loc_videos, generator, lc.loc_hard)  # [G, M]
        plan = plan_merge(groups, T, lc.loc_min_frames, generator)
        out = localize(self.model, self.cfg, video, text_cls, aligned, groups, plan)
        dev = video.frames.device
        return self.loc_loss(out, plan.spans.to(dev), plan.owner.to(dev))


def localize(model: VideoTextModel, cfg: TrainConfig, video: VideoBatch, text_cls: torch.Tensor, aligned,
             groups: torch.Tensor, plan: MergePlan) -> dict[str, torch.Tensor]:
    """Run the localization head on the merged sequences of `plan`: raw frame features per position and the
    per-position match of each text against the regions visible there. aligned = align_inputs(...)."""
    dev = video.frames.device
    units, umask, regions, rmask = aligned
    presence = unit_presence(video.unit_geom, video.unit_frame, rmask, video.frames.shape[1], cfg.model.units)
    pv, pf, valid, g = plan.video.to(dev), plan.frame.to(dev), plan.valid.to(dev), groups.to(dev)
    plan_dev = MergePlan(pv, pf, valid, plan.owner.to(dev), plan.spans.to(dev))
    match = position_match(units, umask, regions, presence, g, plan_dev, cfg.loss.align_lambda)  # [G, M, S]
    seq = video.frames[pv, pf] * valid[..., None]  # [G, S, Df]
    return model.loc(seq, valid, text_cls[g], match)


def align_inputs(m: VideoTextModel, vo: VideoOut, to: TextOut, video: VideoBatch, text: TextBatch, unit: str,
                 P: int = 0):
    """Normalised text units [B, P, E] + mask and region/track tokens [B, R, E] + mask for S_loc."""
    units, umask = text_units(to.tokens, text, unit, P)
    return (F.normalize(m.align_text(units), dim=-1), umask, *align_regions(m, vo, video))


def align_regions(m: VideoTextModel, vo: VideoOut, video: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised region/track tokens [B, R, E] + mask for S_loc (no mask where the model ignores regions)."""
    regions = F.normalize(m.align_video(vo.units), dim=-1)  # [B, R, E]
    return regions, video.unit_mask if m.video.use_regions else torch.zeros_like(video.unit_mask)
