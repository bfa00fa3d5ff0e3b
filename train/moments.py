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

from train.data import displacement
from train.losses import alignment_similarity
from train.model import VideoBatch


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


def plan_windows(plan: MergePlan, lo: int, hi: int) -> torch.Tensor:
    """[W, 3] (group, start, length) of every window of lo..hi positions inside a sequence's real positions,
    by group, then start, then length."""
    G, S = plan.valid.shape
    g, s, length = torch.meshgrid(torch.arange(G), torch.arange(S), torch.arange(lo, hi + 1), indexing="ij")
    keep = s + length <= plan.valid.sum(1)[:, None, None]  # padding is at the end of a sequence
    return torch.stack([g[keep], s[keep], length[keep]], dim=1)


def window_clips(video: VideoBatch, groups: torch.Tensor, plan: MergePlan, windows: torch.Tensor, units: str
                 ) -> VideoBatch:
    """Each window (g, s, L) of `plan_windows` as one clip of T frames, built as a stored clip is: T frames
    sampled uniformly over its span (a window shorter than T repeats frames; all T slots real, as every
    clip the encoder was trained on), with the unit tokens of what is visible in those frames and frame
    indices 0..T-1 of the clip itself (never the source frame's index within its video). video: the
    split's tokens (SplitData.video), groups [G, M], windows [W, 3] -> [W] clips."""
    T = video.frames.shape[1]
    g, s, length = windows.unbind(1)
    pos = s[:, None] + ((2 * torch.arange(T) + 1) * length[:, None]) // (2 * T)  # [W, T] slot t's position
    src_v, src_f = plan.video[g[:, None], pos], plan.frame[g[:, None], pos]  # [W, T]
    tokens = (_window_tracks(video, groups[g], src_v, src_f) if units == "track" else
              _window_regions(video, src_v, src_f))
    return _present_units(VideoBatch(video.frames[src_v, src_f], torch.ones_like(src_v, dtype=torch.bool), *tokens))


def _window_tracks(video: VideoBatch, vids: torch.Tensor, src_v: torch.Tensor, src_f: torch.Tensor) -> tuple:
    """Track tokens of window clips: every track of the group's videos (vids [W, M]), its per-frame geometry
    (data.track_tokens: cx, cy, w, h, present, 10*dx, 10*dy) taken at the slots' source frames where the
    slot shows its video, the displacement recomputed between slots. The token's feature stays its mean
    RoI feature over its whole video (the split keeps no per-frame RoI features of a track)."""
    (W, M), (T, R) = vids.shape, (src_f.shape[1], video.unit_mask.shape[1])
    geom = video.unit_geom[vids].reshape(W, M, R, T, -1)  # [W, M, R, T, 7]
    ix = torch.arange(W)[:, None, None, None], torch.arange(M)[:, None, None], torch.arange(R)[:, None]
    shown = (src_v[:, None, :] == vids[..., None])[:, :, None] & video.unit_mask[vids][..., None]  # [W, M, R, T]
    box = geom[(*ix, src_f[:, None, None, :])][..., :5] * shown[..., None]  # [W, M, R, T, 5]
    present = box[..., 4] > 0.5
    step = torch.zeros(W, M, R, T, 2)
    step[..., :-1, :] = displacement(box[..., :2], present)
    feats = video.units[vids].reshape(W, M * R, -1)  # [W, M*R, Dr]
    return (feats, torch.cat([box, step], -1).reshape(W, M * R, -1), torch.full((W, M * R), T),
            present.any(-1).reshape(W, M * R))


def _window_regions(video: VideoBatch, src_v: torch.Tensor, src_f: torch.Tensor) -> tuple:
    """Region tokens of window clips: the boxes of each slot's source frame, at the slot's frame index. The
    stored successor (same track in the next frame) holds where the next slot is the next frame of the same
    video; a repeated frame is its own successor (not moved); else there is none."""
    W, T = src_f.shape
    K = video.unit_mask.shape[1] // T
    v, idx = src_v[..., None].expand(W, T, K), src_f[..., None] * K + torch.arange(K)  # [W, T, K]
    real = video.unit_mask[v, idx]
    geom = video.unit_geom[v, idx].clone()  # [W, T, K, 9]
    same = src_v[:, 1:] == src_v[:, :-1]
    following = (same & (src_f[:, 1:] == src_f[:, :-1] + 1))[..., None, None]  # [W, T-1, 1, 1]
    repeated = (same & (src_f[:, 1:] == src_f[:, :-1]))[..., None, None]
    succ = torch.zeros(W, T, K, 3)
    succ[:, :-1] = torch.where(following, geom[:, :-1, :, 6:], repeated * torch.tensor([0.0, 0.0, 1.0]))
    geom[..., 6:] = succ * real[..., None]
    frame = torch.arange(T)[None, :, None].expand(W, T, K)
    return (video.units[v, idx].reshape(W, T * K, -1), geom.reshape(W, T * K, -1), frame.reshape(W, T * K),
            real.reshape(W, T * K))


def _present_units(v: VideoBatch) -> VideoBatch:
    """The unit slots shown in some clip of the batch, moved to the front and the rest cut: a masked slot
    changes no output (padding), but attention would pay for it. Unit tokens carry no slot position."""
    keep = max(1, int(v.unit_mask.sum(1).max()))
    order = torch.argsort(v.unit_mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :keep]  # [W, keep]

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, order.reshape(*order.shape, *(1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:]))

    return VideoBatch(v.frames, v.frame_mask, take(v.units), take(v.unit_geom), take(v.unit_frame), take(v.unit_mask))


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
