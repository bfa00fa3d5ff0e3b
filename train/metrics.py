"""Evaluation metrics (public contract: `retrieval_metrics`).

Retrieval follows the Frozen-in-Time protocol (DemoVLP's): sims is [n_text, n_video], q = n_text // n_video
captions per video, caption i belongs to video i // q.
- text->video rank r_i = #{j : s_ij > s_i,gt}: ties are counted in the query's favour;
- video->text rank of caption c of video v: #{k : s_kv > s_cv} + (#{k : s_kv = s_cv} - 1) / 2
  (ties split evenly), and the video's rank is the min over its captions.
R@K = 100 * mean(rank < K); MedR = median(rank) + 1; MeanR = mean(rank) + 1.
"""
from __future__ import annotations

import numpy as np


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}
    out[f"{prefix}_MedR"] = float(np.median(ranks) + 1)
    out[f"{prefix}_MeanR"] = float(np.mean(ranks) + 1)
    return out


def _check_sims(sims: np.ndarray) -> np.ndarray:
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim != 2 or sims.shape[0] == 0 or sims.shape[1] == 0:
        raise ValueError(f"sims must be a non-empty [n_text, n_video] matrix, got shape {sims.shape}")
    n_text, n_video = sims.shape
    if n_text % n_video != 0:
        raise ValueError(f"sims has {n_text} texts for {n_video} videos: n_text must be a multiple of n_video "
                         "(q captions per video, caption i of video i // q)")
    if not np.all(np.isfinite(sims)):
        raise ValueError("sims holds NaN or inf; check the embeddings")
    return sims


def t2v_ranks(sims: np.ndarray) -> np.ndarray:
    """[n_text] 0-based rank of each caption's own video (ties in the query's favour)."""
    sims = _check_sims(sims)
    q = sims.shape[0] // sims.shape[1]
    gt = np.arange(sims.shape[0]) // q
    s_gt = sims[np.arange(sims.shape[0]), gt][:, None]  # [n_text, 1]
    return np.sum(sims > s_gt, axis=1).astype(np.float64)


def v2t_ranks(sims: np.ndarray) -> np.ndarray:
    """[n_video] 0-based rank of each video's best caption (ties split evenly)."""
    sims = _check_sims(sims)
    n_text, n_video = sims.shape
    q = n_text // n_video
    cols = sims.T  # [n_video, n_text]
    own = cols.reshape(n_video, n_video, q)[np.arange(n_video), np.arange(n_video)]  # [n_video, q]
    ranks = np.empty((n_video, q))  # one caption slot at a time keeps memory at [n_video, n_text]
    for c in range(q):
        greater = np.sum(cols > own[:, c:c + 1], axis=1)
        equal = np.sum(cols == own[:, c:c + 1], axis=1)  # includes the caption itself
        ranks[:, c] = greater + (equal - 1) / 2.0
    return ranks.min(axis=1)


def retrieval_metrics(sims: np.ndarray) -> dict[str, float]:
    """t2v and v2t R@1/R@5/R@10/MedR/MeanR of a [n_text, n_video] similarity matrix."""
    out = _summary(t2v_ranks(sims), "t2v")
    out.update(_summary(v2t_ranks(sims), "v2t"))
    return out


def binding_accuracy(own: np.ndarray, twin: np.ndarray) -> float:
    """Percent of captions scoring their own clip above its colour-swapped twin (ties count half)."""
    own, twin = np.asarray(own, np.float64), np.asarray(twin, np.float64)
    if own.shape != twin.shape or own.size == 0:
        raise ValueError(f"binding_accuracy needs equal, non-empty score arrays, got {own.shape} and {twin.shape}")
    return float(100.0 * np.mean((own > twin) + 0.5 * (own == twin)))


def temporal_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of [n, 2] (start, end) segments, in any unit; end is exclusive."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    inter = np.clip(np.minimum(pred[:, 1], gt[:, 1]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    union = np.maximum(pred[:, 1], gt[:, 1]) - np.minimum(pred[:, 0], gt[:, 0])
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def moment_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """R@1 at IoU >= 0.3/0.5/0.7 and mean IoU (percent) of top-1 predicted segments."""
    if len(pred) == 0:
        raise ValueError("moment_metrics needs at least one query")
    iou = temporal_iou(pred, gt)
    out = {f"moment_R@1_IoU{t}": float(100.0 * np.mean(iou >= t)) for t in (0.3, 0.5, 0.7)}
    out["moment_mIoU"] = float(100.0 * iou.mean())
    return out
