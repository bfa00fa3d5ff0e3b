"""The on-disk schema shared by every writer and reader (the public contract in docs/store-format.md).

Row i of every array is manifest row i. Chunk = one video. Dims: T frames per video, K region slots
per frame, Df frame-feature width, Dr region-feature width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 2  # written; 2: id index, rows parts, small ledgers, row_status
READ_VERSIONS = (1, 2)  # read; format 1 (one JSON ledger per shard holding every record) stays readable

# Per-row commit state, also stored as the int8 array/dataset `row_status` for foreign readers.
STATUS_CODES = {"pending": 0, "ok": 1, "failed": 2}
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}


@dataclass(frozen=True)
class Dims:
    T: int  # frames per video
    K: int  # region slots per frame (padding marked by region_classes == -1)
    Df: int  # frame feature width
    Dr: int  # region feature width

    def __post_init__(self) -> None:
        for name in ("T", "K", "Df", "Dr"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Dims.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: np.dtype
    axes: tuple[str, ...]  # per-video axes (the leading N axis is implied)
    fill: float | int

    def shape(self, dims: Dims) -> tuple[int, ...]:
        """Per-video shape, e.g. (T, K, Dr)."""
        return tuple(4 if axis == "4" else getattr(dims, axis) for axis in self.axes)


ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        ArraySpec("frame_features", np.dtype("float16"), ("T", "Df"), 0),  # [N, T, Df]
        ArraySpec("region_features", np.dtype("float16"), ("T", "K", "Dr"), 0),  # [N, T, K, Dr]
        ArraySpec("region_boxes", np.dtype("float32"), ("T", "K", "4"), 0),  # [N, T, K, 4] x1,y1,x2,y2 in [0,1]
        ArraySpec("region_scores", np.dtype("float16"), ("T", "K"), 0),  # [N, T, K]
        ArraySpec("region_classes", np.dtype("int16"), ("T", "K"), -1),  # [N, T, K], -1 = padding
        ArraySpec("region_counts", np.dtype("int16"), ("T",), 0),  # [N, T]
        ArraySpec("frame_times", np.dtype("float32"), ("T",), 0),  # [N, T] seconds
    )
}

ROW_STATUS = ArraySpec("row_status", np.dtype("int8"), (), 0)  # [N]: 0 pending, 1 ok, 2 failed
