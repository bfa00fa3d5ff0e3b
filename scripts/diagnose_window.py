"""Why the window baseline of moment retrieval moves with the training of the global space.

The baseline (train/evaluate.py `window_scores`) scores a window by the summed similarity of the caption's
global embedding with the *frame tokens* of the video encoder, projected by `proj_video`. That projection
is trained on the [CLS] token only, so nothing puts frame tokens into the global space. For each row this
trains one seed as `make ablation` does (val selection) and prints, on val:
- the window baseline's R@1@0.7 and mIoU;
- the cosine of a projected frame token with its own video's global embedding;
- caption . projected frame for the video's own caption (mean), and how often a frame's best caption of
  the split is its own (chance 1/N) or its own beats its colour-swapped twin's.

    PYTHONPATH=$PWD .venv/bin/python scripts/diagnose_window.py --rows queue,align [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from train.ablation import ROWS, _worker_init, train_and_select
from train.config import load_config
from train.data import load_split
from train.evaluate import embed_split, moment_retrieval, split_captions
from train.trainer import text_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="queue,align")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="data/ablation/features_v600_val100_t100_s0_given_8869b7c4")
    p.add_argument("--out", default="runs/diagnose_window")
    args = p.parse_args()
    _worker_init()  # one torch thread, as the ablation's workers
    cpu = torch.device("cpu")
    for row in args.rows.split(","):
        cfg = load_config("configs/train/ablation.yaml", ROWS[row][1] + [f"run.seed={args.seed}"]).validate()
        trainer, best = train_and_select(cfg, Path(args.features), Path(args.out) / row, 100)
        model = trainer.model.eval()
        val, _ = load_split(args.features, "val", cfg.model.units, cfg.model.max_units, expected=trainer.signature)
        with torch.no_grad():
            emb = embed_split(model, cfg, val, text_batch(cfg, split_captions(val.captions)[0], trainer.text_features), cpu)
            frames = F.normalize(model.proj_video(emb.frames), dim=-1)  # [N, T, E]
            sim = torch.einsum("ne,kte->nkt", emb.text, frames)  # [N caption, N video, T]
            own = sim.diagonal(dim1=0, dim2=1).T  # [N, T] each video's frames vs its own caption
            twins = [(i, val.video_ids.index(t)) for i, t in enumerate(val.twins) if t in val.video_ids]
            moments = moment_retrieval(model, cfg, emb, val, args.seed, cpu)
        print(row, json.dumps({
            "selected_step": best["step"], "val_binding": best["val"]["binding_acc"], "val_t2v_R@1": best["val"]["t2v_R@1"],
            "window_R@1@0.7": moments["moment_R@1_IoU0.7"], "window_mIoU": round(moments["moment_mIoU"], 1),
            "cos(frame, own video global)": round(float((frames * emb.video[:, None]).sum(-1).mean()), 3),
            "own caption . frame": round(float(own.mean()), 3),
            "frame's best caption is its own": round(float((sim.argmax(0) == torch.arange(len(val))[:, None]).float().mean()), 3),
            "own caption beats twin's at a frame": round(float(sum((own[i] > sim[j, i]).float().mean() for i, j in twins)
                                                               / len(twins)), 3)}), flush=True)


if __name__ == "__main__":
    main()
