"""Evaluation metrics (public contract: `retrieval_metrics`).

Retrieval follows the Frozen-in-Time protocol (DemoVLP's): sims is [n_text, n_video], q = n_text // n_video
captions per video, caption i belongs to video i // q.
- text->video rank r_i = #{j : s_ij > s_i,gt}: ties are counted in the query's favour;
- video->text rank of caption c of video v: #{k : s_kv > s_cv} + (#{k : s_kv = s_cv} - 1) / 2
  (ties split evenly), and the video's rank is the min over its captions.
R@K = 100 * mean(rank < K); MedR = median(rank) + 1; MeanR = mean(rank) + 1.

Because the t2v figure counts ties in the query's favour, a constant similarity matrix scores t2v R@1 =
100. `retrieval_metrics` therefore also reports the tie-averaged t2v figures (`t2vavg_*`: the expected
R@K / rank when ties are broken at random) and logs a warning when more than 1% of the ground-truth
scores are tied with another video's score (`t2v_tied_pct`).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
TIE_WARNING_PCT = 1.0


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


def t2v_ties(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n_text] videos scored strictly above the ground truth, and videos tied with it (itself excluded)."""
    sims = _check_sims(sims)
    q = sims.shape[0] // sims.shape[1]
    gt = np.arange(sims.shape[0]) // q
    s_gt = sims[np.arange(sims.shape[0]), gt][:, None]
    return np.sum(sims > s_gt, axis=1).astype(np.float64), (np.sum(sims == s_gt, axis=1) - 1).astype(np.float64)


def tie_averaged_t2v(sims: np.ndarray) -> dict[str, float]:
    """t2v R@K, MedR and MeanR in expectation over random tie-breaking: with g videos above the ground
    truth and e tied with it, its rank is uniform on {g, ..., g + e}, so P(rank < K) = clip((K - g) / (e + 1))."""
    greater, equal = t2v_ties(sims)
    out = {f"t2vavg_R@{k}": float(100.0 * np.mean(np.clip((k - greater) / (equal + 1), 0.0, 1.0))) for k in (1, 5, 10)}
    expected = greater + equal / 2.0
    out["t2vavg_MedR"] = float(np.median(expected) + 1)
    out["t2vavg_MeanR"] = float(np.mean(expected) + 1)
    out["t2v_tied_pct"] = float(100.0 * np.mean(equal > 0))
    return out


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
    out.update(tie_averaged_t2v(sims))
    if out["t2v_tied_pct"] > TIE_WARNING_PCT:
        log.warning("%.1f%% of the ground-truth scores are tied with another video's score: the Frozen-in-Time "
                    "t2v figures count those ties as hits (t2v R@1 %.1f); tie-averaged t2v R@1 is %.1f. Identical "
                    "features (one row per caption pointing at one file?) or a collapsed model cause this.",
                    out["t2v_tied_pct"], out["t2v_R@1"], out["t2vavg_R@1"])
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


def moment_metrics(pred: np.ndarray, gt: np.ndarray, prefix: str = "moment") -> dict[str, float]:
    """R@1 at IoU >= 0.3/0.5/0.7, mean IoU and exact-segment accuracy (percent) of top-1 segments, keyed
    `{prefix}_R@1_IoU0.7` etc. (one metric code for the head and every baseline)."""
    if len(pred) == 0:
        raise ValueError("moment_metrics needs at least one query")
    iou = temporal_iou(pred, gt)
    out = {f"{prefix}_R@1_IoU{t}": float(100.0 * np.mean(iou >= t)) for t in (0.3, 0.5, 0.7)}
    out[f"{prefix}_mIoU"] = float(100.0 * iou.mean())
    out[f"{prefix}_exact"] = float(100.0 * np.mean(np.all(np.asarray(pred) == np.asarray(gt), axis=1)))
    return out
