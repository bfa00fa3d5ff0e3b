"""Shared helpers of the pipeline tests: a cheap real extractor config, job configs, store comparison,
and subprocess runs of the real CLI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import job_config_from_dict

REPO = Path(__file__).resolve().parents[1]

# A real, seeded EfficientNet-Lite0 at a small input size; the "grid" regions are RoI-pooled from the
# same trunk. Cheap enough for many runs on 2 cores, and still a real forward pass per frame.
TINY_EXTRACTOR = {
    "sampling": {"num_frames": 4},
    "frame_encoder": {"model": "efficientnet_lite0", "input_size": 64, "weights": ""},
    "regions": {"kind": "grid", "backbone": "frame_encoder", "trunk_weights": "", "region_input_size": 64,
                "grid_size": 2, "max_boxes": 4, "min_boxes": 0},
}


def tiny_sets() -> list[str]:
    """TINY_EXTRACTOR as --set arguments for the CLI."""
    out = []
    for section, values in TINY_EXTRACTOR.items():
        for key, value in values.items():
            out += ["--set", f"extractor.{section}.{key}={value if value != '' else chr(39) * 2}"]
    return out


def job_config(manifest, out, video_root=None, extractor=None, **run):
    run = {"out": str(out), "shard_size": 4, "batch_videos": 2, "max_inflight_videos": 4, "progress": False, **run}
    data = {"input": {"manifest": str(manifest), "video_root": str(video_root or "")},
            "run": run, "extractor": extractor or TINY_EXTRACTOR}
    return job_config_from_dict(data)


def snapshot(out) -> dict:
    """Every ok video's arrays and caption, and every row's status and error: what 'identical' means."""
    from stores import open_store

    reader = open_store(out)
    videos = {v: reader[v] for v in reader.video_ids}
    status = reader.status
    return {"videos": videos, "failures": sorted(status.failures), "counts": (status.ok, status.failed, status.pending)}


def assert_same_store(a, b) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa["counts"] == sb["counts"], (sa["counts"], sb["counts"])
    assert sa["failures"] == sb["failures"]
    assert list(sa["videos"]) == list(sb["videos"])
    for vid, arrays in sa["videos"].items():
        for name, value in arrays.items():
            other = sb["videos"][vid][name]
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and np.array_equal(value, other), f"{vid}/{name} differs"
            else:
                assert value == other, f"{vid}/{name} differs"


def cli(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` to the end."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_cli(*args, log: Path) -> subprocess.Popen:
    """Start `python -m pipeline ARGS` in its own process group (so that what it spawns can be reaped)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever of its process group survives it (an embedded Ray's agents)."""
    for target in (lambda: os.kill(proc.pid, signal.SIGKILL), lambda: os.killpg(proc.pid, signal.SIGKILL)):
        try:
            target()
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited (rc {proc.returncode}) before: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.05)


def ledgers(out) -> list[str]:
    d = Path(out) / "ledgers"
    return sorted(p.name for p in d.glob("shard-*.json")) if d.exists() else []


def partials(out) -> list[str]:
    d = Path(out) / ".partial"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def copy_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
