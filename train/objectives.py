"""One module that turns a batch into the weighted objectives, so DDP wraps a single forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.losses import (ClipWordLoss, GlobalContrastiveLoss, LocalizationLoss, RegionAlignmentLoss,
                          alignment_similarity, hard_groups)
from train.model import TextOut, VideoBatch, VideoOut, VideoTextModel


@dataclass
class TextBatch:
    inputs: torch.Tensor  # [B, L, 384] frozen MiniLM features, or [B, L] ids for live MiniLM
    mask: torch.Tensor  # [B, L] bool
    phrase: torch.Tensor  # [B, L] int64 clause index, -1 = special/joiner/padding

    def to(self, device: torch.device) -> "TextBatch":
        return TextBatch(self.inputs.to(device), self.mask.to(device), self.phrase.to(device))

    def rows(self, idx: torch.Tensor) -> "TextBatch":
        """The captions idx, cut to their longest real length (padding past it costs time, changes nothing)."""
        mask = self.mask[idx]
        L = max(int(mask.sum(1).max()), 1)
        return TextBatch(self.inputs[idx][:, :L], mask[:, :L], self.phrase[idx][:, :L])


def text_units(tokens: torch.Tensor, mask: torch.Tensor, phrase: torch.Tensor, unit: str, P: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment units of the text side: mean token feature per clause ("phrase") or each word ("word").
    tokens [B, L, d] -> units [B, P, d], mask [B, P]; P = 0 sizes the phrase axis to this batch."""
    if unit == "word":
        return tokens, word_mask(mask)
    P = P or int(phrase.max().clamp(min=0)) + 1
    onehot = (phrase[..., None] == torch.arange(P, device=phrase.device)).float()  # [B, L, P]
    count = onehot.sum(1)  # [B, P]
    units = torch.einsum("blp,bld->bpd", onehot, tokens) / count.clamp(min=1)[..., None]
    return units, count > 0


def word_mask(mask: torch.Tensor) -> torch.Tensor:
    """Real word tokens: the mask without [CLS] (first) and [SEP] (last real token)."""
    words = mask.clone()
    words[:, 0] = False
    last = mask.sum(1) - 1  # [B]
    words[torch.arange(mask.shape[0], device=mask.device), last] = False
    return words


class Objectives(nn.Module):
    def __init__(self, model: VideoTextModel, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.global_loss = GlobalContrastiveLoss(rank, world_size)
        self.align_loss = RegionAlignmentLoss(cfg.loss.align_lambda, cfg.loss.align_temperature)
        self.clip_word_loss = ClipWordLoss(cfg.loss.clip_word_temperature, cfg.loss.temporal_weight)
        self.loc_loss = LocalizationLoss()

    def forward(self, video: VideoBatch, text: TextBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        m, lc = self.model, self.cfg.loss
        vo, to = m.encode_video(video), m.encode_text(text.inputs, text.mask)
        terms: dict[str, torch.Tensor] = {}
        if lc.global_weight > 0:
            terms["global"] = lc.global_weight * self.global_loss(m.global_video(vo), m.global_text(to), m.scale())
        use_loc = lc.loc_weight > 0 and video.frames.shape[0] >= lc.loc_videos
        if lc.align_weight > 0 or use_loc:  # S_loc of every pair: the alignment's scores, the head's match
            s_loc = alignment_similarity(*align_inputs(m, vo, to, video, text, lc.align_unit), lc.align_lambda)
        if lc.align_weight > 0:
            terms["align"] = lc.align_weight * self.align_loss.from_similarity(s_loc)
        if lc.clip_word_weight > 0:
            queries, keys = m.clips(vo, lc.clip_frames)
            words = F.normalize(m.word(to.tokens), dim=-1)
            terms["clip_word"] = lc.clip_word_weight * self.clip_word_loss(
                queries, keys, words, word_mask(text.mask), m.shift.weight)
        if use_loc:
            terms["loc"] = lc.loc_weight * self._localization(vo, to, s_loc, generator)
        return terms

    def _localization(self, vo: VideoOut, to: TextOut, s_loc: torch.Tensor, generator: torch.Generator
                      ) -> torch.Tensor:
        M, T = self.cfg.loss.loc_videos, vo.frames.shape[1]
        groups = hard_groups(F.normalize(to.cls, dim=-1).cpu(), M, generator, self.cfg.loss.loc_hard)  # [G, M]
        slots = torch.stack([torch.randperm(M, generator=generator) for _ in range(len(groups))])  # [G, M]
        groups, slots = groups.to(vo.frames.device), slots.to(vo.frames.device)
        out = self.model.loc(merge_sequence(vo.frames, groups, slots), to.cls[groups], T,
                             group_match(s_loc, groups, slots))
        return self.loc_loss(out, slots, T)


def group_match(s_loc: torch.Tensor, groups: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """s_loc [B, B] (text i, video j), groups/slots [G, M] -> [G, M, M]: text m of a group against the
    video placed in segment k of its merged sequence."""
    order = torch.gather(groups, 1, torch.argsort(slots, dim=1))  # [G, K] video in each segment
    return s_loc[groups[:, :, None], order[:, None, :]]


def merge_sequence(frames: torch.Tensor, groups: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """frames [B, T, d], groups [G, M] video indices, slots [G, M] (video m of a group goes to position
    slots[g, m]) -> merged [G, M*T, d]."""
    G, M = groups.shape
    order = torch.gather(groups, 1, torch.argsort(slots, dim=1))  # [G, M] video at each position
    return frames[order].reshape(G, M * frames.shape[1], frames.shape[2])


def align_inputs(m: VideoTextModel, vo: VideoOut, to: TextOut, video: VideoBatch, text: TextBatch, unit: str,
                 P: int = 0):
    """Normalised text units [B, P, E] + mask and region/track tokens [B, R, E] + mask for S_loc."""
    units, umask = text_units(to.tokens, text.mask, text.phrase, unit, P)
    regions = F.normalize(m.align_video(vo.units), dim=-1)  # [B, R, E]
    rmask = video.unit_mask if m.video.use_regions else torch.zeros_like(video.unit_mask)
    return F.normalize(m.align_text(units), dim=-1), umask, regions, rmask
