"""Sampling plans: which frames of a video to take, computed from its frame timestamps alone.

Plans work in time, not in frame counts, so that variable-frame-rate videos are sampled evenly; for a
constant frame rate the uniform plan picks frame floor((i + 0.5) * N / T), the middle frame of segment i.
A frame "at time t" is the frame on screen at t: the last frame whose timestamp is <= t.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extractors.config import SamplingConfig

# Planned times that fall exactly on a frame boundary must pick the later frame (floor semantics)
# despite float rounding of pts * time_base; 1e-6 s is far below any frame duration.
_EPS = 1e-6


@dataclass
class Plan:
    indices: np.ndarray  # [T] int64, presentation-order frame index of each slot, -1 = padding
    times: np.ndarray  # [T] float64, planned time of each slot in seconds
    valid: np.ndarray  # [T] bool, False for padding and for slots repeating an earlier slot's frame
    short: bool  # the span held fewer distinct frames than the plan asks for
    first: int = 0  # the span the plan draws from: frames first..stop-1 (the window's frames)
    stop: int = 0


def plan_frames(
    times: np.ndarray, end: float, cfg: SamplingConfig, window: tuple[float, float] | None = None
) -> Plan:
    """times: [N] sorted presentation times in seconds (first frame at 0); end: end of the last frame.

    window: (start, end) seconds; end may be inf or None (to the end of the video).
    Raises ValueError for a window that holds no frame.
    """
    first, stop, t0, t1 = _span(times, end, window)
    short = stop - first < cfg.T
    if cfg.plan == "uniform":
        planned = t0 + (np.arange(cfg.num_frames) + 0.5) * (t1 - t0) / cfg.num_frames  # [T]
        indices = _frame_at(times, planned, first, stop)
    elif cfg.plan == "clips":
        planned, indices = _clips(times, t0, t1, first, stop, cfg.num_clips, cfg.frames_per_clip)
    else:
        n = min(cfg.max_frames, max(1, int(np.ceil((t1 - t0) * cfg.fps - _EPS))))
        planned = t0 + np.arange(cfg.max_frames) / cfg.fps  # [T]
        indices = _frame_at(times, planned, first, stop)
        indices[n:] = indices[n - 1]  # past the end: repeat the last frame (or pad, below)
        short = n < cfg.max_frames
    plan = _mark_repeats(indices, planned, short=short, pad=cfg.short_policy == "pad")
    plan.first, plan.stop = first, stop
    return plan


def snap_to_keyframes(plan: Plan, times: np.ndarray, key_indices: np.ndarray) -> Plan | None:
    """Keyframe mode: each slot takes the keyframe nearest its planned time, among the keyframes inside
    the plan's span; None when the span holds no keyframe (the caller keeps the planned frames)."""
    inside = key_indices[(key_indices >= plan.first) & (key_indices < plan.stop)]  # [nK']
    if not len(inside):
        return None
    key_times = times[inside]  # [nK']
    nearest = np.abs(plan.times[:, None] - key_times[None, :]).argmin(axis=1)  # [T]
    indices = np.where(plan.indices >= 0, inside[nearest], -1)
    snapped = _mark_repeats(indices, plan.times, plan.short, pad=False, keep_pads=plan.indices < 0)
    snapped.first, snapped.stop = plan.first, plan.stop
    return snapped


def _span(times: np.ndarray, end: float, window: tuple[float, float] | None) -> tuple[int, int, float, float]:
    """Frames [first, stop) and time span [t0, t1) the plan draws from."""
    if window is None:
        return 0, len(times), float(times[0]), end
    w0 = float(window[0])
    w1 = float("inf") if window[1] is None else float(window[1])  # no end: to the end of the video
    if not (np.isfinite(w0) and not np.isnan(w1) and 0 <= w0 < w1):
        raise ValueError(f"window must be [start, end] seconds with 0 <= start < end (end may be open), got {window!r}")
    first = max(0, int(np.searchsorted(times, w0 + _EPS, "right")) - 1)  # the frame on screen at w0
    stop = int(np.searchsorted(times, w1 - _EPS, "left"))
    if w0 >= end or stop <= first:
        raise ValueError(f"window {window!r} holds no frame of a video lasting {end:.3f} s")
    return first, stop, max(w0, float(times[first])), min(w1, end)


def _frame_at(times: np.ndarray, t: np.ndarray, first: int, stop: int) -> np.ndarray:
    idx = np.searchsorted(times, t + _EPS, "right") - 1
    return np.clip(idx, first, stop - 1).astype(np.int64)


def _clips(
    times: np.ndarray, t0: float, t1: float, first: int, stop: int, k: int, f: int
) -> tuple[np.ndarray, np.ndarray]:
    """K clips of F consecutive frames, each centred on the middle of one of K equal segments."""
    centres = t0 + (np.arange(k) + 0.5) * (t1 - t0) / k  # [K]
    mid = _frame_at(times, centres, first, stop)  # [K]
    start = np.clip(mid - f // 2, first, max(first, stop - f))  # [K] keep the clip inside the span
    if stop - first >= k * f:  # room for K disjoint clips: shift each as little as needed to not overlap
        for j in range(k):
            lo = first if j == 0 else start[j - 1] + f
            start[j] = min(max(start[j], lo), stop - (k - j) * f)
    indices = np.minimum(start[:, None] + np.arange(f)[None, :], stop - 1).reshape(-1)  # [K * F]
    planned = times[indices].astype(np.float64)
    return planned, indices.astype(np.int64)


def _mark_repeats(
    indices: np.ndarray, planned: np.ndarray, short: bool, pad: bool, keep_pads: np.ndarray | None = None
) -> Plan:
    """valid = first occurrence of each frame; with pad=True repeats become padding slots (-1)."""
    _, first_pos = np.unique(indices, return_index=True)
    valid = np.zeros(len(indices), dtype=bool)
    valid[first_pos] = True
    if keep_pads is not None:
        valid &= ~keep_pads
    indices = indices.copy()
    if pad:
        indices[~valid] = -1
    return Plan(indices=indices, times=np.asarray(planned, dtype=np.float64), valid=valid, short=short)
