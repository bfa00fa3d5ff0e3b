"""A small real store (stores.create_store, zarr) of synthetic features with learnable structure:
objects with a colour, a shape and a direction; region features encode colour + shape, boxes move.
Val/test videos come in colour-swapped twins like the demo corpus."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stores import create_store
from stores.schema import Dims

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "diamond"]
DIRS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _scene(rng, n_obj):
    cols = rng.choice(len(COLORS), n_obj, replace=False)
    shp = rng.choice(len(SHAPES), n_obj, replace=False)
    dirs = rng.choice(list(DIRS), n_obj)
    return [(int(c), int(s), str(d)) for c, s, d in zip(cols, shp, dirs)]


def _caption(objs):
    parts = [f"a {COLORS[c]} {SHAPES[s]} moves {d}" for c, s, d in objs]
    return " while ".join(parts)


def _arrays(objs, rng, dims: Dims, basis):
    T, K, Df, Dr = dims.T, dims.K, dims.Df, dims.Dr
    a = {
        "frame_features": np.zeros((T, Df), np.float16), "region_features": np.zeros((T, K, Dr), np.float16),
        "region_boxes": np.zeros((T, K, 4), np.float32), "region_scores": np.zeros((T, K), np.float16),
        "region_classes": np.full((T, K), -1, np.int16), "region_counts": np.zeros((T,), np.int16),
        "frame_times": (np.arange(T) * 0.4).astype(np.float32),
    }
    frame = np.zeros(Df, np.float32)
    for k, (c, s, d) in enumerate(objs):
        feat = basis["color"][c] + basis["shape"][s]
        start = rng.uniform(0.3, 0.7, 2)
        for t in range(T):
            cx, cy = start + 0.05 * t * np.array(DIRS[d])
            a["region_boxes"][t, k] = [cx - 0.1, cy - 0.1, cx + 0.1, cy + 0.1]
            a["region_features"][t, k] = feat + 0.1 * rng.standard_normal(Dr)
            a["region_scores"][t, k] = 1.0
            a["region_classes"][t, k] = k
        frame += basis["frame_color"][c] + basis["frame_shape"][s]
    a["region_counts"][:] = len(objs)
    a["frame_features"][:] = frame + 0.1 * rng.standard_normal((T, Df))
    return a


def make_synthetic_store(out: Path, n_train: int = 48, n_test: int = 8, seed: int = 0,
                         dims: Dims = Dims(T=4, K=3, Df=16, Dr=24), backend: str = "zarr",
                         empty_splits: tuple[str, ...] = (), longer_odd_test: bool = False) -> Path:
    """longer_odd_test: odd test captions get 5 more words (ranks of a 2-process evaluation then hold
    captions of different lengths)."""
    rng = np.random.default_rng(seed)
    basis = {"color": rng.standard_normal((4, dims.Dr)), "shape": rng.standard_normal((4, dims.Dr)),
             "frame_color": rng.standard_normal((4, dims.Df)), "frame_shape": rng.standard_normal((4, dims.Df))}
    rows = []
    for i in range(n_train):
        objs = _scene(rng, int(rng.integers(1, 3)))
        rows.append((f"tr{i:04d}", objs, "train", ""))
    for i in range(0, n_test, 2):
        objs = _scene(rng, 2)
        twin = [(objs[1][0], objs[0][1], objs[0][2]), (objs[0][0], objs[1][1], objs[1][2])]
        rows.append((f"te{i:04d}", objs, "test", f"te{i + 1:04d}"))
        rows.append((f"te{i + 1:04d}", twin, "test", f"te{i:04d}"))
    rows = [r for r in rows if r[2] not in empty_splits]
    w = create_store(out, backend, dims=dims, n_videos=len(rows), shard_size=16,
                     provenance={"synthetic": f"seed{seed}"}, video_ids=[r[0] for r in rows])
    for shard in range((len(rows) + 15) // 16):
        sw = w.shard_writer(shard)
        for row in range(shard * 16, min(len(rows), shard * 16 + 16)):
            vid, objs, split, twin = rows[row]
            caption = _caption(objs) + (" near the edge of frame" if longer_odd_test and split == "test" and row % 2 else "")
            sw.put(row, vid, caption, _arrays(objs, rng, dims, basis), meta={"split": split, "twin": twin})
        sw.commit()
    return Path(out)
