"""Shared helpers of the stores tests: deterministic per-row arrays and small stores."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stores import Dims, create_store
from stores.schema import ARRAYS

DIMS = Dims(T=3, K=4, Df=8, Dr=6)
PROVENANCE = {"extractor": {"frame_encoder": "efficientnet_lite0", "weights_sha256": "seeded:0"}, "sampling": {"frames": 3}}


def row_arrays(row: int, dims: Dims = DIMS) -> dict[str, np.ndarray]:
    """The arrays of manifest row `row`: ReLU-sparse features, real boxes, padding marked by class -1."""
    rng = np.random.default_rng(1000 + row)
    counts = rng.integers(0, dims.K + 1, size=dims.T)  # [T]
    classes = np.full((dims.T, dims.K), -1, dtype=np.int16)  # [T, K]
    for t, c in enumerate(counts):
        classes[t, :c] = rng.integers(0, 1600, size=c)
    xy = np.sort(rng.random((dims.T, dims.K, 2, 2)), axis=2)  # [T, K, (x|y), (lo, hi)]
    return {
        "frame_features": np.maximum(rng.standard_normal((dims.T, dims.Df)), 0).astype(np.float16),  # [T, Df]
        "region_features": np.maximum(rng.standard_normal((dims.T, dims.K, dims.Dr)), 0).astype(np.float16),  # [T, K, Dr]
        "region_boxes": xy.transpose(0, 1, 3, 2).reshape(dims.T, dims.K, 4).astype(np.float32),  # [T, K, 4] x1,y1,x2,y2
        "region_scores": rng.random((dims.T, dims.K)).astype(np.float16),  # [T, K]
        "region_classes": classes,
        "region_counts": counts.astype(np.int16),  # [T]
        "frame_times": (np.arange(dims.T) * 0.5 + row).astype(np.float32),  # [T]
    }


def video_id(row: int) -> str:
    return f"vid{row:03d}"


def fill_shard(writer, shard: int, failed: tuple[int, ...] = ()) -> None:
    """Write and commit every row of a shard; rows in `failed` are recorded as failures."""
    with writer.shard_writer(shard) as sw:
        for row in sw.rows:
            if row in failed:
                sw.fail(row, video_id(row), f"caption {row}", f"DecodeError: bad video {row}", meta={"split": "val"})
            else:
                sw.put(row, video_id(row), f"caption {row}", row_arrays(row), meta={"split": "train"}, flags=("short",) if row % 2 else ())
        sw.commit()


def make_store(out: Path, backend: str = "zarr", compression: str | None = None, n_videos: int = 8, shard_size: int = 3,
               shards: tuple[int, ...] | None = None, failed: tuple[int, ...] = ()):
    writer = create_store(out, backend, dims=DIMS, n_videos=n_videos, shard_size=shard_size, provenance=PROVENANCE,
                          compression=compression, video_ids=[video_id(r) for r in range(n_videos)])
    for shard in range(writer.n_shards) if shards is None else shards:
        fill_shard(writer, shard, failed)
    return writer


def assert_row_equal(got: dict, row: int) -> None:
    want = row_arrays(row)
    for name, spec in ARRAYS.items():
        assert got[name].dtype == spec.dtype, (name, got[name].dtype)
        assert got[name].tobytes() == want[name].tobytes(), f"{name} of row {row} differs"
