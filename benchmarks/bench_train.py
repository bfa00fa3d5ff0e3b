"""`make bench-train`: training from cached features against training from pixels, side by side in one
run; the streaming loader against a training step; peak RSS of training as the store grows.

This script may import every package (train/ must not import extractors/ or pipeline/, and the pixel
baseline needs both): the cache side is train/bench.py, the pixel baseline is PixelStep below.

Pixel baseline, per batch: decode the demo clips with the project's sampler (extractors.decode,
8 uniformly sampled frames), run a frame encoder forward *and backward* (ResNet-50 at 8 x 224^2, or the
configured encoder EfficientNet-Lite0), RoIAlign region features of the ground-truth boxes on the same
trunk (the "given" region source), track tokens from them, then the same video-text model and objectives
as the trainer (train.model / train.objectives, default config), AdamW over trunk and heads.
Cache side: the default trainer (train.trainer.Trainer) on a store of the same dims.

    python -m benchmarks.bench_train [--quick] [--sizes 10000,100000] [--json out.json]
    python -m benchmarks.bench_train --rss-only --sizes 10000,100000,1000000 --work DIR   # the 1M row

Also: the CPU seconds a fresh process spends loading the text tower, train.text.MiniLM (torch layers)
against transformers' BertModel.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from stores.schema import Dims
from train import bench
from train.config import TrainConfig
from train.data import geom_dim, track_tokens
from train.model import VideoBatch, VideoTextModel
from train.objectives import Objectives
from train.text import FrozenTextFeatures, resolve_model_dir

log = logging.getLogger("bench_train")
T, K = 8, 4


class Trunk(nn.Module):
    """Frames [N, 3, S, S] -> pooled [N, Df] and the map RoIAlign reads [N, C, S/stride, S/stride]."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        if name == "resnet50":
            import torchvision

            self.net = torchvision.models.resnet50(weights=None)
            self.dims, self.stride = (2048, 1024), 16  # pooled layer4; regions on C4 (layer3)
        else:
            import timm

            self.net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
            self.dims, self.stride = (1280, 1280), 32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "resnet50":
            n = self.net
            c4 = n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))))
            return n.layer4(c4).mean((2, 3)), c4
        fmap = self.net.forward_features(x)
        return fmap.mean((2, 3)), fmap


def _frames_tensor(frames: list[np.ndarray], size: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, H, W]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


class PixelStep:
    """One end-to-end training step from mp4 files (see the module docstring)."""

    def __init__(self, trunk: str, corpus: Path, rows: list[dict], cfg: TrainConfig, size: int = 224):
        from extractors.config import SamplingConfig

        self.corpus, self.rows, self.cfg, self.size = corpus, rows, cfg, size
        self.sampling = SamplingConfig(num_frames=T)
        self.trunk = Trunk(trunk)
        Df, Dr = self.trunk.dims
        torch.manual_seed(0)
        self.model = VideoTextModel(cfg, Df, Dr, geom_dim("track", T), T)
        self.objectives = Objectives(self.model, cfg)
        self.opt = torch.optim.AdamW([*self.trunk.parameters(), *self.model.parameters()], lr=1e-4)
        model_dir = resolve_model_dir(cfg.text.model_dir)
        self.text = FrozenTextFeatures(model_dir)
        self.gen = torch.Generator().manual_seed(0)

    def _video(self, batch: list[dict]) -> VideoBatch:
        from extractors.decode import decode_clip
        from extractors.regions import given_boxes_for_clip

        frames, boxes = [], []
        for r in batch:
            clip = decode_clip(str(self.corpus / r["path"]), self.sampling)
            frames += clip.frames
            given = given_boxes_for_clip(self.corpus / r["boxes"], clip)  # T x [objects, 4] pixels
            h, w = clip.frames[0].shape[:2]
            b = np.full((T, K, 4), np.nan, np.float32)
            for t, g in enumerate(given):
                b[t, :min(K, len(g))] = g[:K] / np.array([w, h, w, h], np.float32)
            boxes.append(b)
        boxes = np.stack(boxes)  # [B, T, K, 4] normalised, NaN = absent
        present = ~np.isnan(boxes).any(-1)  # [B, T, K]
        safe = np.nan_to_num(boxes)
        pooled, fmap = self.trunk(_frames_tensor(frames, self.size))  # [B*T, Df], [B*T, C, h, w]
        rois = torch.cat([torch.arange(len(frames)).repeat_interleave(K)[:, None].float(),
                          torch.from_numpy(safe.reshape(-1, 4)) * self.size], 1)  # [B*T*K, 5]
        regions = roi_align(fmap, rois, (7, 7), 1.0 / self.trunk.stride, 2, True).mean((2, 3))  # [B*T*K, Dr]
        B = len(batch)
        regions = regions.reshape(B, T, K, -1)
        p = torch.from_numpy(present).float()[..., None]
        per_object = (regions * p).sum(1) / p.sum(1).clamp(min=1)  # [B, K, Dr]: a track's mean RoI feature
        a = {"region_features": np.zeros((B, T, K, 1), np.float16), "region_boxes": safe,
             "region_classes": np.where(present, np.arange(K)[None, None], -1).astype(np.int16),
             "region_scores": present.astype(np.float16)}
        _, geom, unit_frame, mask, cls = track_tokens(a, self.cfg.model.max_units)  # geometry, order, masks
        units = per_object[torch.arange(B)[:, None], torch.from_numpy(cls).clamp(min=0)]  # [B, R, Dr]
        return VideoBatch(pooled.reshape(B, T, -1), torch.ones(B, T, dtype=torch.bool), units,
                          torch.from_numpy(geom), torch.from_numpy(unit_frame), torch.from_numpy(mask))

    def __call__(self, batch: list[dict]) -> None:
        video = self._video(batch)
        from train.trainer import text_batch

        text = text_batch(self.cfg, [r["caption"] for r in batch], self.text).rows(torch.arange(len(batch)))
        loss = sum(self.objectives(video, text, self.gen).values())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def pixel_rate(trunk: str, corpus: Path, rows: list[dict], batch: int, steps: int, size: int) -> float:
    step = PixelStep(trunk, corpus, rows, TrainConfig(), size)
    step(rows[:batch])  # warm-up (allocations, text cache)
    start = time.perf_counter()
    for i in range(steps):
        step([rows[(1 + i) * batch % len(rows) + j] for j in range(batch)])
    return steps * batch / (time.perf_counter() - start)


TEXT_TOWER = {  # each after `import torch` in a fresh process
    "torch": "",
    "minilm_torch": "from train.text import default_model_dir, load_minilm; load_minilm(default_model_dir())",
    "minilm_transformers": "from transformers import BertModel; from train.text import default_model_dir; "
                           "BertModel.from_pretrained(str(default_model_dir()), local_files_only=True)",
}


def text_tower_cpu(repeats: int = 3) -> dict[str, float]:
    """Median CPU seconds (user + sys) of a fresh process that imports torch and loads MiniLM each way
    (run alternately, so load from other processes hits both alike)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cpu: dict[str, list[float]] = {k: [] for k in TEXT_TOWER}
    for _ in range(repeats):
        for name, code in TEXT_TOWER.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", f"import torch; {code}"], env=env, check=True,
                           capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {f"text_cpu_s_{k}": statistics.median(v) for k, v in cpu.items()}


# Small dims, chosen so that the 1M-video store (3.4 KB a video) is over 3x the trainer's peak RSS, whose
# floor is torch itself (docs/training.md, "Memory at 1M videos"): at Df=Dr=32 it was 1.9 GB, 2.1x.
RSS_DIMS = Dims(T=4, K=4, Df=64, Dr=64)


def rss_store(work: Path, n: int) -> Path:
    """The synthetic store of the RSS row for n videos; one already complete in --work is reused (writing
    1M videos through the writer takes long)."""
    path = work / f"rss_{n}"
    if path.exists():
        return _reuse(path, n, RSS_DIMS)
    return bench.synthetic_store(path, n, RSS_DIMS, shard_size=1000)


def _reuse(path: Path, n: int, dims: Dims) -> Path:
    from stores import open_store

    reader = open_store(path)
    if len(reader) != n or reader.pending_shards() or reader.dims != dims:
        raise RuntimeError(f"{path} is not a complete store of {n} videos at {dims} ({len(reader)} videos, "
                           f"{len(reader.pending_shards())} shards pending, {reader.dims}); remove it")
    log.warning("reusing the complete store %s (%d videos)", path, n)
    return path


def rss_rows(work: Path, sizes: list[int], steps: int, batch: int) -> list[dict]:
    rss = []
    for n in sizes:
        store = rss_store(work, n)
        r = bench.peak_rss_of_training(store, work / f"run_rss_{n}_{time.time_ns()}", steps=steps, batch_size=batch)
        rss.append({"videos": n, "disk_mb": bench.store_bytes(store) / 1e6, **r})
        print(json.dumps(rss[-1]), flush=True)  # progress: the table comes at the end
    return rss


def loader_rows(work: Path, quick: bool) -> dict[str, float]:
    """Training samples/s of the default trainer from a store of the pixel side's dims, and the loader
    alone (2 workers) on the same store: first cold (its files evicted from the page cache), then warm."""
    cache_store, n, dims = work / "cache_store", 64 if quick else 2048, Dims(T=T, K=K, Df=2048, Dr=1024)
    if cache_store.exists():
        _reuse(cache_store, n, dims)
    else:
        bench.synthetic_store(cache_store, n, dims, shard_size=32 if quick else 256)
    batch, steps, batches = (8, 1, 2) if quick else (64, 6, 24)
    step = bench.train_rate(cache_store, work / f"run_cache_{time.time_ns()}", steps, batch, workers=2)["samples_per_s"]
    cold = bench.loader_rate(cache_store, batches, batch, workers=2, cold=True)
    warm = bench.loader_rate(cache_store, batches, batch, workers=2)
    return {"cache_samples_per_s": step, "loader_cold_samples_per_s": cold, "loader_samples_per_s": warm,
            "loader_cold_vs_step": cold / step, "loader_vs_step": warm / step,
            "cache_store_mb": bench.store_bytes(cache_store) / 1e6}


def flops_per_sample(fn, n: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny inputs, 64^2 frames (the test runs this): no meaningful figures")
    p.add_argument("--sizes", default="10000,100000", help="store sizes (videos) for the RSS rows")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--work", help="scratch folder (default: a temporary one); complete RSS stores in it are reused")
    p.add_argument("--rss-only", action="store_true", help="only the memory rows and the text-tower CPU")
    p.add_argument("--loader-only", action="store_true", help="only the training step and the loader, cold and warm")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    q = args.quick
    out: dict = {"quick": q}
    sizes = [64] if q else [int(s) for s in args.sizes.split(",")]
    if args.loader_only:
        work.mkdir(parents=True, exist_ok=True)
        out.update(loader_rows(work, q))
        _print_loader(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0
    out.update(text_tower_cpu(1 if q else 3))
    if args.rss_only:
        work.mkdir(parents=True, exist_ok=True)
        out["rss"] = rss_rows(work, sizes, 2 if q else 20, 16 if q else 64)
        _print(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0

    from pipeline.demo import make_demo_corpus

    corpus = work / "corpus"
    manifest = make_demo_corpus(corpus, videos=4 if q else 16, seed=0, val_videos=0, test_videos=0)
    import csv

    rows = list(csv.DictReader(open(manifest)))
    batch_px, steps_px, size = (1, 1, 64) if q else (2, 2, 224)
    out["pixel_resnet50_samples_per_s"] = pixel_rate("resnet50", corpus, rows, batch_px, steps_px, size)
    out["pixel_effnet_lite0_samples_per_s"] = pixel_rate("efficientnet_lite0", corpus, rows, batch_px, steps_px, size)

    out.update(loader_rows(work, q))
    cache_store, batch = work / "cache_store", 8 if q else 64
    out["cache_vs_resnet50"] = out["cache_samples_per_s"] / out["pixel_resnet50_samples_per_s"]
    out["cache_vs_effnet_lite0"] = out["cache_samples_per_s"] / out["pixel_effnet_lite0_samples_per_s"]

    # FLOPs per sample, both ways (forward + backward of one step)
    cfg = TrainConfig()
    px = PixelStep("resnet50", corpus, rows, cfg, size)
    out["flops_pixel_resnet50"] = flops_per_sample(lambda: px(rows[:batch_px]), batch_px)
    from train.trainer import Trainer

    tr = Trainer(bench.bench_config(2, batch, 0), str(cache_store), work / "run_flops")
    out["flops_cache"] = flops_per_sample(tr.train_step, batch)
    print(json.dumps(out), flush=True)  # progress: the table comes at the end

    out["rss"] = rss_rows(work, sizes, 2 if q else 20, 16 if q else 64)
    _print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _print(o: dict) -> None:
    t, hf = o["text_cpu_s_minilm_torch"] - o["text_cpu_s_torch"], o["text_cpu_s_minilm_transformers"] - o["text_cpu_s_torch"]
    print(f"text tower, CPU s per process beyond `import torch` ({o['text_cpu_s_torch']:.2f} s): torch MiniLM "
          f"{t:.2f} | transformers BertModel {hf:.2f} | saving {hf - t:.2f} s")
    if "cache_samples_per_s" not in o:
        _print_rss(o)
        return
    print(f"training samples/s: cache {o['cache_samples_per_s']:.1f} | pixels ResNet-50 8x224^2 "
          f"{o['pixel_resnet50_samples_per_s']:.3f} ({o['cache_vs_resnet50']:.0f}x) | pixels EfficientNet-Lite0 "
          f"{o['pixel_effnet_lite0_samples_per_s']:.3f} ({o['cache_vs_effnet_lite0']:.0f}x)")
    print(f"FLOPs per sample (fwd+bwd): pixels ResNet-50 {o['flops_pixel_resnet50'] / 1e9:.1f} G | cache "
          f"{o['flops_cache'] / 1e9:.3f} G ({o['flops_pixel_resnet50'] / o['flops_cache']:.0f}x)")
    _print_loader(o)
    _print_rss(o)


def _print_loader(o: dict) -> None:
    print(f"training step {o['cache_samples_per_s']:.1f} samples/s; loader (2 workers, store "
          f"{o['cache_store_mb']:.0f} MB): cold {o['loader_cold_samples_per_s']:.0f} samples/s "
          f"({o['loader_cold_vs_step']:.1f}x the step), warm {o['loader_samples_per_s']:.0f} samples/s "
          f"({o['loader_vs_step']:.1f}x)")


def _print_rss(o: dict) -> None:
    print("| videos | features on disk MB | trainer RSS MB: import torch / + trainer imports / Trainer built | "
          "trainer peak RSS MB | trainer + 2 workers peak PSS MB | of it, peaks: anonymous / store files mapped / "
          "other files | disk / peak RSS | disk / PSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in o["rss"]:
        print(f"| {r['videos']} | {r['disk_mb']:.0f} | {r['torch_mb']:.0f} / {r['imports_mb']:.0f} / "
              f"{r['built_mb']:.0f} | {r['trainer_mb']:.0f} | {r['with_workers_mb']:.0f} | {r['anon_pss_mb']:.0f} / "
              f"{r['store_pss_mb']:.0f} / {r['file_pss_mb'] - r['store_pss_mb']:.0f} | "
              f"{r['disk_mb'] / r['trainer_mb']:.2f} | {r['disk_mb'] / r['with_workers_mb']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
