"""Evaluation: embed a split (sharded over ranks, nothing dropped), then retrieval (one or several
captions per video), binding on twins and, on the demo corpus only, moment retrieval on merged sequences
of `loss.loc_videos` held-out videos (train/moments.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.config import TrainConfig
from train.data import SplitData, eval_shard
from train.losses import alignment_similarity, span_scores
from train.metrics import binding_accuracy, moment_metrics, retrieval_metrics
from train.model import VideoTextModel
from train.moments import MergePlan, plan_merge, plan_windows, window_clips
from train.objectives import TextBatch, align_inputs, align_regions, localize

log = logging.getLogger(__name__)


def split_captions(captions: list[list[str]]) -> tuple[list[str], int]:
    """Every caption of each video (SplitData.captions) -> the flat caption list (caption i of video
    i // q) and q. Every video must hold the same number q of captions (the Frozen-in-Time multi-caption
    protocol)."""
    counts = sorted({len(c) for c in captions})
    if len(counts) != 1 or counts[0] == 0:
        raise ValueError(f"videos hold different numbers of captions ({counts[:5]}...): multi-caption evaluation "
                         "needs the same number per video in their `captions` column (train.formats writes it)")
    return [c for row in captions for c in row], counts[0]


@dataclass
class Embeddings:
    video: torch.Tensor  # [N, E] global
    text: torch.Tensor  # [N, E] global
    text_cls: torch.Tensor  # [N, d]
    frames: torch.Tensor  # [N, T, d] per-frame outputs
    units: torch.Tensor  # [N, P, E] text alignment units
    unit_mask: torch.Tensor  # [N, P]
    regions: torch.Tensor  # [N, R, E]
    region_mask: torch.Tensor  # [N, R]
    q: int = 1  # captions per video: text rows are [N * q], caption i belongs to video i // q


def _gather_rows(local: dict[str, torch.Tensor], idx: torch.Tensor, n: int, world_size: int) -> dict:
    """Every rank's rows in item order. Axis 1 (word units) is zero-padded to the longest over ranks:
    each rank pads only to its own longest caption."""
    if world_size == 1:
        return local
    import torch.distributed as dist

    parts: list = [None] * world_size
    dist.all_gather_object(parts, (idx, local))
    out = {}
    for key in local:
        pieces = [part[key] for _, part in parts]
        if pieces[0].ndim >= 2:
            pieces = [_pad_axis1(p, max(q.shape[1] for q in pieces)) for p in pieces]
        full = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
        for (part_idx, _), piece in zip(parts, pieces):
            full[part_idx] = piece
        out[key] = full
    return out


def _pad_axis1(x: torch.Tensor, width: int) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], width, *x.shape[2:]))
    out[:, :x.shape[1]] = x
    return out


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on axis 0, zero-padding axis 1 (word units differ in length between chunks)."""
    if parts[0].ndim < 2:
        return torch.cat(parts)
    n = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0) * (p.ndim - 2) + (0, n - p.shape[1])) for p in parts])


@torch.no_grad()
def embed_split(model: VideoTextModel, cfg: TrainConfig, split: SplitData, text: TextBatch,
                device: torch.device, rank: int = 0, world_size: int = 1, chunk: int = 128) -> Embeddings:
    """text holds q captions per video (q = len(text) / len(split)), caption i of video i // q."""
    model.eval()
    q = text.mask.shape[0] // len(split)
    P = int(text.content.sum(1).max().clamp(min=1)) if cfg.loss.align_unit in ("content", "chunk") else \
        int(text.phrase.max().clamp(min=0)) + 1
    idx = eval_shard(len(split), rank, world_size)
    pieces: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(idx), chunk):
        rows = idx[s:s + chunk]
        vb = split.batch(rows).to(device)
        vo = model.encode_video(vb)
        trows = (rows[:, None] * q + torch.arange(q)).reshape(-1)  # the captions of these videos
        tb = text.rows(trows).to(device)
        to = model.encode_text(tb.inputs, tb.mask)
        units, umask, regions, rmask = align_inputs(model, vo, to, vb, tb, cfg.loss.align_unit, P)
        got = {"video": model.global_video(vo), "text": model.global_text(to), "text_cls": to.cls,
               "frames": vo.frames, "units": units, "unit_mask": umask, "regions": regions, "region_mask": rmask}
        for k, v in got.items():
            pieces.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
    local = {k: _cat_padded(v) for k, v in pieces.items()}
    if q > 1:  # gather text rows video by video, then flatten back to caption order
        local = {k: v.reshape(len(idx), q, *v.shape[1:]) if k in TEXT_KEYS else v for k, v in local.items()}
    full = _gather_rows(local, idx, len(split), world_size)
    if q > 1:
        full = {k: v.reshape(len(split) * q, *v.shape[2:]) if k in TEXT_KEYS else v for k, v in full.items()}
    return Embeddings(**full, q=q)


TEXT_KEYS = ("text", "text_cls", "units", "unit_mask")


@torch.no_grad()
def score_matrix(emb: Embeddings, cfg: TrainConfig) -> torch.Tensor:
    """[n_text, n_video] retrieval scores: global cosine, plus w * S_loc in "global+align" mode."""
    return retrieval_scores(cfg, emb.text, emb.units, emb.unit_mask, emb.video, emb.regions, emb.region_mask)


def retrieval_scores(cfg: TrainConfig, text: torch.Tensor, units: torch.Tensor, unit_mask: torch.Tensor,
                     video: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor, chunk: int = 16
                     ) -> torch.Tensor:
    """The retrieval score of every text against every clip: text [Q, E], units [Q, P, E] + mask, video [V, E],
    regions [V, R, E] + mask -> [Q, V]. Retrieval and the clip-window baseline both score through here."""
    sims = text @ video.t()
    if cfg.score_mode == "global+align":
        rows = [alignment_similarity(units[s:s + chunk], unit_mask[s:s + chunk], regions, region_mask,
                                     cfg.loss.align_lambda) for s in range(0, len(sims), chunk)]
        sims = sims + cfg.run.align_score_weight * torch.cat(rows)
    return sims


def binding(sims: np.ndarray, split: SplitData) -> dict[str, float]:
    pos = {v: i for i, v in enumerate(split.video_ids)}
    pairs = [(i, pos[t]) for i, t in enumerate(split.twins) if t and t in pos]
    if not pairs or sims.shape[0] != sims.shape[1]:
        return {}
    own = np.array([sims[i, i] for i, _ in pairs])
    twin = np.array([sims[i, j] for i, j in pairs])
    return {"binding_acc": binding_accuracy(own, twin), "binding_pairs": float(len(pairs))}


def best_window(score: torch.Tensor) -> torch.Tensor:
    """score [Q, S, S] (start s, end e) -> [Q, 2] best (s, e + 1) with s <= e. Exact ties (a plateau of
    equal logits, e.g. a head whose evidence is constant over a segment) go to the longest window, then
    the earliest: argmax alone would return a 1-position window at the plateau's start."""
    S = score.shape[-1]
    valid = torch.ones(S, S, dtype=torch.bool).triu()
    flat = score.masked_fill(~valid, float("-inf")).reshape(len(score), -1)  # [Q, S*S]
    best = flat == flat.max(1, keepdim=True).values
    length = (torch.arange(S)[None, :] - torch.arange(S)[:, None]).reshape(-1)  # [S*S] e - s
    pick = (length.float()[None] * best - (~best) * 1e9 - torch.arange(S * S) / (S * S + 1.0)).argmax(1)
    return torch.stack([pick // S, pick % S + 1], dim=1)


def has_moments(split: SplitData) -> bool:
    """Moment retrieval runs on merged sequences of trimmed clips whose captions describe the whole clip:
    the demo corpus (its videos carry a `twin` column). Other datasets report retrieval only."""
    return any(split.twins)


def window_scores(model: VideoTextModel, emb: Embeddings, groups: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Training-free baseline: the window maximising the summed (text . frame - mean) similarity in the
    global space, frames = each video's encoded frame tokens at the plan's positions. -> [G, M, S, S]."""
    device = next(model.parameters()).device
    frames = emb.frames[plan.video, plan.frame]  # [G, S, d]
    frames = F.normalize(model.proj_video(frames.to(device)), dim=-1).cpu()
    sim = torch.einsum("gme,gse->gms", emb.text[groups], frames)  # [G, M, S]
    valid = plan.valid[:, None, :]
    mean = (sim * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
    sim = torch.where(valid, sim - mean, torch.full_like(sim, -1e4))  # padding never joins a window
    cum = F.pad(sim.cumsum(-1), (1, 0))  # [G, M, S + 1]
    return cum[..., None, 1:] - cum[..., :-1, None]  # sum over [s, e]


@torch.no_grad()
def clip_window_scores(model: VideoTextModel, cfg: TrainConfig, emb: Embeddings, split: SplitData,
                       groups: torch.Tensor, plan: MergePlan, device: torch.device, chunk: int = 256) -> torch.Tensor:
    """Training-free baseline that reads the model as retrieval does: each candidate window of a merged
    sequence encoded as one clip by the video encoder (train/moments.py window_clips) and scored against
    each text of its group with the retrieval score (retrieval_scores). -> [G, M, S, S], -inf off the
    candidates. Candidates are the windows of loc_min_frames..T positions: plan_merge crops every segment
    to that range, so no longer or shorter window can be a segment (the head learns the same range from
    training on the same construction), and a clip holds T frames (the encoder has T frame indices)."""
    (G, M), S, T = groups.shape, plan.valid.shape[1], split.video.frames.shape[1]
    windows = plan_windows(plan, max(1, min(cfg.loss.loc_min_frames, T)), T)  # [W, 3] (group, start, length)
    score = torch.full((G, M, S, S), float("-inf"))
    model.eval()
    for g in range(G):
        texts = groups[g]  # [M] the group's captions
        text = (emb.text[texts].to(device), emb.units[texts].to(device), emb.unit_mask[texts].to(device))
        mine = windows[windows[:, 0] == g]
        for c in range(0, len(mine), chunk):
            w = mine[c:c + chunk]
            vb = window_clips(split.video, groups, plan, w, cfg.model.units).float().to(device)
            vo = model.encode_video(vb)
            regions, rmask = align_regions(model, vo, vb)  # [w, R, E] + mask
            sims = retrieval_scores(cfg, text[0], text[1], text[2], model.global_video(vo), regions, rmask)  # [M, w]
            score[g][:, w[:, 1], w[:, 1] + w[:, 2] - 1] = sims.float().cpu()  # [M, w] at (start, end)
    return score


def _decode(score: torch.Tensor, plan: MergePlan, prefix: str) -> dict[str, float]:
    """Best window per query (best_window) scored against the plan's spans (moment_metrics)."""
    S = score.shape[-1]
    pred = best_window(score.reshape(-1, S, S)).numpy()
    return moment_metrics(pred, plan.spans.reshape(-1, 2).numpy(), prefix)


@torch.no_grad()
def moment_retrieval(model: VideoTextModel, cfg: TrainConfig, emb: Embeddings, split: SplitData, seed: int,
                     device: torch.device) -> dict[str, float]:
    """Random groups of M held-out videos (a seeded permutation, not neighbours in the manifest), each
    merged into one sequence of random crops (train/moments.py), and each caption's segment predicted by
    the localization head (best span score, losses.span_scores; `moment_*`) or, for a model trained without
    it, by two training-free window baselines: the frame sum (window_scores; `moment_*`) and the
    clip-encoded window (clip_window_scores; `window_clip_*`). All are decoded by best_window and scored by
    moment_metrics on the same queries."""
    M, N, T = cfg.loss.loc_videos, len(split), split.video.frames.shape[1]
    G = N // M
    if G == 0 or emb.q != 1:
        return {}
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(N, generator=g)[: G * M].reshape(G, M)
    plan = plan_merge(groups, T, cfg.loss.loc_min_frames, g)
    if cfg.loss.loc_weight > 0:
        model.eval()
        video = split.video.float().to(device)
        aligned = (emb.units.to(device), emb.unit_mask.to(device), emb.regions.to(device), emb.region_mask.to(device))
        out = localize(model, cfg, video, emb.text_cls.to(device), aligned, groups, plan)
        out = _decode(span_scores({k: v.cpu() for k, v in out.items()}), plan, "moment")  # [G, M, S, S] scores
    else:
        out = _decode(window_scores(model, emb, groups, plan), plan, "moment")
        out.update(_decode(clip_window_scores(model, cfg, emb, split, groups, plan, device), plan, "window_clip"))
    out["moment_queries"] = float(G * M)
    return out


def evaluate(model: VideoTextModel, cfg: TrainConfig, split: SplitData, text: TextBatch, device: torch.device,
             rank: int = 0, world_size: int = 1, moments: bool = True) -> dict[str, float]:
    """Retrieval, binding and (moments=True, where the split has moments) moment retrieval."""
    emb = embed_split(model, cfg, split, text, device, rank, world_size)
    sims = score_matrix(emb, cfg).numpy()
    out = retrieval_metrics(sims)
    out.update(binding(sims, split))
    if moments and has_moments(split):
        out.update(moment_retrieval(model, cfg, emb, split, cfg.run.seed, device))
    out["videos"] = float(len(split))
    out["captions_per_video"] = float(emb.q)
    return out
