"""Where detector regions lose binding: detections, tracks and region features against the ground truth.

Scores a store of demo clips (detector or "given" boxes) against the ground-truth boxes of the corpus's
sidecars (boxes/ID.json, at the stored frames' times; read here only to score, never by the trainer).
Per split it prints:
- detections per frame, recall at IoU 0.5, duplicate boxes per object-frame, false positives per frame;
- tracks per video after train.tracks.link_tracks, and how many a video keeps (model.max_units);
- of the ground-truth objects, the fraction covered by exactly one track that holds no other object
  ("clean"), and tracks per object (fragments);
- the colour and shape of an object read from its region feature by a ridge probe fitted on train boxes
  (colour is what binding needs and what a shape-trained detector's box head may drop).

    PYTHONPATH=$PWD .venv/bin/python scripts/diagnose_tracks.py --store S --corpus C [--store S2 ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from stores import open_store
from train.data import track_tokens
from train.tracks import link_tracks


def read_split(store: str, split: str) -> tuple[list[str], dict]:
    reader = open_store(store)
    ids = [v for v in reader.video_ids if reader.meta(v).get("split", "") == split]
    return ids, reader.read_many(ids)


def match(gt_boxes: np.ndarray, gt_real: np.ndarray, det_boxes: np.ndarray, det_real: np.ndarray,
          thr: float = 0.5) -> np.ndarray:
    """One frame: [K_det] index of the ground-truth slot each detection overlaps most (IoU >= thr), -1 if none."""
    out = np.full(len(det_boxes), -1, np.int64)
    g, d = np.flatnonzero(gt_real), np.flatnonzero(det_real)
    if len(g) and len(d):
        iou = box_iou(torch.from_numpy(det_boxes[d]).float(), torch.from_numpy(gt_boxes[g]).float()).numpy()
        best = iou.argmax(1)
        ok = iou[np.arange(len(d)), best] >= thr
        out[d[ok]] = g[best[ok]]
    return out


def ground_truth(a: dict, ids: list[str], corpus: Path) -> dict:
    """Sidecar boxes at the stored frames: region_boxes [N, T, O, 4] normalised, region_classes [N, T, O]
    (object index, -1 out of view), colour / shape [N] lists of the objects' names."""
    N, T = a["frame_times"].shape
    sides = [json.loads((corpus / "boxes" / f"{v}.json").read_text()) for v in ids]
    O = max(len(s["objects"]) for s in sides)
    boxes, classes = np.zeros((N, T, O, 4), np.float32), np.full((N, T, O), -1, np.int64)
    for n, side in enumerate(sides):
        scale = np.array([side["width"], side["height"]] * 2, np.float32)
        frame = np.rint(a["frame_times"][n] * side["fps"]).astype(int)  # [T] sidecar frame index
        for o, ob in enumerate(side["objects"]):
            for t, f in enumerate(frame):
                if ob["boxes"][f] is not None:
                    boxes[n, t, o], classes[n, t, o] = np.asarray(ob["boxes"][f]) / scale, o
    return {"region_boxes": boxes, "region_classes": classes,
            "colour": [[o["color"] for o in s["objects"]] for s in sides],
            "shape": [[o["shape"] for o in s["objects"]] for s in sides]}


def object_of(gt: dict, det: dict) -> np.ndarray:
    """[N, T, K] ground-truth object index of each stored box (IoU >= 0.5 with it), -1 if none."""
    N, T = det["region_classes"].shape[:2]
    obj = np.full(det["region_classes"].shape, -1, np.int64)
    for n in range(N):
        for t in range(T):
            m = match(gt["region_boxes"][n, t], gt["region_classes"][n, t] >= 0,
                      det["region_boxes"][n, t], det["region_classes"][n, t] >= 0)
            obj[n, t] = np.where(m >= 0, gt["region_classes"][n, t][np.maximum(m, 0)], -1)
    return obj


def detection_stats(gt: dict, det: dict, obj: np.ndarray) -> dict[str, float]:
    gt_real, det_real = gt["region_classes"] >= 0, det["region_classes"] >= 0
    n_gt = gt_real.sum()
    found = dupes = 0
    for n, t in zip(*np.nonzero(gt_real.any(-1))):
        for c in gt["region_classes"][n, t][gt_real[n, t]]:
            hits = int((obj[n, t] == c).sum())
            found += hits > 0
            dupes += max(hits - 1, 0)
    frames = det_real.shape[0] * det_real.shape[1]
    return {"gt_per_frame": n_gt / frames, "det_per_frame": det_real.sum() / frames, "recall@0.5": found / n_gt,
            "duplicates_per_gt": dupes / n_gt, "false_pos_per_frame": ((obj < 0) & det_real).sum() / frames}


def track_stats(a: dict, obj: np.ndarray, max_units: int) -> dict[str, float]:
    """Tracks of `a` (link_tracks) against the object each box belongs to (obj [N, T, K], -1 = none)."""
    real = a["region_classes"] >= 0
    ids = link_tracks(a["region_boxes"], a["region_features"], real)
    kept = track_tokens({**a, "region_classes": ids}, max_units)[3].sum(1)  # [N] tokens per video
    clean = objects = fragments = split = mixed = 0
    tracks, stray = [], []
    for n in range(len(ids)):
        tracks.append(len(np.unique(ids[n][real[n]])))
        stray.append(len(set(ids[n][real[n] & (obj[n] < 0)]) - set(ids[n][obj[n] >= 0])))
        for o in np.unique(obj[n][obj[n] >= 0]):
            mine = np.unique(ids[n][obj[n] == o])
            impure = any(np.any((obj[n][ids[n] == m] != o) & (obj[n][ids[n] == m] >= 0)) for m in mine)
            objects += 1
            fragments += len(mine)
            split += len(mine) > 1
            mixed += impure
            clean += len(mine) == 1 and not impure
    return {"tracks_per_video": float(np.mean(tracks)), "tokens_per_video": float(kept.mean()),
            "objects_one_clean_track": clean / objects, "tracks_per_object": fragments / objects,
            "objects_split": split / objects, "objects_sharing_a_track": mixed / objects,
            "tracks_of_no_object_per_video": float(np.mean(stray))}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Ridge one-vs-rest probe on standardised features: accuracy on test."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    x, xt = (train_x - mu) / sd, (test_x - mu) / sd
    classes = np.unique(train_y)
    y = (train_y[:, None] == classes[None]).astype(np.float64) * 2 - 1
    w = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)
    return float((classes[(xt @ w).argmax(1)] == test_y).mean())


def labelled(a: dict, obj: np.ndarray, gt: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region features of boxes on an object, with that object's colour and shape."""
    n, t, k = np.nonzero(obj >= 0)
    o = obj[n, t, k]
    return (a["region_features"][n, t, k].astype(np.float32), np.array([gt["colour"][i][j] for i, j in zip(n, o)]),
            np.array([gt["shape"][i][j] for i, j in zip(n, o)]))


def report(store: str, corpus: Path, split: str, max_units: int, probe_train: int) -> None:
    ids, a = read_split(store, split)
    gt = ground_truth(a, ids, corpus)
    obj = object_of(gt, a)
    print(f"{store} ({split}, {len(ids)} clips, region features {a['region_features'].shape[-1]}-d)")
    print("  boxes:", {k: round(float(v), 3) for k, v in detection_stats(gt, a, obj).items()})
    print("  tracks:", {k: round(v, 3) for k, v in track_stats(a, obj, max_units).items()})
    if probe_train:
        tids, ta = read_split(store, "train")
        tids, ta = tids[:probe_train], {k: v[:probe_train] for k, v in ta.items()}
        tgt = ground_truth(ta, tids, corpus)
        xtr, ctr, s_tr = labelled(ta, object_of(tgt, ta), tgt)
        xte, cte, s_te = labelled(a, obj, gt)
        print(f"  probe on region features: colour {probe(xtr, ctr, xte, cte):.3f}, shape {probe(xtr, s_tr, xte, s_te):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, help="a store of the corpus's clips (repeatable)")
    p.add_argument("--corpus", required=True, help="the demo corpus (boxes/ sidecars: boxes, colour and shape)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-units", type=int, default=8)
    p.add_argument("--probe-train", type=int, default=150, help="train clips for the colour/shape probe (0 = none)")
    args = p.parse_args(argv)
    for store in args.store:
        report(store, Path(args.corpus), args.split, args.max_units, args.probe_train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
