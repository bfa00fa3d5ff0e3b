"""The extract driver at WebVid scale: peak RSS while it plans an N-row manifest, and the bytes of each
shard task, for this code and, side by side in the same run, for the code before the streaming driver.

Planning = what `Job.run` does before the first shard runs: read the manifest, create the store
(tiny dims: the store side is not what is measured here), find the pending shards, and build every
shard's job (each is pickled, as Ray pickles it, to measure its bytes). No model is built. Each
measurement runs in a fresh Python process, so its peak RSS (ru_maxrss) is its own. Times are the
process's CPU seconds (time.process_time): on a shared machine wall time measures the neighbours.

The previous code is commit BASELINE_COMMIT's pipeline/ package (`git archive`), imported ahead of this
checkout's, so it plans against the same stores/ and extractors/ code.

    python -m pipeline.bench_scale --rows 1000000        # make bench-scale runs it after the store bench
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("pipeline.bench_scale")

REPO = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "4cdfc47"  # main before the streaming driver (issue 9)
PROJECT_TO = 10_000_000
WEBVID_HEADER = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]  # results_2M_*.csv
_WORDS = ("aerial view of a beach at sunset slow motion close up young woman smiling city traffic night "
          "timelapse clouds over mountains happy family walking in the park business man typing on laptop").split()

# Runs in a fresh interpreter, against whichever `pipeline` package is first on sys.path: the current
# one (plans lazily: shard_jobs) or the baseline (one list of every ShardJob: _pending_jobs).
_CHILD = r"""
import json, pickle, resource, sys, time
from pipeline.config import job_config_from_dict
from pipeline.job import Job, RunStats
from stores.schema import Dims

manifest, out, shard_size, extractor = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def plan(manifest, out):
    config = job_config_from_dict({"input": {"manifest": manifest}, "extractor": extractor,
                                   "run": {"out": out, "shard_size": shard_size, "runner": "local", "progress": False}})
    return Job(config)
# Warm-up: plan a 2-row copy first, so that what any plan imports or caches once is in the baseline RSS.
with open(manifest, encoding="utf-8") as f:
    head = [next(f) for _ in range(3)]
with open(out + "-warm.csv", "w", encoding="utf-8") as f:
    f.writelines(head)
warm = plan(out + "-warm.csv", out + "-warm")
if hasattr(warm, "shard_jobs"):
    list(warm.shard_jobs(warm._pending_shards(warm._open_store(Dims(T=2, K=2, Df=4, Dr=4)), RunStats("", "", "")),
                         warm._open_store(Dims(T=2, K=2, Df=4, Dr=4))))
else:
    warm._pending_jobs(warm._store_args(Dims(T=2, K=2, Df=4, Dr=4)), RunStats("", "", ""))
del warm
rss = {"imports": rss_mb()}
t = start = time.process_time()
secs = {}
def phase(name):
    global t
    rss[name], secs[name] = rss_mb(), time.process_time() - t
    t = time.process_time()
job = plan(manifest, out)
phase("manifest")
dims = Dims(T=2, K=2, Df=4, Dr=4)
stats = RunStats(out, "local", "")
sizes = []
if hasattr(job, "shard_jobs"):  # streaming driver: each job built when taken, pickled, dropped
    store = job._open_store(dims)
    phase("store")
    todo = job._pending_shards(store, stats)
    for shard_job in job.shard_jobs(todo, store):
        sizes.append(len(pickle.dumps(shard_job, protocol=5)))
else:  # baseline: every job in one list; pickling each of them (~identical) would take minutes: sample
    args = job._store_args(dims)
    phase("store")
    jobs = job._pending_jobs(args, stats)
    for shard_job in jobs[:3] + jobs[-1:]:
        sizes.append(len(pickle.dumps(shard_job, protocol=5)))
phase("jobs")
print(json.dumps({"plan_s": time.process_time() - start, "phase_s": secs, "base_rss_mb": rss["imports"],
                  "peak_rss_mb": rss_mb(), "rss_after_mb": rss, "task_bytes_max": max(sizes), "task_bytes_mean": sum(sizes) / len(sizes),
                  "tasks_pickled": len(sizes), "shards": stats.shards_total}))
"""


def write_webvid_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A WebVid results_2M-style CSV: ids, captions of 5-15 words, page dirs, ISO durations, URLs."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(WEBVID_HEADER)
        for i in range(rows):
            vid = 1_000_000 + i * 7
            page = i // 50 * 50
            caption = " ".join(rng.choices(_WORDS, k=rng.randint(5, 15))).capitalize()
            w.writerow([vid, caption, i % 50, f"{page:06d}_{page + 49:06d}", f"PT00H00M{rng.randint(5, 59):02d}S",
                        f"https://ak.picdn.net/shutterstock/videos/{vid}/preview/stock-footage-{vid}.mp4"])
    return path


def baseline_tree(dest: Path) -> Path:
    """The baseline commit's pipeline/ package, extracted under dest."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE_COMMIT, "pipeline"], capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {BASELINE_COMMIT} failed ({archive.stderr.decode().strip()}): the baseline "
                           "needs a git clone with history; pass --no-baseline to measure this code alone")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def measure(manifest: Path, out: Path, shard_size: int, pythonpath: list[Path]) -> dict:
    from pipeline.config import load_yaml

    extractor = load_yaml(REPO / "configs" / "extract" / "tiny.yaml")["extractor"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    for old in (out, Path(f"{out}-warm")):
        shutil.rmtree(old, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(manifest), str(out), str(shard_size), json.dumps(extractor)],
                          capture_output=True, text=True, env=env, cwd=out.parent)  # not REPO: "-c" puts the cwd first on sys.path
    if proc.returncode != 0:
        raise RuntimeError(f"planning run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def projected(figures: dict, rows: int) -> dict:
    """Linear projection to PROJECT_TO rows: the start-up RSS stays, what planning added scales."""
    scale = PROJECT_TO / rows
    return {"peak_rss_mb": figures["base_rss_mb"] + (figures["peak_rss_mb"] - figures["base_rss_mb"]) * scale,
            "task_bytes_max": figures["task_bytes_max"]
            * (1 if figures.get("bounded_tasks") else scale), "plan_s": figures["plan_s"] * scale}


def run(rows: int, shard_size: int, work: Path, baseline: bool) -> dict:
    manifest = write_webvid_csv(work / "manifest.csv", rows)
    report = {"rows": rows, "shard_size": shard_size, "manifest_mb": manifest.stat().st_size / 2**20, "runs": {}}
    variants = {"streaming": [REPO]}
    if baseline:
        variants[f"baseline {BASELINE_COMMIT}"] = [baseline_tree(work / "baseline"), REPO]
    for name, path in variants.items():
        figures = measure(manifest, work / "out", shard_size, path)
        # A streaming task holds one shard's rows: its size does not grow with the manifest.
        figures["bounded_tasks"] = name == "streaming"
        figures["projected_10M"] = projected(figures, rows)
        report["runs"][name] = figures
        log.info("%s: %s", name, figures)
    return report


def table(report: dict) -> str:
    """Peak RSS split by planning phase (each phase's growth of the peak): reading the manifest (the
    driver's part), creating the store with the ids (the store's part), building every shard job."""
    lines = [f"extract driver planning a {report['rows']:,}-row WebVid CSV ({report['manifest_mb']:.0f} MB), "
             f"{report['shard_size']} videos per shard; → = linear projection to {PROJECT_TO:,} rows",
             "| | peak RSS MB (→10M) | after a 2-row warm-up plan | + manifest | + create store | + shard jobs | "
             "bytes per shard task (→10M) | CPU s: manifest / store / jobs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in report["runs"].items():
        p, rss, secs = f["projected_10M"], f["rss_after_mb"], f["phase_s"]
        grow = {k: rss[k] - rss[prev] for prev, k in zip(("imports", "manifest", "store"), ("manifest", "store", "jobs"))}
        lines.append(f"| {name} | {f['peak_rss_mb']:.0f} ({p['peak_rss_mb']:.0f}) | {rss['imports']:.0f} | "
                     f"{grow['manifest']:.0f} | {grow['store']:.0f} | {grow['jobs']:.0f} | "
                     f"{f['task_bytes_max']:,.0f} ({p['task_bytes_max']:,.0f}) | "
                     f"{secs['manifest']:.1f} / {secs['store']:.1f} / {secs['jobs']:.1f} |")
    runs = list(report["runs"].values())
    if len(runs) == 2:
        new, old = runs
        own = {name: f["rss_after_mb"]["manifest"] - f["rss_after_mb"]["imports"] + f["rss_after_mb"]["jobs"]
               - f["rss_after_mb"]["store"] for name, f in report["runs"].items()}
        new_own, old_own = own.values()
        lines.append(f"baseline / streaming: peak RSS {old['projected_10M']['peak_rss_mb'] / new['projected_10M']['peak_rss_mb']:.1f}× "
                     f"at 10M; the driver's own planning memory (manifest + jobs) {old_own:.0f} / {max(new_own, 1):.0f} MB = "
                     f"{old_own / max(new_own, 1):.0f}×; task bytes at 10M "
                     f"{old['projected_10M']['task_bytes_max'] / new['projected_10M']['task_bytes_max']:.0f}×")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="manifest rows (default 1,000,000)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--report", type=Path, default=REPO / "data" / "bench" / "scale" / "driver.json")
    p.add_argument("--no-baseline", action="store_true", help="measure this code only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        report = run(args.rows, args.shard_size, Path(tmp), baseline=not args.no_baseline)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
