"""`vlpcache extract`: run the extractors over a manifest and write a feature store.

Exit status: 0 when the job ran to the end (failed videos are in the ledger and the summary);
1 when the failure rate exceeds --max-failure-rate (checked as the job goes: it stops early), a shard
could not be written after its retries, or the disk is full; 2 when the job could not run (bad config,
unreadable manifest, a store made by another job, another job writing the same --out) or stopped on an
error that is a bug, not a bad video (its traceback is printed). Committed shards are always kept:
rerun the same command to resume.
"""
from __future__ import annotations

import argparse
import errno
import glob
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, apply_override, deep_merge, job_config_from_dict, load_yaml
from pipeline.manifest import ManifestError

log = logging.getLogger(__name__)

DATASETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "datasets"

# flag -> (section, key): flags are shorthands for config keys, applied after the config file.
FLAG_KEYS = {
    "manifest": ("input", "manifest"),
    "video_root": ("input", "video_root"),
    "format": ("input", "format"),
    "path_template": ("input", "path_template"),
    "out": ("run", "out"),
    "store": ("run", "store"),
    "shard_size": ("run", "shard_size"),
    "runner": ("run", "runner"),
    "ray_address": ("run", "ray_address"),
    "num_cpus": ("run", "num_cpus"),
    "batch_videos": ("run", "batch_videos"),
    "timeout": ("run", "timeout_s"),
    "max_failure_rate": ("run", "max_failure_rate"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpcache extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_argument_group("input")
    src.add_argument("--dataset", help="read configs/datasets/NAME.yaml (e.g. demo, webvid); flags override it")
    src.add_argument("--config", type=Path, help="a job config YAML (sections input, run, extractor), merged over --dataset's")
    src.add_argument("--manifest", help="CSV/JSONL manifest, WebVid CSV, a video2dataset output folder (files or "
                                        ".tar shards), a .tar, or 'DIR/*.tar'")
    src.add_argument("--video-root", help="folder that relative video paths resolve against (default: the manifest's)")
    src.add_argument("--format", choices=("auto", "generic", "webvid", "video2dataset"), help="manifest format (default auto)")
    src.add_argument("--path-template", help="WebVid: where a video sits, e.g. '{video_root}/{page_dir}/{videoid}.mp4'")
    out = p.add_argument_group("output and execution")
    out.add_argument("--out", help="output folder")
    out.add_argument("--store", choices=("zarr", "hdf5"), help="store backend (default zarr)")
    out.add_argument("--shard-size", type=int, help="videos per shard (default 1000)")
    out.add_argument("--runner", choices=("ray", "local"), help="ray (default) or local (in-process, no Ray)")
    out.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else embedded on loopback)")
    out.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    out.add_argument("--batch-videos", type=int, help="videos per forward pass (default 8)")
    out.add_argument("--timeout", type=float, help="per-video decode timeout in seconds (default 120)")
    out.add_argument("--max-failure-rate", type=float, help="stop with exit 1 once failed/done exceeds this (default 0.05)")
    out.add_argument("--retry-failed", action="store_true", help="re-attempt only the failed videos of committed shards")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    out.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override any config key, e.g. --set run.model_actors=2 --set extractor.sampling.num_frames=4")
    return p


def dataset_config(name: str) -> dict[str, Any]:
    path = DATASETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no dataset config {path}; known datasets: {known} (or pass --config FILE / --manifest)")
    return load_yaml(path)


def resolve_config(args: argparse.Namespace) -> tuple[JobConfig, dict[str, Any] | None]:
    """Config file(s), then flags, then --set; returns the config and the dataset's demo section."""
    data: dict[str, Any] = dataset_config(args.dataset) if args.dataset else {}
    if args.config:
        data = deep_merge(data, load_yaml(args.config))
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            data.setdefault(section, {})[key] = value
    if args.retry_failed:
        data.setdefault("run", {})["retry_failed"] = True
    if args.no_progress:
        data.setdefault("run", {})["progress"] = False
    for assignment in args.set:
        apply_override(data, assignment)
    demo = data.get("demo")
    return job_config_from_dict(data), demo


def ensure_inputs(config: JobConfig, demo: dict[str, Any] | None, dataset: str | None) -> None:
    """Generate the demo corpus when the dataset asks for it; otherwise say what to put where."""
    manifest = Path(config.input.manifest)
    if demo is not None:
        from pipeline.demo import corpus_kwargs, make_demo_corpus

        root = Path(config.input.video_root or manifest.parent)
        made = make_demo_corpus(root, **corpus_kwargs(demo))
        if made.resolve() != manifest.resolve():
            raise ConfigError(f"dataset demo section wrote {made}, but input.manifest is {manifest}: make them agree")
        return
    if config.input.manifest and not manifest.exists() and not glob.has_magic(manifest.name):  # a glob of .tar shards
        fix = f"point input.manifest in configs/datasets/{dataset}.yaml at it" if dataset else "fix --manifest"
        hint = (f"manifest {manifest} does not exist. Put the manifest there (or {fix}); "
                f"videos go under {config.input.video_root or manifest.parent}")
        if config.input.format == "webvid" or (dataset and "{" in config.input.path_template):
            hint += f" following the path template {config.input.path_template!r}"
        raise ConfigError(hint)
    if config.input.video_root and not Path(config.input.video_root).is_dir():
        raise ConfigError(f"video root {config.input.video_root} is not a folder: put the videos there or fix --video-root")


def summary(stats) -> str:
    lines = [
        f"extract: {stats.out} ({stats.runner} runner)",
        f"  this run: {stats.videos_ok} ok, {stats.videos_failed} failed, {stats.videos_kept} kept, "
        f"{stats.shards_done} shard(s) written, {stats.shards_skipped} already committed, {stats.shard_retries} shard retries",
        f"  time {stats.wall_s:.1f} s, {stats.videos_per_s:.2f} videos/s",
        f"  store: {stats.store_ok} ok, {stats.store_failed} failed, {stats.store_pending} pending of {stats.n_videos}",
    ]
    lines.append("  weights: " + ", ".join(
        f"{role} RANDOM ({w.split(':', 1)[1]}, allow_random_weights)" if w.startswith("random:") else f"{role} sha256 {w[:12]}"
        for role, w in stats.weights.items()))
    lines += [f"  failed: {n} x {reason}" for reason, n in stats.failed_by_reason.items()]
    if stats.exit_reason:
        lines.append(f"  ERROR: {stats.exit_reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stores import StoreError

    from pipeline.job import Job
    from pipeline.runners import JobStopped, WorkerBug

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.dataset or args.config or args.manifest):
        parser.error("give --manifest FILE --video-root DIR --out DIR, or --dataset NAME, or --config FILE")
    try:
        config, demo = resolve_config(args)
        # A manifest named on the command line is the user's own: never write a demo corpus over it.
        ensure_inputs(config, None if args.manifest else demo, args.dataset)
        stats = Job(config).run()
    except (ConfigError, ManifestError, StoreError, ValueError) as e:
        print(f"vlpcache extract: error: {e}", file=sys.stderr)
        return 2
    except WorkerBug as e:
        print(f"{e.trace.rstrip()}\nvlpcache extract: error: {e}", file=sys.stderr)
        return e.exit_code
    except JobStopped as e:
        print(f"vlpcache extract: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or config.run.out
        print(f"vlpcache extract: error: no space left on device in {config.run.out} ({e.strerror}: {where}); "
              f"free space, then rerun to resume", file=sys.stderr)
        return 1
    print(summary(stats))
    return 1 if stats.exit_reason else 0
