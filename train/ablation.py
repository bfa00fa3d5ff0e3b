"""`make ablation`: the objective ablation on the demo corpus, 3 seeds, one table.

Makes (once, cached under data/ablation/) the demo corpus with `vlpcache demo-data` and its features with
`vlpcache extract --config configs/train/ablation_extract.yaml` (cached per hash of that file; ground-truth boxes as regions, the
pretrained EfficientNet-Lite0 as frame and region trunk), trains every row over the seeds and prints a
paper-style table of mean ± std of t2v R@1, binding accuracy and moment R@1 at IoU 0.5 on the held-out
test clips. Finished runs are cached (runs/ablation/ROW_seedS/result.json, valid for the same config and
features), so a re-run only trains what is missing; --fresh retrains.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import resource
import time
from pathlib import Path

import numpy as np

from train.config import load_config
from train.evaluate import evaluate
from train.trainer import Trainer, text_batch

log = logging.getLogger(__name__)

# row name -> (label, overrides on configs/train/ablation.yaml)
ROWS: dict[str, tuple[str, list[str]]] = {
    "global": ("global contrastive only", []),
    "word": ("+ word-region alignment (contextual words)", ["loss.align_weight=1.0", "loss.align_unit=word"]),
    "align": ("+ region-phrase alignment", ["loss.align_weight=1.0"]),
    "clipword": ("+ clip-word / temporal-aware", ["loss.clip_word_weight=0.5"]),
    "loc": ("+ localization (TemPVL)", ["loss.loc_weight=1.0"]),
    "all": ("all objectives", ["loss.align_weight=1.0", "loss.clip_word_weight=0.5", "loss.loc_weight=1.0"]),
}
EXTRACT_CONFIG = "configs/train/ablation_extract.yaml"
DEFAULT_ROWS = "global,align,clipword,loc,all"
COLUMNS = (("t2v_R@1", "t2v R@1"), ("binding_acc", "binding acc"), ("moment_R@1_IoU0.5", "moment R@1@0.5"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=600, help="demo clips in all splits (default 600)")
    p.add_argument("--test-videos", type=int, default=100, help="held-out test clips, twins (default 100)")
    p.add_argument("--val-videos", type=int, default=20, help="val clips (default 20; unused by the table)")
    p.add_argument("--corpus-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows among {','.join(ROWS)} (default {DEFAULT_ROWS})")
    p.add_argument("--config", default="configs/train/ablation.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--data", default="data/ablation", help="cache of the corpus and features")
    p.add_argument("--out", default="runs/ablation", help="runs and the table")
    p.add_argument("--fresh", action="store_true", help="retrain rows that already have a result")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {sorted(ROWS)}")
    return args


def _vlpcache(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", *args]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def prepare_features(args: argparse.Namespace) -> Path:
    """Demo corpus + features, made once: demo.json marks a complete corpus, a store with every video
    stored or failed a complete extraction (extract resumes where it stopped)."""
    from stores import open_store

    tag = f"v{args.videos}_t{args.test_videos}_s{args.corpus_seed}"
    # features are keyed by the extraction config too, so editing it never reuses stale features
    config_key = hashlib.sha256(Path(EXTRACT_CONFIG).read_bytes()).hexdigest()[:8]
    corpus, features = Path(args.data) / f"demo_{tag}", Path(args.data) / f"features_{tag}_{config_key}"
    if not (corpus / "demo.json").is_file():
        _vlpcache("demo-data", str(corpus), "--videos", str(args.videos), "--seed", str(args.corpus_seed),
                  "--test-videos", str(args.test_videos), "--val-videos", str(args.val_videos))
    done = (features / "store.json").is_file() and open_store(features).status.pending == 0
    if not done:
        _vlpcache("extract", "--config", EXTRACT_CONFIG, "--manifest",
                  str(corpus / "manifest.csv"), "--video-root", str(corpus), "--out", str(features),
                  "--runner", "local", "--no-progress")
    status = open_store(features).status
    if status.failed:
        log.warning("%d demo videos failed extraction and are left out: %s", status.failed, status.failures[:5])
    return features


def _count_split(features: Path, split: str) -> int:
    from stores import open_store

    reader = open_store(features)
    return sum(reader.meta(v).get("split", "") == split for v in reader.video_ids)


def run_one(args: argparse.Namespace, features: Path, row: str, seed: int) -> dict:
    out = Path(args.out) / f"{row}_seed{seed}"
    cfg = load_config(args.config, ROWS[row][1] + list(args.set) +
                      [f"run.seed={seed}"]).validate()
    result_path = out / "result.json"
    if result_path.is_file() and not args.fresh:
        cached = json.loads(result_path.read_text())
        if cached.get("config") == cfg.to_dict() and cached.get("features") == str(features):
            return cached
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    trainer = Trainer(cfg, str(features), out)
    trainer.fit()
    from train.data import load_split

    test, _ = load_split(str(features), "test", cfg.model.units, cfg.model.max_units, expected=trainer.signature)
    metrics = evaluate(trainer.model, cfg, test, text_batch(cfg, test.captions, trainer.text_features),
                       trainer.dist.device)
    result = {"row": row, "seed": seed, "metrics": metrics, "train_videos": _count_split(features, cfg.data.split),
              "steps": cfg.optim.steps, "batch_size": cfg.optim.batch_size, "wall_s": time.time() - start,
              "config": cfg.to_dict(), "features": str(features)}
    result_path.write_text(json.dumps(result, indent=2))
    log.info("%s seed %d: %s (%.0f s)", row, seed, {k: round(metrics.get(k, float("nan")), 1) for k, _ in COLUMNS},
             result["wall_s"])
    return result


def table(results: dict[str, list[dict]]) -> str:
    any_result = next(r for rs in results.values() for r in rs)
    m = any_result["metrics"]
    lines = ["| objectives | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row, rs in results.items():
        cells = []
        for key, _ in COLUMNS:
            vals = np.array([r["metrics"].get(key, np.nan) for r in rs])
            cells.append(f"{vals.mean():.1f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.1f}")
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for rs in results.values() for r in rs})
    wall = sum(r["wall_s"] for rs in results.values() for r in rs)
    lines.append("")
    lines.append(f"mean ± std over seeds {seeds}; {any_result['train_videos']} training videos, "
                 f"{int(m['videos'])} held-out test clips ({int(m.get('binding_pairs', 0))} captions in twin pairs, "
                 f"{int(m.get('moment_queries', 0))} moment queries on 4-video merged sequences); "
                 f"{any_result['steps']} steps of batch {any_result['batch_size']}; training + eval wall time "
                 f"{wall / 60:.1f} min. Chance: t2v R@1 {100 / m['videos']:.0f}%, binding 50%.")
    return "\n".join(lines)


def cpu_minutes() -> float:
    """User + system CPU time of this process and its finished subprocesses (corpus, extraction)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime) / 60


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    features = prepare_features(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {row: [run_one(args, features, row, seed) for seed in seeds] for row in args.rows.split(",")}
    text = table(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)
    print(f"\ntotal wall time {((time.time() - start) / 60):.1f} min, CPU time {cpu_minutes():.1f} min "
          f"(this process and its subprocesses); table in {Path(args.out) / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
