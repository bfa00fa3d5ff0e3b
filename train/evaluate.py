"""Evaluation: embed a split (sharded over ranks, nothing dropped), then retrieval, binding on twins and
moment retrieval on merged sequences of `loss.loc_videos` held-out videos."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.config import TrainConfig
from train.data import SplitData, eval_shard
from train.losses import alignment_similarity
from train.metrics import binding_accuracy, moment_metrics, retrieval_metrics
from train.model import VideoTextModel
from train.objectives import TextBatch, align_inputs, group_match, merge_sequence


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
    model.eval()
    P = int(text.phrase.max().clamp(min=0)) + 1
    idx = eval_shard(len(split), rank, world_size)
    pieces: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(idx), chunk):
        rows = idx[s:s + chunk]
        vb, tb = split.batch(rows).to(device), text.rows(rows).to(device)
        vo, to = model.encode_video(vb), model.encode_text(tb.inputs, tb.mask)
        units, umask, regions, rmask = align_inputs(model, vo, to, vb, tb, cfg.loss.align_unit, P)
        got = {"video": model.global_video(vo), "text": model.global_text(to), "text_cls": to.cls,
               "frames": vo.frames, "units": units, "unit_mask": umask, "regions": regions, "region_mask": rmask}
        for k, v in got.items():
            pieces.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
    local = {k: _cat_padded(v) for k, v in pieces.items()}
    return Embeddings(**_gather_rows(local, idx, len(split), world_size))


@torch.no_grad()
def score_matrix(emb: Embeddings, cfg: TrainConfig, chunk: int = 16) -> torch.Tensor:
    """[n_text, n_video] retrieval scores: global cosine, plus w * S_loc in "global+align" mode."""
    sims = emb.text @ emb.video.t()
    if cfg.score_mode == "global+align":
        rows = [alignment_similarity(emb.units[s:s + chunk], emb.unit_mask[s:s + chunk], emb.regions,
                                     emb.region_mask, cfg.loss.align_lambda) for s in range(0, len(sims), chunk)]
        sims = sims + cfg.run.align_score_weight * torch.cat(rows)
    return sims


def binding(sims: np.ndarray, split: SplitData) -> dict[str, float]:
    pos = {v: i for i, v in enumerate(split.video_ids)}
    pairs = [(i, pos[t]) for i, t in enumerate(split.twins) if t and t in pos]
    if not pairs:
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


@torch.no_grad()
def moment_retrieval(model: VideoTextModel, cfg: TrainConfig, emb: Embeddings, seed: int) -> dict[str, float]:
    """Merge consecutive groups of M held-out videos (in a seeded random order) and find each caption's
    video. With the localization head: argmax start + end logits; without it: the window maximising the
    summed (text . frame - mean) similarity in the global space."""
    M, (N, T, d) = cfg.loss.loc_videos, emb.frames.shape
    G = N // M
    if G == 0:
        return {}
    groups = torch.arange(G * M).reshape(G, M)
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(M, generator=g) for _ in range(G)])  # [G, M]
    seq = merge_sequence(emb.frames, groups, slots)  # [G, S, d]
    device = next(model.parameters()).device
    if cfg.loss.loc_weight > 0:
        model.eval()
        match = torch.stack([alignment_similarity(emb.units[g], emb.unit_mask[g], emb.regions[g], emb.region_mask[g],
                                                  cfg.loss.align_lambda) for g in groups])  # [G, M text, M video]
        s_loc = torch.block_diag(*match)  # [G*M, G*M]: a group's texts against its own videos
        match = group_match(s_loc, groups, slots)  # [G, M, K]
        out = model.loc(seq.to(device), emb.text_cls[groups].to(device), T, match.to(device))
        score = out["start"].cpu()[..., :, None] + out["end"].cpu()[..., None, :]  # [G, M, S, S]
    else:
        frames = F.normalize(model.proj_video(seq.to(device)), dim=-1).cpu()  # [G, S, E]
        sim = torch.einsum("gme,gse->gms", emb.text[groups], frames)
        cum = F.pad((sim - sim.mean(-1, keepdim=True)).cumsum(-1), (1, 0))  # [G, M, S + 1]
        score = cum[..., None, 1:] - cum[..., :-1, None]  # sum over [s, e]
    pred = best_window(score.reshape(G * M, M * T, M * T)).numpy()
    gt = torch.stack([slots * T, slots * T + T], dim=-1).reshape(G * M, 2).numpy()
    out = moment_metrics(pred, gt)
    out["moment_queries"] = float(G * M)
    return out


def evaluate(model: VideoTextModel, cfg: TrainConfig, split: SplitData, text: TextBatch, device: torch.device,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    emb = embed_split(model, cfg, split, text, device, rank, world_size)
    sims = score_matrix(emb, cfg).numpy()
    out = retrieval_metrics(sims)
    out.update(binding(sims, split))
    out.update(moment_retrieval(model, cfg, emb, cfg.run.seed))
    out["videos"] = float(len(split))
    return out
