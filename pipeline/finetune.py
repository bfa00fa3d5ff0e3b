"""`vlpcache finetune-detector CORPUS --out FILE`: a torchvision Faster R-CNN trained on the demo corpus's
ground-truth boxes, so that the demo's regions come from a detector rather than from an oracle.

- Train split only; the class of a box is the object's shape (1 + index in demo.SHAPES; 0 = background),
  never its identity, colour or motion.
- Default model: fasterrcnn_efficientnet_lite0_fpn (extractors/regions.py: torchvision's Faster R-CNN
  parts, anchors sized for the corpus's 18-28 px objects) on the ImageNet EfficientNet-Lite0 trunk shipped
  offline (`--backbone-weights`; its stem and first stages stay frozen, `--frozen-stages`); the rest is
  randomly initialised. Nothing downloads; seeded: the same corpus, config and seed give the same weights
  on one machine.
- Frames are fed at the corpus's own size, never rescaled (the extractor's FixedScaleTransform), as the
  extractor then runs the detector; with `proposals` RPN proposals per frame at inference, as in
  extraction (regions.proposals).
- mAP@0.5 on val (and on test, once, at the end) is computed by torchmetrics' MeanAveragePrecision
  (pycocotools backend) on the frames the extractor samples (uniform, `eval_frames` per clip).
- The checkpoint is the model's state_dict under torchvision's key names (`torch.save`, atomic), loadable
  as `regions.weights`; FILE.json beside it records the config, the class names and the mAPs.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from extractors.config import DETECTOR_MODELS, SamplingConfig
from extractors.decode import decode_clip
from extractors.encoders import seeded
from extractors.regions import EFFICIENTNET_DETECTOR, detector_builder, proposal_kwargs, single_scale
from pipeline import demo

log = logging.getLogger(__name__)

CLASSES = ("background", *demo.SHAPES)  # label i of the detector = CLASSES[i]


@dataclass
class FinetuneConfig:
    detector: str = EFFICIENTNET_DETECTOR  # regions.detector: one of DETECTOR_MODELS
    backbone_weights: str = "pkg:efficientnet_lite0"  # the trunk's ImageNet init (EFFICIENTNET_DETECTOR only; "" = random)
    frozen_stages: int = 3  # EFFICIENTNET_DETECTOR: the trunk's stem and first stages keep their init (of 6)
    steps: int = 300  # optimiser steps
    batch_size: int = 8  # frames per step
    lr: float = 2e-3  # AdamW, cosine decay to 0 after a linear warm-up
    warmup: int = 50  # warm-up steps
    weight_decay: float = 1e-4
    seed: int = 0  # model init and batch order
    threads: int = 0  # torch CPU threads (0 = torch's default); on a busy machine 1 costs the least CPU time
    eval_frames: int = 4  # frames per val/test clip, sampled as the extractor samples them (uniform)
    eval_every: int = 0  # also score val every this many steps (0 = only at the end), logged in history
    proposals: int = 32  # RPN proposals per frame at test time (regions.proposals: what the extractor uses)
    train_proposals: int = 256  # RPN boxes per level before NMS and per frame after it, in training (torchvision:
    #                             2000; its NMS over every anchor of a 128 px frame was a third of a step)
    box_batch_size_per_image: int = 16  # RoIs per frame for the box head's loss (torchvision: 512); it dominates a step

    def __post_init__(self) -> None:
        if self.detector not in DETECTOR_MODELS:
            raise ValueError(f"--detector must be one of {list(DETECTOR_MODELS)}, got {self.detector!r}")
        if self.backbone_weights and self.detector != EFFICIENTNET_DETECTOR:
            raise ValueError(f"--backbone-weights is for {EFFICIENTNET_DETECTOR}'s trunk; {self.detector} has no "
                             f"local ImageNet file: pass --backbone-weights ''")
        if not 0 <= self.frozen_stages <= 6:
            raise ValueError(f"--frozen-stages must be in 0..6 (stem + 5 stages), got {self.frozen_stages}")
        for name in ("steps", "batch_size", "eval_frames", "proposals", "train_proposals", "box_batch_size_per_image"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.eval_every < 0:
            raise ValueError(f"need lr > 0, warmup >= 0, eval_every >= 0; got {self.lr}, {self.warmup}, {self.eval_every}")


@dataclass
class FrameSet:
    """Frames of one split with their ground-truth boxes."""

    images: list[torch.Tensor]  # n × [3, H, W] uint8 (float copies only per batch: 4x less memory)
    targets: list[dict[str, torch.Tensor]]  # n × {"boxes": [m, 4] float32 pixels xyxy, "labels": [m] int64}

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class FinetuneResult:
    checkpoint: Path
    val_map50: float
    test_map50: float | None
    seconds: float  # wall time of the training steps
    cpu_seconds: float  # CPU time (user + sys, all threads) of the training steps
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "val_map50"?}


def read_split(corpus: Path, split: str) -> list[dict[str, str]]:
    manifest = corpus / "manifest.csv"
    if not (corpus / "demo.json").is_file() or not manifest.is_file():
        raise FileNotFoundError(f"{corpus} is not a complete demo corpus (no demo.json / manifest.csv): "
                                f"write one with `vlpcache demo-data {corpus}`")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if not rows:
        raise ValueError(f"{manifest} has no {split!r} clips: write a corpus with --{split}-videos > 0")
    return rows


def load_frames(corpus: Path, split: str, frames_per_clip: int | None) -> FrameSet:
    """Decoded frames of every clip of `split` and their boxes; None = every frame of each clip."""
    images, targets = [], []
    sampling = SamplingConfig(num_frames=frames_per_clip or demo.NUM_FRAMES)
    for row in read_split(corpus, split):
        clip = decode_clip(str(corpus / row["path"]), sampling)
        side = json.loads((corpus / row["boxes"]).read_text())
        labels = [CLASSES.index(o["shape"]) for o in side["objects"]]
        for index, frame in zip(clip.indices, clip.frames):
            present = [(o["boxes"][index], lab) for o, lab in zip(side["objects"], labels) if o["boxes"][index]]
            images.append(torch.from_numpy(frame).permute(2, 0, 1).contiguous())  # [3, H, W] uint8
            targets.append({
                "boxes": torch.tensor([b for b, _ in present], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([lab for _, lab in present], dtype=torch.int64),
            })
    return FrameSet(images, targets)


def build_detector(cfg: FinetuneConfig) -> nn.Module:
    """Seeded init with len(CLASSES) outputs; the proposal / RoI-sampling kwargs change no state-dict key."""
    with seeded(cfg.seed):
        model = detector_builder(cfg.detector)(
            weights=None, weights_backbone=cfg.backbone_weights or None, num_classes=len(CLASSES),
            **proposal_kwargs(cfg.proposals), box_batch_size_per_image=cfg.box_batch_size_per_image,
            rpn_pre_nms_top_n_train=cfg.train_proposals, rpn_post_nms_top_n_train=cfg.train_proposals)
    if cfg.detector == EFFICIENTNET_DETECTOR:
        for stage in list(model.backbone.body.children())[:cfg.frozen_stages]:
            stage.requires_grad_(False)
    # NHWC convolutions: a CPU step is ~1.3x cheaper (oneDNN's depthwise and strided convs, forward and backward)
    return single_scale(model).to(memory_format=torch.channels_last)  # frames at their own size, as in extraction


def _float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0  # [3, H, W] in [0, 1], what torchvision detectors expect


def _hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror left-right; every demo shape is symmetric about its vertical axis, so labels stay."""
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {"boxes": boxes, "labels": target["labels"]}


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + np.cos(np.pi * progress))


@torch.no_grad()
def mean_ap50(model: nn.Module, frames: FrameSet, batch_size: int = 16) -> float:
    """mAP at IoU 0.5 over the frames (torchmetrics, COCO-style 101-point interpolation, pycocotools)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], backend="pycocotools")
    was_training = model.training
    model.eval()
    for start in range(0, len(frames), batch_size):
        preds = model([_float(x) for x in frames.images[start:start + batch_size]])
        metric.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
                      frames.targets[start:start + batch_size])
    model.train(was_training)
    return float(metric.compute()["map_50"])


def train(model: nn.Module, frames: FrameSet, cfg: FinetuneConfig, val: FrameSet | None = None) -> list[dict]:
    """AdamW over random batches of `frames` (random horizontal flips), seeded; returns the history."""
    rng = np.random.default_rng(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    history: list[dict] = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        picks = rng.choice(len(frames), size=cfg.batch_size, replace=len(frames) < cfg.batch_size)
        flips = rng.random(cfg.batch_size) < 0.5
        batch = [_hflip(frames.images[i], frames.targets[i]) if f else (frames.images[i], frames.targets[i])
                 for i, f in zip(picks, flips)]
        losses = model([_float(b[0]) for b in batch], [b[1] for b in batch])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detector loss is {loss.item()} at step {step}: lower --lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4)}
        if val is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            entry["val_map50"] = round(mean_ap50(model, val), 4)
        if "val_map50" in entry or (step + 1) % 25 == 0:
            entry["cpu_s"] = round(time.process_time(), 1)
            log.info("detector step %d/%d: %s", step + 1, cfg.steps, entry)
        history.append(entry)
    return history


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> None:
    """state_dict by torchvision's key names (atomic), and PATH.json with what made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)
    sidecar = path.with_name(path.name + ".json")
    partial = sidecar.with_name(sidecar.name + ".partial")
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, sidecar)


def cached(corpus: Path, out: Path, cfg: FinetuneConfig) -> FinetuneResult | None:
    """The checkpoint at OUT when its sidecar says it was made from this corpus with this config."""
    sidecar = out.with_name(out.name + ".json")
    if not (out.is_file() and sidecar.is_file() and (corpus / "demo.json").is_file()):
        return None
    meta = json.loads(sidecar.read_text())
    if meta.get("config") != asdict(cfg) or meta.get("corpus") != json.loads((corpus / "demo.json").read_text()):
        log.warning("%s was made from another corpus or config: fine-tuning again", out)
        return None
    return FinetuneResult(out, meta["val_map50"], meta["test_map50"], meta["seconds"], meta["cpu_seconds"],
                          meta["history"])


def finetune(corpus: Path | str, out: Path | str, cfg: FinetuneConfig, test: bool = True,
             reuse: bool = False) -> FinetuneResult:
    """Train on the train split, score val (and test, once), save the checkpoint; with `reuse`, return the
    checkpoint already at OUT instead when it was made from the same corpus and config."""
    corpus, out = Path(corpus), Path(out)
    if reuse and (hit := cached(corpus, out, cfg)) is not None:
        log.info("reusing %s (delete it to fine-tune again)", out)
        return hit
    train_set = load_frames(corpus, "train", None)
    val_set = load_frames(corpus, "val", cfg.eval_frames)
    log.info("fine-tuning %s on %d train frames (%d val frames), %d steps", cfg.detector, len(train_set),
             len(val_set), cfg.steps)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # RPN / RoI sampling draws from the global generator
    model = build_detector(cfg)
    start, cpu = time.perf_counter(), time.process_time()
    history = train(model, train_set, cfg, val_set)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    val_map = mean_ap50(model, val_set)
    test_map = mean_ap50(model, load_frames(corpus, "test", cfg.eval_frames)) if test else None
    log.info("detector mAP@0.5: val %.4f, test %s (training: %.0f s wall, %.0f s CPU)", val_map,
             "not scored" if test_map is None else f"{test_map:.4f}", seconds, cpu)
    meta = {"config": asdict(cfg), "classes": list(CLASSES), "corpus": json.loads((corpus / "demo.json").read_text()),
            "val_map50": val_map, "test_map50": test_map, "train_frames": len(train_set), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "history": history}
    save_checkpoint(model, out, meta)
    return FinetuneResult(out, val_map, test_map, seconds, cpu, history)


def finetune_detector_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpcache finetune-detector", description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a demo corpus folder (`vlpcache demo-data`)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write (FILE.json beside it)")
    parser.add_argument("--no-test", action="store_true", help="do not score the test split")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the checkpoint at --out when its FILE.json says it was made from this corpus and config")
    defaults = FinetuneConfig()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"(default {value})")
    args = vars(parser.parse_args(argv))
    corpus, out, no_test, reuse = args.pop("corpus"), args.pop("out"), args.pop("no_test"), args.pop("reuse")
    try:
        cfg = FinetuneConfig(**args)
        result = finetune(corpus, out, cfg, test=not no_test, reuse=reuse)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    test = "not scored" if result.test_map50 is None else f"{result.test_map50:.3f}"
    print(f"detector {result.checkpoint}: mAP@0.5 val {result.val_map50:.3f}, test {test} "
          f"(training {result.seconds:.0f} s wall, {result.cpu_seconds:.0f} s CPU)")
    return 0
