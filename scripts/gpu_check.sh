#!/usr/bin/env bash
# GPU check: the CUDA paths, run for real on a tiny demo corpus (docs/extractors.md, "GPU check").
#   1. extraction stages on the GPU (Faster R-CNN detector + EfficientNet-Lite0, and the open_clip ViT-B-32
#      tower with patch-token regions) in bf16 and fp16 autocast, channels_last: frames/s and peak memory;
#   2. the whole `vlpcache extract` (local runner, run.device=cuda) into a store;
#   3. 50 training steps on that store (run.device=cuda, bf16 autocast): steps/s and peak memory.
# Exits 2 when torch sees no CUDA device, 1 on any error (a CUDA error included), 0 when all ran.
#
#   scripts/gpu_check.sh                       # on a GPU machine
#   scripts/gpu_check.sh --device cpu --videos 6 --steps 5 --iters 1   # the same code paths on CPU (fp32)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" - "$@" <<'PYTHON'
import argparse, csv, json, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

p = argparse.ArgumentParser(prog="scripts/gpu_check.sh")
p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
p.add_argument("--videos", type=int, default=24, help="demo videos to generate and extract")
p.add_argument("--steps", type=int, default=50, help="training steps")
p.add_argument("--iters", type=int, default=5, help="timed stage calls per model and dtype (after one warm-up)")
p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
args = p.parse_args(sys.argv[1:])

if args.device == "cuda" and not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device visible to torch (torch {torch.__version__}, built for CUDA "
          f"{torch.version.cuda}; torch.cuda.is_available() is False). Run it on a GPU machine, or pass "
          f"--device cpu to exercise the same code paths on CPU.", file=sys.stderr)
    sys.exit(2)
cuda = args.device == "cuda"
if cuda:
    print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")


def sync():
    if cuda:
        torch.cuda.synchronize()  # surfaces asynchronous CUDA errors here, not later


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")


def reset_peak():
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


from extractors import build_extraction_stage
from extractors.config import ExtractorConfig, SamplingConfig
from extractors.decode import decode_clip
from pipeline.demo import make_demo_corpus

work = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check_"))
manifest = make_demo_corpus(work / "demo", videos=args.videos, seed=0)
with open(manifest, newline="") as f:
    paths = [row["path"] for row in csv.DictReader(f)]
sampling = {"num_frames": 8, "short_side": 320, "max_side": 640}  # the detector's one scale
frames = []
for path in paths[:8]:
    frames += decode_clip(str(manifest.parent / path), SamplingConfig(**sampling)).frames

MODELS = {
    "detector+efficientnet": {"frame_encoder": {"model": "efficientnet_lite0", "weights": "pkg:efficientnet_lite0"},
                              "regions": {"kind": "detector", "max_boxes": 36, "min_boxes": 10}},
    "open_clip:ViT-B-32+patches": {"frame_encoder": {"model": "open_clip:ViT-B-32"},
                                   "regions": {"kind": "grid", "backbone": "frame_encoder", "grid_size": 7,
                                               "max_boxes": 49}},
}
dtypes = ("bf16", "fp16") if cuda else ("none",)
batch = frames[:64]  # 8 videos x 8 frames: one pipeline batch
print(f"\nstage throughput on {args.device}, {len(batch)} frames per call ({batch[0].shape[1]}x{batch[0].shape[0]})")
print(f"{'model':30s} {'amp':5s} {'frames/s':>9s} {'peak MiB':>9s}")
for name, model in MODELS.items():
    for amp in dtypes:
        raw = {"allow_random_weights": True, "sampling": sampling, **json.loads(json.dumps(model))}
        for section in ("frame_encoder", "regions"):
            raw[section].update(amp=amp, channels_last=True)
        reset_peak()
        stage = build_extraction_stage(ExtractorConfig.from_dict(raw), args.device)
        out = stage(batch)  # warm-up (cuDNN autotuning, lazy init)
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            out = stage(batch)
        sync()
        rate = args.iters * len(batch) / (time.perf_counter() - start)
        for label, x in (("frame features", out.frame_features), ("region features", out.regions.features)):
            if not np.isfinite(x).all():
                raise SystemExit(f"gpu_check: {name} {amp}: non-finite {label}")
        print(f"{name:30s} {amp:5s} {rate:9.1f} {peak_mib():9.0f}")
        del stage
extract_cfg = work / "extract.yaml"
extract_cfg.write_text(json.dumps({"run": {"shard_size": 8, "batch_videos": 8, "device": args.device},
                                   "extractor": {"allow_random_weights": True, "sampling": sampling,
                                                 **MODELS["detector+efficientnet"]}}))
features = work / "features"
print(f"\nvlpcache extract (local runner, run.device={args.device}) -> {features}", flush=True)
subprocess.run([sys.executable, "-m", "pipeline", "extract", "--manifest", str(manifest), "--out", str(features),
                "--runner", "local", "--config", str(extract_cfg), "--no-progress"], check=True)

from train.cli import train_main

reset_peak()
start = time.perf_counter()
code = train_main(["--features", str(features), "--out", str(work / "run"), "--steps", str(args.steps),
                   "--batch-size", "8", "--split", "train", "--eval-split", "", "--ckpt-every", "0",
                   "--device", args.device])
sync()
if code != 0:
    raise SystemExit(f"gpu_check: training exited {code}")
wall = time.perf_counter() - start
print(f"\ntrain: {args.steps} steps on {args.device} in {wall:.1f} s (incl. start-up and text cache): "
      f"{args.steps / wall:.2f} steps/s, peak {peak_mib():.0f} MiB")
print(f"gpu_check: OK ({work})")
PYTHON
