"""Contracts between extractors/ and its callers (pipeline/). No Ray, no storage here.

Every stage is a small class with one typed __call__ returning one result dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class DecodeError(Exception):
    """A video could not be decoded as planned; the message names the file and the reason."""


@dataclass
class Clip:
    """The sampled frames of one video."""

    frames: list[np.ndarray]  # T × [H, W, 3] uint8 RGB, after the decode-time resize policy
    times: np.ndarray  # [T] float32, presentation time in seconds of each returned frame
    indices: np.ndarray  # [T] int64, index of each returned frame among all frames a full decode yields
    #                      (display order); -1 = a black padding frame
    valid: np.ndarray  # [T] bool, False where a slot pads or repeats a frame an earlier slot already holds
    width: int  # source width as shown, before resize (sample aspect ratio applied, after rotation)
    height: int  # source height as shown, before resize (after rotation)
    flags: tuple[str, ...] = ()  # "short", "keyframe", "no_keyframe_in_window", "rotated", "anamorphic",
    #                              "sequential", "still", "cut_start" -> recorded in the shard ledger


@dataclass
class Regions:
    """Per-frame region boxes and features for a batch of B frames, padded to K slots."""

    boxes: np.ndarray  # [B, K, 4] float32, x1,y1,x2,y2 normalised to [0, 1]
    scores: np.ndarray  # [B, K] float32
    classes: np.ndarray  # [B, K] int64, -1 = padding
    counts: np.ndarray  # [B] int64, real boxes per frame (<= K); slots >= count are padding
    features: np.ndarray  # [B, K, Dr] float32, zero in padding slots


class FrameEncoder(Protocol):
    dim: int  # Df

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """B × [H, W, 3] uint8 -> [B, Df] float32."""


class RegionSource(Protocol):
    dim: int  # Dr
    max_boxes: int  # K

    def __call__(self, frames: list[np.ndarray], given_boxes: list[np.ndarray] | None = None) -> Regions:
        """B × [H, W, 3] uint8 (and, for the "given" source, B × [n_b, 4] pixel boxes) -> Regions."""


@dataclass
class Provenance:
    """What made a feature: recorded in the store so runs can be compared."""

    models: dict[str, str] = field(default_factory=dict)  # role -> model name
    weights_sha256: dict[str, str] = field(default_factory=dict)  # role -> sha256 of the weight file, or "random:seed=<seed>"
