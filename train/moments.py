"""Merged sequences for moment retrieval (training and evaluation use the same construction).

A group of M videos becomes one sequence: each video contributes a random contiguous crop of its
sampled frames (between `min_frames` and T frames, random start), the crops are concatenated in a random
order and padded to M*T positions. Segment lengths therefore differ and boundaries fall anywhere, not at
multiples of T. What reaches the localization head is per position only: the raw frame feature and the
region tokens visible at that frame; never a segment index, a segment length or a within-clip index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from train.losses import alignment_similarity


@dataclass
class MergePlan:
    video: torch.Tensor  # [G, S] int64 source video (batch index) of each position, 0 on padding
    frame: torch.Tensor  # [G, S] int64 source frame of each position, 0 on padding
    valid: torch.Tensor  # [G, S] bool, False = padding
    owner: torch.Tensor  # [G, S] int64 which of the group's M texts each position shows, -1 = padding
    spans: torch.Tensor  # [G, M, 2] int64 (start, end exclusive) of text m's segment


def plan_merge(groups: torch.Tensor, T: int, min_frames: int, generator: torch.Generator) -> MergePlan:
    """groups [G, M] video indices (text m of a group is the caption of video groups[g, m])."""
    G, M = groups.shape
    S = M * T
    video = torch.zeros(G, S, dtype=torch.long)
    frame = torch.zeros(G, S, dtype=torch.long)
    owner = torch.full((G, S), -1, dtype=torch.long)
    spans = torch.zeros(G, M, 2, dtype=torch.long)
    lo = max(1, min(min_frames, T))
    for g in range(G):
        pos = 0
        for m in torch.randperm(M, generator=generator).tolist():
            length = int(torch.randint(lo, T + 1, (1,), generator=generator))
            first = int(torch.randint(0, T - length + 1, (1,), generator=generator))
            video[g, pos:pos + length] = groups[g, m]
            frame[g, pos:pos + length] = torch.arange(first, first + length)
            owner[g, pos:pos + length] = m
            spans[g, m] = torch.tensor([pos, pos + length])
            pos += length
    return MergePlan(video, frame, owner >= 0, owner, spans)


def unit_presence(unit_geom: torch.Tensor, unit_frame: torch.Tensor, unit_mask: torch.Tensor, T: int,
                  units: str) -> torch.Tensor:
    """[B, R, T] bool: unit r of video b is visible at frame t. A track is visible where its box is
    present (the presence flag of its per-frame geometry); a region token at its own frame."""
    B, R = unit_mask.shape
    if units == "track":
        present = unit_geom.reshape(B, R, T, -1)[..., 4] > 0.5  # geometry per frame: cx, cy, w, h, present, dx, dy
    else:
        present = unit_frame[..., None] == torch.arange(T, device=unit_frame.device)
    return present & unit_mask[..., None]


def position_match(units: torch.Tensor, unit_mask: torch.Tensor, regions: torch.Tensor, presence: torch.Tensor,
                   groups: torch.Tensor, plan: MergePlan, lam: float) -> torch.Tensor:
    """S_loc of each text of a group against the region tokens visible at each position of its merged
    sequence. units [B, P, E] + mask, regions [B, R, E], presence [B, R, T] -> [G, M, S] (0 on padding)."""
    G, M = groups.shape
    S = plan.video.shape[1]
    out = torch.zeros(G, M, S, device=units.device)
    for g in range(G):
        vis = presence[plan.video[g], :, plan.frame[g]] & plan.valid[g][:, None]  # [S, R]
        t = groups[g]
        out[g] = alignment_similarity(units[t], unit_mask[t], regions[plan.video[g]], vis, lam)
    return out
