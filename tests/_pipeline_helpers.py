"""Shared helpers of the pipeline tests: a cheap real extractor config, job configs, store comparison,
and subprocess runs of the real CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.config import job_config_from_dict, load_yaml

REPO = Path(__file__).resolve().parents[1]

# configs/extract/tiny.yaml: a real, seeded EfficientNet-Lite0 at a small input size; the "grid" regions
# are RoI-pooled from the same trunk. Cheap enough for many runs on 2 cores, still a real forward pass.
TINY_EXTRACTOR = load_yaml(REPO / "configs" / "extract" / "tiny.yaml")["extractor"]


def tiny_sets() -> list[str]:
    """TINY_EXTRACTOR for the CLI."""
    return ["--config", str(REPO / "configs" / "extract" / "tiny.yaml")]


def job_config(manifest, out, video_root=None, extractor=None, **run):
    # max_failure_rate 1.0: these jobs test other things, several on corpora made of bad videos
    run = {"out": str(out), "shard_size": 4, "batch_videos": 2, "max_inflight_videos": 4, "progress": False,
           "max_failure_rate": 1.0, **run}
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


def start_worker_node(gcs_address: str, temp_dir: str, env: dict) -> subprocess.Popen:
    """A second Ray node on loopback, in its own process group (the caller kills the group).

    `ray start --address` cannot do this: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (needed to keep every
    listener on 127.0.0.1) it refuses to start a worker node, and with it on it rewrites 127.0.0.1 to the
    machine's address and binds every interface. This runs the same ray._private.node.Node that
    `ray start --address` constructs, with the loopback settings."""
    proc = subprocess.Popen([sys.executable, __file__, "worker-node", gcs_address, temp_dir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if "node started" not in line:
        proc.kill()
        raise AssertionError(f"worker node did not start: {line}{proc.stdout.read()[-2000:]}")
    return proc


def _worker_node_main(gcs_address: str, temp_dir: str) -> None:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=1, temp_dir=temp_dir)
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("node started", flush=True)
    time.sleep(3600)


if __name__ == "__main__" and sys.argv[1:2] == ["worker-node"]:
    _worker_node_main(sys.argv[2], sys.argv[3])


def kill_mid_shard(out: Path, find_pid, what: str, killed: list[int]):
    """An `on_runner_ready` hook: once a shard is partly written and `find_pid()` names a process, SIGKILL it
    (from a thread, so the job keeps running) and append its pid to `killed`."""
    def hook(runner) -> None:
        def killer() -> None:
            wait_for(lambda: partials(out) and find_pid(), 120, what)
            pid = find_pid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        threading.Thread(target=killer, daemon=True).start()

    return hook
