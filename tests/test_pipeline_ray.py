"""The extraction job on Ray: equal to the in-process runner bit for bit, surviving a killed worker,
a driver killed with kill -9, and spread over a two-node cluster on loopback."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from _pipeline_helpers import (TINY_EXTRACTOR, assert_same_store, cli, job_config, kill_group, kill_mid_shard, ledgers,
                               partials, start_cli, start_worker_node, tiny_sets, wait_for)
from _faults_table import check_recovered
from pipeline.job import Job


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray on loopback for the in-process tests of this module."""
    from pipeline.runners import ray_init

    ray_init("", 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(demo_corpus, tmp_path_factory):
    """The uninterrupted in-process run every Ray result must equal."""
    out = tmp_path_factory.mktemp("ref") / "out"
    stats = Job(job_config(demo_corpus["manifest"], out, runner="local")).run()
    assert stats.videos_ok == len(demo_corpus["rows"]) and stats.exit_reason == ""
    return out


def test_ray_equals_in_process_bitwise(ray_local, demo_corpus, reference, tmp_path):
    stats = Job(job_config(demo_corpus["manifest"], tmp_path / "out", runner="ray", concurrent_shards=2)).run()
    assert stats.shards_done == 3 and stats.shard_retries == 0 and stats.exit_reason == ""
    assert stats.times["encode_s"] > 0 and stats.times["decode_s"] > 0
    assert_same_store(reference, tmp_path / "out")


def _wait_busy(pid: int, timeout: float) -> None:
    """Until process `pid` burns CPU (> 50% over 0.1 s): a model actor in the middle of a forward pass."""
    import psutil

    proc, deadline = psutil.Process(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(proc.cpu_times()[:2])
        time.sleep(0.1)
        if sum(proc.cpu_times()[:2]) - before > 0.05:
            return
    raise AssertionError(f"model actor {pid} never got busy within {timeout} s")


@pytest.mark.slow  # heavy: `make test-slow`
def test_model_actor_killed_mid_shard_is_retried(ray_local, demo_corpus, tmp_path):
    """The batch the actor was running is retried whole on its replacement: same bits, no shard retry."""
    out = tmp_path / "out"
    killed = []

    def kill_when_encoding(runner):
        def killer():
            pid = runner.actor_pids()[0]
            wait_for(lambda: partials(out), 120, "a shard writer to open")
            _wait_busy(pid, 120)  # killed mid-forward, its in-flight call fails: the batch must be retried
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        threading.Thread(target=killer, daemon=True).start()

    # Frames at 192 px: forward passes long enough (~0.5 s a batch) for the kill to land inside one.
    heavier = copy.deepcopy(TINY_EXTRACTOR)
    heavier["frame_encoder"]["input_size"] = heavier["regions"]["region_input_size"] = 192
    Job(job_config(demo_corpus["manifest"], tmp_path / "ref", extractor=heavier, runner="local")).run()
    cfg = job_config(demo_corpus["manifest"], out, extractor=heavier, runner="ray", concurrent_shards=1, shard_retries=3)
    stats = Job(cfg).run(on_runner_ready=kill_when_encoding)
    assert killed, "the model actor was never killed"
    assert stats.shard_retries == 0 and not stats.shards_failed and stats.videos_failed == 0
    check_recovered("kill -9 of the model actor mid-forward", tmp_path / "ref", out, note="batch retried whole")


def _shard_writer_pid() -> int | None:
    """A Ray worker of ours (a descendant of this process) now running a shard's writer task."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "_shard_task" in " ".join(p.cmdline()):
                return p.pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_shard_writer_killed_mid_shard_is_retried(ray_local, demo_corpus, reference, tmp_path):
    out = tmp_path / "out"
    killed = []

    kill_writer = kill_mid_shard(out, _shard_writer_pid, "a shard writer task mid-shard", killed)
    cfg = job_config(demo_corpus["manifest"], out, runner="ray", concurrent_shards=1, shard_retries=3)
    stats = Job(cfg).run(on_runner_ready=kill_writer)
    assert killed and stats.shard_retries >= 1 and not stats.shards_failed
    check_recovered("kill -9 of a shard writer", reference, out, note="shard retried")


@pytest.mark.slow  # heavy: `make test-slow`
def test_driver_killed_then_rerun_equals_uninterrupted(demo_corpus, reference, tmp_path):
    """kill -9 of the driver (with its embedded Ray) once a shard is committed; the rerun completes it."""
    out = tmp_path / "out"
    args = ["extract", "--manifest", demo_corpus["manifest"], "--out", out, "--shard-size", 4, "--batch-videos", 2,
            "--set", "run.max_inflight_videos=4", "--no-progress", *tiny_sets()]
    proc = start_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: ledgers(out), 180, "the first shard commit", proc)
    finally:
        kill_group(proc)
    assert len(ledgers(out)) < 3, "the run finished before the kill; nothing was interrupted"
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_recovered("kill -9 driver after the first commit (ray)", reference, out, note="rerun")
    assert not partials(out)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["store_created", "first_partial", "first_commit", "second_commit"])
@pytest.mark.parametrize("runner", ["ray", "local"])
def test_driver_kill_sweep(demo_corpus, reference, tmp_path, point, runner):
    out = tmp_path / "out"
    args = ["extract", "--manifest", demo_corpus["manifest"], "--out", out, "--shard-size", 4, "--batch-videos", 2,
            "--runner", runner, "--set", "run.max_inflight_videos=4", "--no-progress", *tiny_sets()]
    reached = {
        "store_created": lambda: (out / "store.json").exists(),
        "first_partial": lambda: bool(partials(out)),
        "first_commit": lambda: len(ledgers(out)) >= 1,
        "second_commit": lambda: len(ledgers(out)) >= 2,
    }[point]
    proc = start_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for(reached, 180, point, proc)
    finally:
        kill_group(proc)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_recovered(f"kill -9 driver at {point} ({runner})", reference, out, note="rerun")


def _kill_group(pgid: int) -> None:
    """Stop a Ray node we started: every process of its process group, by that group only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


@pytest.mark.slow  # heavy: `make test-slow`
def test_two_node_cluster_on_loopback(demo_corpus, reference, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = f"/tmp/vlpr-{uuid.uuid4().hex[:8]}"  # short: Ray's unix socket paths must stay < 108 chars
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    groups = []
    try:
        # `ray start` leaves its daemons in its own process group: that group is what we stop after.
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                                 f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={temp_dir}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        groups.append(head.pid)
        head_log = head.communicate(timeout=120)[0]
        assert head.returncode == 0, head_log[-2000:]
        node = start_worker_node(f"127.0.0.1:{port}", temp_dir, env)
        groups.append(node.pid)
        out = tmp_path / "out"
        # One CPU per node: the model actor holds one node's CPU, so every decode task runs on the other node.
        result = cli("extract", "--manifest", demo_corpus["manifest"], "--out", out, "--ray-address",
                     f"127.0.0.1:{port}", "--shard-size", 4, "--batch-videos", 2, "--set", "run.max_inflight_videos=4",
                     "--no-progress", *tiny_sets(), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_store(reference, out)
        nodes = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', "
                                "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
    finally:
        for pgid in reversed(groups):
            _kill_group(pgid)
