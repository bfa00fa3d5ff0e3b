"""`make bench-pipeline`: the extraction pipeline against its own limits, side by side in one run.

1. Sum-of-stages limit: decode, encode and store time per video, each measured alone on the corpus
   (same decoder, same model threads, same store), give 1 / (d + e + s) videos/s. The end-to-end
   steady throughput of each runner is reported as a ratio to it (goal >= 0.9).
2. Ray vs a plain in-process loop on the same corpus and config: overhead = 1 - ray / local (goal <= 10%).
3. Peak memory (RSS of the driver and every process it started, sampled) of the Ray runner as the
   corpus grows: it should stay flat, since videos in flight are bounded.

Steady throughput counts from the moment the runner is ready (models built, Ray up) to the end; the
start-up cost is reported apart, since it is paid once per job, not per video.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("pipeline.bench")

REPO = Path(__file__).resolve().parents[1]


def stage_times(config, manifest) -> dict[str, float]:
    """Seconds per video of decode, encode and store, each measured alone over the whole corpus."""
    from extractors.config import ExtractorConfig
    from pipeline.job import Job
    from pipeline.runners import model_threads
    from pipeline.work import Decoder, ModelRunner
    from stores import create_store

    job = Job(config)
    tasks = [t for t in job.rows_and_tasks(0, len(job.manifest))[1] if t is not None]
    extractor = ExtractorConfig.from_dict(config.extractor)
    decoder = Decoder(extractor.sampling, config.run.timeout_s, extractor.regions.kind == "given")
    decoder(tasks[0])  # start the decoder's child process outside the timing, as a long job would
    t = time.perf_counter()
    decoded = [decoder(task)[1] for task in tasks]
    decode = time.perf_counter() - t
    if any(d is None for d in decoded):
        raise RuntimeError("a bench video failed to decode; regenerate the bench corpus")
    model = ModelRunner(config.extractor, config.run.device, model_threads(config.run))
    B = config.run.batch_videos
    model(decoded[:1])  # warm-up: first-call allocations are start-up, not per-video cost
    t = time.perf_counter()
    encoded = [model(decoded[i : i + B]) for i in range(0, len(decoded), B)]
    encode = time.perf_counter() - t
    arrays = [a for e in encoded for a in e.arrays]
    Path(config.run.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.run.out) as tmp:
        t = time.perf_counter()
        store = create_store(tmp, config.run.store, dims=model.dims, n_videos=len(arrays),
                             shard_size=config.run.shard_size, provenance={"bench": True}, compression=config.run.compression)
        for shard in range(store.n_shards):
            writer = store.shard_writer(shard)
            for row in writer.rows:
                writer.put(row, tasks[row].video_id, "caption", arrays[row])
            writer.commit()
        store_s = time.perf_counter() - t
    n = len(tasks)
    return {"decode_s": decode / n, "encode_s": encode / n, "store_s": store_s / n}


def end_to_end(config) -> dict[str, float]:
    from pipeline.job import Job

    ready = {}
    start = time.perf_counter()
    stats = Job(config).run(on_runner_ready=lambda runner: ready.setdefault("t", time.perf_counter()))
    end = start + stats.wall_s
    n = stats.videos_ok + stats.videos_failed
    if stats.videos_failed or stats.exit_reason:
        raise RuntimeError(f"bench run had failures: {stats.failed_by_reason} {stats.exit_reason}")
    return {"videos": n, "startup_s": ready["t"] - start, "steady_s": end - ready["t"],
            "videos_per_s": n / (end - ready["t"]), "wall_s": stats.wall_s}


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants every 0.1 s; `peak` in bytes."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def repeated_manifest(src: Path, n: int, dst: Path) -> Path:
    """n rows cycling over the corpus's videos, each under its own id: a big corpus at no encoding cost."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    root = src.parent
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video_id", "path", "caption"])
        w.writeheader()
        for i in range(n):
            r = rows[i % len(rows)]
            w.writerow({"video_id": f"bench{i:07d}", "path": str(root / r["path"]), "caption": r["caption"]})
    return dst


def memory_scaling(manifest: Path, out: Path, sizes: list[int], extractor: dict, run: dict) -> list[dict[str, Any]]:
    """Peak RSS of a Ray extraction (driver + everything it starts) per corpus size, each a fresh process."""
    results = []
    for n in sizes:
        m = repeated_manifest(manifest, n, out / f"manifest-{n}.csv")
        cfg = out / f"mem-{n}.yaml"
        cfg.write_text(yaml.safe_dump({"input": {"manifest": str(m)}, "run": {**run, "out": str(out / f"mem-{n}")},
                                       "extractor": extractor}))
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--config", str(cfg), "--no-progress"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        sampler = PeakRSS(proc.pid)
        t = time.perf_counter()
        _, err = proc.communicate()
        peak = sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"memory run with {n} videos failed: {err[-2000:]}")
        results.append({"videos": n, "peak_rss_mib": round(peak / 2**20, 1), "wall_s": round(time.perf_counter() - t, 1)})
        log.info("memory: %d videos -> peak %.0f MiB", n, peak / 2**20)
    return results


def job_config(dataset: dict, manifest: Path, out: Path, runner: str, overrides: list[str]):
    from pipeline.config import apply_override, job_config_from_dict

    data = copy.deepcopy(dataset)
    data.pop("demo", None)
    data["input"] = {"manifest": str(manifest), "video_root": str(manifest.parent)}
    data.setdefault("run", {}).update({"out": str(out), "runner": runner, "progress": False})
    for o in overrides:
        apply_override(data, o)
    return job_config_from_dict(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="demo", help="configs/datasets/NAME.yaml: the extractor and run settings (default demo)")
    p.add_argument("--videos", type=int, default=32, help="demo corpus size for the throughput runs (default 32)")
    p.add_argument("--memory-sizes", default="64,256,1024", help="corpus sizes of the memory runs (default 64,256,1024)")
    p.add_argument("--memory-extractor", default="tiny", choices=("tiny", "dataset"),
                   help="extractor of the memory runs: 'tiny' (small EfficientNet + grid: fast, many videos) or the dataset's")
    p.add_argument("--out", type=Path, default=REPO / "data" / "bench" / "pipeline", help="work folder and report")
    p.add_argument("--set", action="append", default=[], help="config override for every run, e.g. run.batch_videos=4")
    return p.parse_args(argv)


TINY_CONFIG = REPO / "configs" / "extract" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_yaml
    from pipeline.demo import make_demo_corpus
    from pipeline.extract import dataset_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pipeline.job", "pipeline.manifest", "stores.writer", "pipeline.shard"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    dataset = dataset_config(args.dataset)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    manifest = make_demo_corpus(args.out / "corpus", videos=args.videos, seed=1)
    report: dict[str, Any] = {"dataset": args.dataset, "videos": args.videos, "cpus": os.cpu_count(), "overrides": args.set}

    log.info("stages alone on %d videos", args.videos)
    report["stages_s_per_video"] = stage_times(job_config(dataset, manifest, args.out / "stages", "local", args.set), manifest)
    limit = 1.0 / sum(report["stages_s_per_video"].values())
    report["sum_of_stages_limit_videos_per_s"] = limit
    for runner in ("local", "ray"):
        log.info("end to end: %s runner", runner)
        e2e = end_to_end(job_config(dataset, manifest, args.out / runner, runner, args.set))
        e2e["ratio_to_limit"] = e2e["videos_per_s"] / limit
        report[runner] = e2e
    report["ray_overhead_vs_local"] = 1.0 - report["ray"]["videos_per_s"] / report["local"]["videos_per_s"]

    sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    extractor = load_yaml(TINY_CONFIG)["extractor"] if args.memory_extractor == "tiny" else dataset.get("extractor", {})
    run = {**dataset.get("run", {}), "runner": "ray"}
    run.pop("out", None)
    report["memory"] = memory_scaling(manifest, args.out, sizes, extractor, run)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


def render(r: dict[str, Any]) -> str:
    s = r["stages_s_per_video"]
    lines = [
        f"pipeline bench: dataset {r['dataset']}, {r['videos']} videos, {r['cpus']} CPUs, overrides {r['overrides']}",
        f"  stages alone (s/video): decode {s['decode_s']:.4f}  encode {s['encode_s']:.4f}  store {s['store_s']:.4f}",
        f"  sum-of-stages limit: {r['sum_of_stages_limit_videos_per_s']:.3f} videos/s",
    ]
    for runner in ("local", "ray"):
        e = r[runner]
        lines.append(f"  {runner:5s}: {e['videos_per_s']:.3f} videos/s steady = {e['ratio_to_limit']:.2f} x limit "
                     f"(goal >= 0.9); start-up {e['startup_s']:.1f} s, wall {e['wall_s']:.1f} s")
    lines.append(f"  ray overhead vs in-process loop: {100 * r['ray_overhead_vs_local']:.1f}% (goal <= 10%; negative = faster)")
    mem = ", ".join(f"{m['videos']} videos: {m['peak_rss_mib']:.0f} MiB" for m in r["memory"])
    lines.append(f"  peak RSS of the Ray job (driver + Ray processes): {mem}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
