"""`make ablation`: the objective ablation on the demo corpus, 3 seeds, one table.

Makes (once, cached under data/ablation/) the demo corpus with `vlpcache demo-data` (train / val >= 100 /
test >= 100 clips) and its features with `vlpcache extract --config configs/train/ablation_extract.yaml`
(ground-truth boxes; cached per hash of that file) and, for the detector row, with
configs/train/ablation_extract_detector.yaml and a detector fine-tuned on the train split
(`vlpcache finetune-detector`). Each row is trained over the seeds; model selection (which of the
evaluated steps to keep) uses the val split only; the selected model is evaluated on test exactly once.
The table gives mean ± std and the code version (commit, dirty flag) of every row. Finished runs are
cached (runs/ablation/ROW_seedS/result.json), valid only for the same code version, config and features;
--fresh retrains.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import resource
import time
from pathlib import Path

import numpy as np
import torch

from train.config import TrainConfig, load_config
from train.data import load_split
from train.evaluate import evaluate, split_captions
from train.text import FrozenTextFeatures, resolve_model_dir
from train.trainer import Trainer, setup_distributed, text_batch

log = logging.getLogger(__name__)

ALIGN = ["loss.align_weight=1.0"]
LOCVTP = ["loss.clip_word_weight=0.5"]
LOC = ["loss.loc_weight=1.0"]
# row name -> (label, overrides on configs/train/ablation.yaml, features: "given" boxes or "detector").
# Every row links regions into tracks by geometry and appearance (train/tracks.py), never by stored class.
ROWS: dict[str, tuple[str, list[str], str]] = {
    "global": ("global contrastive only", [], "given"),
    "align": ("+ region-word alignment, given boxes", ALIGN, "given"),
    "detector": ("+ region-word alignment, detector regions (no identity)", ALIGN, "detector"),
    "content": ("+ region-word alignment over single content words, given boxes", ALIGN + ["loss.align_unit=content"],
                "given"),
    "phrase": ("+ region-phrase alignment (demo-grammar clauses), given boxes", ALIGN + ["loss.align_unit=phrase"],
               "given"),
    "queue": ("+ region-word alignment + a queue of 256 past global embeddings as extra negatives, given boxes",
              ALIGN + ["loss.queue_size=256"], "given"),
    "locvtp": ("+ region-word alignment + LocVTP clip-word / temporal-aware", ALIGN + LOCVTP, "given"),
    "loc": ("+ localization (TemPVL), variable-length segments", LOC, "given"),
    # chosen on val only (3 seeds, docs/training.md): a queue of 256 past global embeddings and the
    # localization term at 0.25 (its four cross-entropies are ~4x the alignment term): binding 96.0 vs 92.0
    "all": ("all (alignment + LocVTP + localization at 0.25 + queue 256), given boxes",
            ALIGN + LOCVTP + ["loss.loc_weight=0.25", "loss.queue_size=256"], "given"),
}
EXTRACT_CONFIG = {"given": "configs/train/ablation_extract.yaml", "detector": "configs/train/ablation_extract_detector.yaml"}
DEFAULT_ROWS = "global,align,detector,locvtp,loc,all"
COLUMNS = (("binding_acc", "binding"), ("t2v_R@1", "t2v R@1"), ("t2vavg_R@1", "t2v R@1 tie-avg"),
           ("moment_R@1_IoU0.5", "moment R@1@0.5"), ("moment_R@1_IoU0.7", "moment R@1@0.7"),
           ("moment_mIoU", "moment mIoU"), ("moment_exact", "moment exact"),
           ("window_clip_R@1_IoU0.7", "window (clip-encoded) R@1@0.7"), ("window_clip_mIoU", "window (clip-encoded) mIoU"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=600, help="demo clips in all splits (default 600)")
    p.add_argument("--test-videos", type=int, default=100, help="held-out test clips, twins (default 100)")
    p.add_argument("--val-videos", type=int, default=100, help="val clips, twins (default 100): model selection")
    p.add_argument("--corpus-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows among {','.join(ROWS)} (default {DEFAULT_ROWS})")
    p.add_argument("--config", default="configs/train/ablation.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--data", default="data/ablation", help="cache of the corpus and features")
    p.add_argument("--out", default="runs/ablation", help="runs and the table")
    p.add_argument("--select-every", type=int, default=100, help="steps between val evaluations (model selection)")
    p.add_argument("--detector-weights", default="", help="fine-tuned detector for the detector row (default: "
                   "made with `vlpcache finetune-detector` on the corpus' train split)")
    p.add_argument("--detector-steps", type=int, default=300, help="optimiser steps of `vlpcache finetune-detector` "
                   "for the detector row (default 300, its own default: ~0.5 CPU s a step with the pretrained "
                   "EfficientNet-Lite0 trunk, mAP@0.5 0.945 on the demo's val split)")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, each in its own process with one "
                   "torch thread (default 2: one per core of the 2-core target machine; 0 = in this process)")
    p.add_argument("--fresh", action="store_true", help="retrain rows that already have a result")
    p.add_argument("--val-only", action="store_true", help="report the val figures of the selected step and never "
                   "evaluate test (for choosing settings; results kept apart, under OUT/val/)")
    p.add_argument("--table-only", action="store_true", help="print the table of the finished runs in --out "
                   "(whatever their code version) without training anything")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {sorted(ROWS)}")
    return args


# Runs argv[1:] as a child subreaper and reaps every descendant before it exits. The extraction's model
# processes are forked by a multiprocessing forkserver that the extract process never waits for, so
# without this their CPU time reaches no parent's RUSAGE_CHILDREN and cpu_minutes() misses it.
_REAPED = """
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0):  # PR_SET_CHILD_SUBREAPER
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
rc = subprocess.run(sys.argv[1:]).returncode
while True:
    try:
        os.wait()
    except ChildProcessError:
        sys.exit(rc)
"""


def _vlpcache(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", *args]
    log.info("running %s", " ".join(cmd))
    subprocess.run([sys.executable, "-c", _REAPED, *cmd], check=True)


def code_version() -> dict:
    """The commit, whether the worktree differs from it, and a hash of the difference (so two different
    dirty states never share cached results)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
        diff = hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:12] if status.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True, "diff": str(time.time())}  # never reused
    return {"commit": commit, "dirty": bool(status.strip()), "diff": diff}


def _corpus(args: argparse.Namespace) -> Path:
    tag = f"v{args.videos}_val{args.val_videos}_t{args.test_videos}_s{args.corpus_seed}"
    corpus = Path(args.data) / f"demo_{tag}"
    if not (corpus / "demo.json").is_file():
        _vlpcache("demo-data", str(corpus), "--videos", str(args.videos), "--seed", str(args.corpus_seed),
                  "--test-videos", str(args.test_videos), "--val-videos", str(args.val_videos))
    return corpus


def detector_weights(args: argparse.Namespace, corpus: Path) -> Path:
    """The fine-tuned detector: --detector-weights, or made once with `vlpcache finetune-detector`."""
    if args.detector_weights:
        return Path(args.detector_weights)
    out = Path(args.data) / f"detector_{corpus.name}_steps{args.detector_steps}.pt"
    if not out.is_file():
        _vlpcache("finetune-detector", str(corpus), "--out", str(out), "--steps", str(args.detector_steps),
                  "--warmup", str(min(50, args.detector_steps // 4)), "--threads", "1")  # beside the given-box extraction
    return out


def prepare_features(args: argparse.Namespace, kind: str = "given") -> Path:
    """Demo corpus + features, made once: demo.json marks a complete corpus, a store with every video
    stored or failed a complete extraction (extract resumes where it stopped)."""
    from stores import open_store

    corpus = _corpus(args)
    extra: list[str] = []
    key = hashlib.sha256(Path(EXTRACT_CONFIG[kind]).read_bytes())
    if kind == "detector":
        weights = detector_weights(args, corpus)
        extra = ["--set", f"extractor.regions.weights={weights}"]
        key.update(weights.read_bytes())
    # features are keyed by the extraction config (and detector) too, so editing it never reuses stale features
    features = Path(args.data) / f"features_{corpus.name[5:]}_{kind}_{key.hexdigest()[:8]}"
    done = (features / "store.json").is_file() and open_store(features).status.pending == 0
    if not done:
        _vlpcache("extract", "--config", EXTRACT_CONFIG[kind], "--manifest", str(corpus / "manifest.csv"),
                  "--video-root", str(corpus), "--out", str(features), "--runner", "local", "--no-progress", *extra)
    status = open_store(features).status
    if status.failed:
        log.warning("%d demo videos failed extraction and are left out: %s", status.failed, status.failures[:5])
    return features


def prepare_all(args: argparse.Namespace, kinds: list[str]) -> dict[str, Path]:
    """The features of every kind, prepared side by side once the corpus exists: each extraction (and the
    detector fine-tune before its own) runs on about one core, so on two cores the given-box and detector
    chains overlap instead of queueing. CPU time is the same; an error is raised once both have stopped."""
    _corpus(args)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(kinds))) as pool:
        futures = {kind: pool.submit(prepare_features, args, kind) for kind in kinds}
        return {kind: fut.result() for kind, fut in futures.items()}


def _count_split(features: Path, split: str) -> int:
    from stores import open_store

    reader = open_store(features)
    return sum(reader.meta(v).get("split", "") == split for v in reader.video_ids)


def selection_score(m: dict[str, float], cfg: TrainConfig) -> float:
    """What model selection maximises on val: t2v R@1 + binding, + moment R@1@0.7 with the head."""
    score = m.get("t2v_R@1", 0.0) + m.get("binding_acc", 0.0)
    return score + (m.get("moment_R@1_IoU0.7", 0.0) if cfg.loss.loc_weight > 0 else 0.0)


_TEXT_FEATURES: dict[tuple, FrozenTextFeatures] = {}


def _shared_text_features(cfg: TrainConfig) -> FrozenTextFeatures:
    """One frozen-MiniLM feature cache per process for all its runs: computing the 600 captions' features
    again in every run cost ~8 CPU s of each. A caption's features do not depend on the batch or the run
    (train/text.py), so every run gets the very bits it would compute itself."""
    model_dir, device = resolve_model_dir(cfg.text.model_dir), setup_distributed(cfg.run.device).device
    key = (str(model_dir), str(device), cfg.text.cache_size)
    if key not in _TEXT_FEATURES:
        _TEXT_FEATURES[key] = FrozenTextFeatures(model_dir, device, cfg.text.cache_size)
    return _TEXT_FEATURES[key]


def train_and_select(cfg: TrainConfig, features: Path, out: Path, every: int) -> tuple[Trainer, dict]:
    """Train, evaluating val every `every` steps; the model keeps the weights of the best val score."""
    trainer = Trainer(cfg, str(features), out, text_features=_shared_text_features(cfg))
    val, _ = load_split(str(features), "val", cfg.model.units, cfg.model.max_units, expected=trainer.signature)
    val_text = text_batch(cfg, split_captions(val.captions)[0], trainer.text_features)
    best: dict = {"score": -1.0}
    sums: dict[str, float] = {}  # per-step terms and grad norm, summed: how the objectives share the clipped step
    while trainer.step < cfg.optim.steps:
        totals = trainer.train_step()
        totals["clipped"] = float(totals.get("grad_norm", 0.0) > cfg.optim.grad_clip > 0)
        for k, v in totals.items():
            sums[k] = sums.get(k, 0.0) + v
        if trainer.step % every == 0 or trainer.step == cfg.optim.steps:
            # moment retrieval only where selection_score reads it (with the head); test still reports
            # the window baselines of the other rows
            m = evaluate(trainer.model, cfg, val, val_text, trainer.dist.device, moments=cfg.loss.loc_weight > 0)
            score = selection_score(m, cfg)
            log.info("val at step %d: %.1f %s", trainer.step, score, {k: round(m.get(k, -1), 1) for k, _ in COLUMNS})
            if score > best["score"]:
                best = {"score": score, "step": trainer.step, "val": m,
                        "state": copy.deepcopy(trainer.model.state_dict())}
    trainer.model.load_state_dict(best.pop("state"))
    best["train_means"] = {k: v / max(trainer.step, 1) for k, v in sums.items()}
    return trainer, best


def _run_dir(args: argparse.Namespace, row: str, seed: int) -> Path:
    return Path(args.out) / ("val" if args.val_only else "") / f"{row}_seed{seed}"


def _run_config(args: argparse.Namespace, row: str, seed: int) -> TrainConfig:
    return load_config(args.config, ROWS[row][1] + list(args.set) + [f"run.seed={seed}"]).validate()


def cached_result(args: argparse.Namespace, features: Path, row: str, seed: int, code: dict) -> dict | None:
    """The finished run's result when it was made by the same code version, config, features and selection
    schedule (and --fresh is not given); else None."""
    result_path = _run_dir(args, row, seed) / "result.json"
    if args.fresh or not result_path.is_file():
        return None
    cached = json.loads(result_path.read_text())
    if (cached.get("config") == _run_config(args, row, seed).to_dict() and cached.get("features") == str(features)
            and cached.get("code") == code and cached.get("select_every") == args.select_every):
        return cached
    return None


def run_one(args: argparse.Namespace, features: Path, row: str, seed: int, code: dict) -> dict:
    """Train one row with one seed, select on val, score test once (or val with --val-only); cached."""
    cached = cached_result(args, features, row, seed, code)
    if cached is not None:
        return cached
    out, cfg = _run_dir(args, row, seed), _run_config(args, row, seed)
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.time(), _own_cpu_s()
    trainer, selected = train_and_select(cfg, features, out, args.select_every)
    if args.val_only:
        metrics = selected["val"]
    else:
        test, _ = load_split(str(features), "test", cfg.model.units, cfg.model.max_units, expected=trainer.signature)
        metrics = evaluate(trainer.model, cfg, test, text_batch(cfg, split_captions(test.captions)[0],
                                                                trainer.text_features), trainer.dist.device)
    result = {"row": row, "seed": seed, "metrics": metrics, "selected_step": selected["step"], "split":
              "val" if args.val_only else "test", "val": selected["val"], "train_means": selected["train_means"],
              "train_videos": _count_split(features, cfg.data.split), "steps": cfg.optim.steps,
              "batch_size": cfg.optim.batch_size, "wall_s": time.time() - start, "cpu_s": _own_cpu_s() - cpu,
              "config": cfg.to_dict(), "features": str(features), "code": code, "select_every": args.select_every}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    log.info("%s seed %d (step %d selected on val): %s %s (%.0f CPU s)", row, seed, selected["step"], result["split"],
             {k: round(metrics.get(k, float("nan")), 1) for k, _ in COLUMNS}, result["cpu_s"])
    return result


def _own_cpu_s() -> float:
    """User + system CPU seconds of this process (a run trains in-process: no children)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _worker_init() -> None:
    """Each worker process: logging like the parent, one torch thread (two workers fill the two cores)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def run_all(args: argparse.Namespace, features: dict[str, Path], jobs: list[tuple[str, int]], code: dict
            ) -> dict[tuple[str, int], dict]:
    """Every (row, seed) job: cached results read here, the rest trained in `--workers` spawned processes
    (each reads the prepared features itself; its result is cached as soon as it finishes, so a killed
    run resumes where it stopped). Spawned, not forked or forkserver-started, so every worker is a child
    of this process and its CPU time is counted in RUSAGE_CHILDREN once it exits."""
    done = {(row, seed): cached_result(args, features[ROWS[row][2]], row, seed, code) for row, seed in jobs}
    todo = [job for job, result in done.items() if result is None]
    if todo:
        log.info("%d of %d runs cached; training %d with %d worker process(es)", len(jobs) - len(todo), len(jobs),
                 len(todo), args.workers)
    if todo and args.workers == 0:
        for row, seed in todo:
            done[row, seed] = run_one(args, features[ROWS[row][2]], row, seed, code)
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(args.workers, len(todo)), mp_context=ctx,
                                                    initializer=_worker_init) as pool:
            futures = {pool.submit(run_one, args, features[ROWS[row][2]], row, seed, code): (row, seed)
                       for row, seed in todo}  # seed-major: an interrupted run leaves every row's first seeds
            try:
                for fut in concurrent.futures.as_completed(futures):
                    done[futures[fut]] = fut.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the running jobs finish; the rest never start
                raise
    return done


def _cell(vals: np.ndarray) -> str:
    if np.all(np.isnan(vals)):
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f} (1 seed)"
    return f"{np.nanmean(vals):.1f} ± {np.nanstd(vals, ddof=1):.1f}"


def _version(code: dict) -> str:
    return code["commit"][:10] + (f"+dirty({code['diff']})" if code["dirty"] else "")


def table(results: dict[str, list[dict]]) -> str:
    any_result = next(r for rs in results.values() for r in rs)
    m = any_result["metrics"]
    lines = ["| row | " + " | ".join(name for _, name in COLUMNS) + " | val-selected steps | code |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for row, rs in results.items():
        cells = [_cell(np.array([r["metrics"].get(key, np.nan) for r in rs], dtype=float)) for key, _ in COLUMNS]
        steps = "/".join(str(r["selected_step"]) for r in rs) + f" (seeds {','.join(str(r['seed']) for r in rs)})"
        versions = ", ".join(sorted({_version(r["code"]) for r in rs}))
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + f" | {steps} | {versions} |")
    seeds = sorted({r["seed"] for rs in results.values() for r in rs})
    cpu = sum(r.get("cpu_s", float("nan")) for rs in results.values() for r in rs)
    split = any_result.get("split", "test")
    lines.append("")
    lines.append(f"mean ± sample std over the seeds listed per row (of {seeds}); {any_result['train_videos']} training videos, model selection "
                 f"on val ({int(any_result['val']['videos'])} clips), test evaluated once per row and seed "
                 f"({int(m['videos'])} held-out clips, {int(m.get('binding_pairs', 0))} captions in twin pairs, "
                 f"{int(m.get('moment_queries', 0))} moment queries on merged sequences of random crops); "
                 f"{any_result['steps']} steps of batch {any_result['batch_size']}; training + eval CPU time "
                 f"{cpu / 60:.1f} min. Figures on **{split}**. Chance: t2v R@1 {100 / m['videos']:.0f}%, binding 50%. Moment columns "
                 "of rows without the localization head: the training-free window (frame sum) baseline; the window "
                 "(clip-encoded) columns: each candidate window encoded as one clip by the row's video encoder and "
                 "scored with its retrieval score; same queries, same decoding and metric code." + _gap(results))
    return "\n".join(lines)


def _gap(results: dict[str, list[dict]]) -> str:
    """The localization rows' moment R@1@0.7 against the stronger of the two window baselines (the best
    row mean of either among the rows without the head)."""
    def mean(rs: list[dict], key: str) -> float:
        vals = [r["metrics"].get(key, np.nan) for r in rs]
        return float(np.mean(vals)) if not np.any(np.isnan(vals)) else np.nan

    head = {row: rs for row, rs in results.items() if rs[0]["config"]["loss"]["loc_weight"] > 0}
    baselines = [(mean(rs, key), name, row) for row, rs in results.items() if row not in head
                 for key, name in (("moment_R@1_IoU0.7", "frame sum"), ("window_clip_R@1_IoU0.7", "clip-encoded"))]
    baselines = [b for b in baselines if not np.isnan(b[0])]
    if not head or not baselines:
        return ""
    value, name, row = max(baselines)
    gaps = ", ".join(f"{r} {mean(rs, 'moment_R@1_IoU0.7'):.1f} ({mean(rs, 'moment_R@1_IoU0.7') - value:+.1f})"
                     for r, rs in head.items())
    return (f" Localization head vs the stronger window baseline (moment R@1@0.7; window ({name}) of the "
            f"`{row}` row, {value:.1f}): {gaps}.")


def cpu_minutes() -> float:
    """User + system CPU time of this process and its finished children: the corpus, detector and
    extraction subprocesses and the training workers (counted once they have exited)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime) / 60


def finished(out: Path) -> dict[str, list[dict]]:
    """The results cached under `out`, by row (in ROWS order) and seed."""
    found = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*/result.json"))]
    by_row = {row: sorted((r for r in found if r["row"] == row), key=lambda r: r["seed"]) for row in ROWS}
    return {row: rs for row, rs in by_row.items() if rs}


def print_table(results: dict[str, list[dict]], out: str) -> int:
    if not results:
        print(f"no finished runs under {out}")
        return 1
    text = table(results)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "table.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    where = str(Path(args.out) / "val") if args.val_only else args.out
    if args.table_only:
        return print_table(finished(Path(where)), where)
    code = code_version()
    seeds = [int(s) for s in args.seeds.split(",")]
    features = prepare_all(args, sorted({ROWS[r][2] for r in args.rows.split(",")}))
    rows = args.rows.split(",")
    jobs = [(row, seed) for seed in seeds for row in rows]
    done = run_all(args, features, jobs, code)
    results = {row: [done[row, seed] for seed in seeds] for row in rows}
    print_table(results, where)
    print(f"\ntotal wall time {((time.time() - start) / 60):.1f} min, CPU time {cpu_minutes():.1f} min "
          f"(this process, its subprocesses and its training workers); table in {Path(where) / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
