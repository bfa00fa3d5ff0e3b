"""`vlpcache train` and `vlpcache eval` (dispatched here by pipeline/cli.py)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from train.config import ConfigError, TrainConfig, load_config

log = logging.getLogger(__name__)

# command-line switch -> config key (each objective is switched on by a weight > 0)
SHORTCUTS = {
    "split": "data.split", "eval_split": "data.eval_split", "workers": "data.workers",
    "steps": "optim.steps", "batch_size": "optim.batch_size", "lr": "optim.lr", "accum_steps": "optim.accum_steps",
    "seed": "run.seed", "device": "run.device", "ckpt_every": "run.ckpt_every", "eval_every": "run.eval_every",
    "global_weight": "loss.global_weight", "align_weight": "loss.align_weight", "align_unit": "loss.align_unit",
    "clip_word_weight": "loss.clip_word_weight", "loc_weight": "loss.loc_weight", "units": "model.units",
}


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpcache train", description="Pre-train a video-text model from cached features. "
                                "Objectives: --global-weight (InfoNCE), --align-weight (region-phrase alignment), "
                                "--clip-word-weight (LocVTP clip-word + temporal), --loc-weight (TemPVL localization); "
                                "a weight of 0 switches one off.")
    p.add_argument("--features", required=True, help="store folder written by `vlpcache extract`")
    p.add_argument("--out", required=True, help="run folder (config.json, checkpoint.pt, metrics.jsonl, curves.png)")
    p.add_argument("--config", help="YAML config (configs/train/*.yaml); defaults otherwise")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="strict override, e.g. --set model.dim=64 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--text-frozen", dest="text_frozen", action="store_true", default=None,
                   help="freeze MiniLM (its features are computed per batch without gradients; default)")
    p.add_argument("--text-trainable", dest="text_frozen", action="store_false", help="fine-tune MiniLM")
    for name, key in SHORTCUTS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=f"sets {key}")
    return p


def train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = [f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items() if getattr(args, name) is not None]
    if args.text_frozen is not None:
        overrides.append(f"text.frozen={str(args.text_frozen).lower()}")
    return load_config(args.config, overrides + list(args.set)).validate()


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    from stores import StoreError
    from train.data import DataError
    from train.text import CaptionError
    from train.trainer import RunError, Trainer

    try:
        cfg = train_config(args)
        result = Trainer(cfg, args.features, args.out, resume=args.resume).fit()
    except (ConfigError, DataError, CaptionError, RunError, StoreError, FileNotFoundError) as e:
        print(f"vlpcache train: {e}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps({k: round(v, 3) for k, v in result.items()}, sort_keys=True))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpcache eval", description="Retrieval (t2v/v2t R@1/5/10, MedR, MeanR), "
                                "binding accuracy on twins and moment retrieval on merged sequences.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file from `vlpcache train`")
    p.add_argument("--features", required=True, help="store folder to evaluate on")
    p.add_argument("--split", default="test", help="manifest split to evaluate ('' = every stored video)")
    p.add_argument("--score", choices=["global", "global+align"], help="retrieval score (default: the run's)")
    p.add_argument("--json", help="also write the metrics to this file (default RUN/eval_SPLIT.json)")
    return p


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    from stores import StoreError
    from train.data import DataError
    from train.text import CaptionError
    from train.trainer import RunError

    try:
        metrics, run = evaluate_checkpoint(args.checkpoint, args.features, args.split, args.score)
    except (ConfigError, DataError, CaptionError, RunError, StoreError, FileNotFoundError) as e:
        print(f"vlpcache eval: {e}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else run / f"eval_{args.split or 'all'}.json"
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, sort_keys=True))
    return 0


def evaluate_checkpoint(checkpoint: str, features: str, split: str, score: str | None = None):
    """-> (metrics, run folder). The store must match the checkpoint's dims and format version."""
    import torch

    from train.data import load_split
    from train.evaluate import evaluate, split_captions
    from train.trainer import build_model, load_checkpoint, setup_distributed, text_batch

    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if score:
        cfg.run.score = score
    run = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    data, _ = load_split(features, split, cfg.model.units, cfg.model.max_units, expected=ckpt["store"])
    dist = setup_distributed(cfg.run.device)
    model = build_model(cfg, ckpt["store"]).to(dist.device)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        metrics = evaluate(model, cfg, data, text_batch(cfg, split_captions(data.captions)[0]), dist.device,
                           dist.rank, dist.world_size)
    metrics["checkpoint_step"] = float(ckpt["step"])
    log.info("evaluated %s on split %r of %s", checkpoint, split, features)
    return metrics, run
