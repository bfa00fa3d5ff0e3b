"""The fault suite, fast part (the rest is marked slow, most of it in tests/test_faults_slow.py; all of it,
with the table of faults: `make test-faults`).

Real faults on real processes: a model actor that segfaults on one video, an EIO from the kernel, a
bug raised inside a model, a full tmpfs, a second job on one --out, a Ray at another address. Each
recovered store is compared bit for bit with an uninterrupted run and verified (tests/_faults_table.py).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _fault_regions import magenta_video
from _faults_table import check_recovered, record
from _pipeline_helpers import REPO, TINY_EXTRACTOR, cli, job_config, ledgers, partials, tiny_sets
from pipeline.job import Job
from stores import open_store

PLUGINS = REPO / "tests" / "_fault_regions.py"


def plugin_extractor(name: str) -> dict:
    extractor = copy.deepcopy(TINY_EXTRACTOR)
    extractor["regions"]["plugin"] = f"{PLUGINS}:{name}"
    return extractor


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video_id", "path", "caption"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("video_id", "path", "caption")} for r in rows)
    return path


@pytest.fixture(scope="module")
def marked_corpus(demo_corpus, tmp_path_factory):
    """7 demo videos with a magenta one at row 5 (shard 1 of shards of 4, batched with row 4), and the
    same manifest with that row's file missing: its batch-mate is then encoded alone, as isolation does."""
    root = tmp_path_factory.mktemp("marked")
    shutil.copytree(demo_corpus["root"] / "videos", root / "videos")
    magenta_video(root / "videos" / "marked.mp4")
    rows = demo_corpus["rows"][:7]
    rows = rows[:5] + [{"video_id": "marked", "path": "videos/marked.mp4", "caption": "a magenta screen"}] + rows[5:]
    missing = [dict(r, path="videos/absent.mp4") if r["video_id"] == "marked" else r for r in rows]
    return {"root": root, "manifest": write_manifest(root / "manifest.csv", rows),
            "without": write_manifest(root / "without.csv", missing)}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.runners import ray_init

    ray_init("", 2)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)  # three actor restarts, each building the models again
def test_poison_video_is_isolated_and_named(ray_local, marked_corpus, tmp_path):
    """A video whose forward pass segfaults the model actor: its batch is retried, then its videos one by
    one; it alone is recorded failed with the signal, the shard commits, the job goes on."""
    extractor = plugin_extractor("segfault")
    Job(job_config(marked_corpus["without"], tmp_path / "ref", extractor=extractor, runner="local")).run()
    stats = Job(job_config(marked_corpus["manifest"], tmp_path / "out", extractor=extractor, runner="ray",
                           concurrent_shards=2)).run()
    assert stats.exit_reason == "" and stats.shard_retries == 0 and not stats.shards_failed
    errors = dict(open_store(tmp_path / "out").status.failures)
    assert errors == {"marked": "model worker crashed: Segmentation fault"}
    check_recovered("poison video (actor segfault)", tmp_path / "ref", tmp_path / "out", same_failures=False,
                    note="recorded failed: model worker crashed: Segmentation fault")


@pytest.mark.slow  # four model processes start (about 10 s of CPU each)
def test_poison_video_on_the_local_runner_is_isolated_and_named(marked_corpus, tmp_path):
    """The local runner's models run in a child process: a segfault there kills the child, not the job;
    the batch is retried, then its videos one by one; the culprit alone is recorded failed."""
    extractor = plugin_extractor("segfault")
    Job(job_config(marked_corpus["without"], tmp_path / "ref", extractor=extractor, runner="local")).run()
    stats = Job(job_config(marked_corpus["manifest"], tmp_path / "out", extractor=extractor, runner="local")).run()
    assert stats.exit_reason == "" and stats.shard_retries == 0 and not stats.shards_failed
    errors = dict(open_store(tmp_path / "out").status.failures)
    assert errors == {"marked": "model worker crashed: Segmentation fault"}
    check_recovered("poison video, local runner (model process segfault)", tmp_path / "ref", tmp_path / "out",
                    same_failures=False, note="recorded failed: model worker crashed: Segmentation fault")


def test_a_bug_in_the_decoder_process_stops_the_job_and_a_bad_video_is_recorded(demo_corpus, tmp_path):
    """Inside the decode child, an exception that no decoder raises is ours: DecoderBug, which stops the
    job (WorkerBug, exit 2) with the child's traceback; a file that is no video is a recorded failure."""
    import dataclasses

    from extractors.config import SamplingConfig
    from extractors.decode import DecoderBug
    from pipeline.runners import WorkerBug, check_shard_error
    from pipeline.work import Decoder, VideoTask

    video = str(demo_corpus["root"] / demo_corpus["rows"][0]["path"])
    sampling = SamplingConfig(num_frames=4)
    decoder = Decoder(sampling, timeout_s=60, need_boxes=False)
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    status, decoded = decoder(VideoTask(0, "notes", str(tmp_path / "notes.mp4")))
    assert decoded is None and status.error.startswith("decode: ") and "InvalidDataError" in status.error
    broken = Decoder(dataclasses.replace(sampling), timeout_s=60, need_boxes=False)
    object.__setattr__(broken.sampling, "buffer_mb", None)  # a bug of ours, met only inside the child
    with pytest.raises(DecoderBug) as info:
        broken(VideoTask(1, "ok-video", video))
    message = str(info.value)
    assert message.startswith("TypeError: unsupported operand type(s) for *: 'NoneType' and 'int'")
    assert "traceback in the decoder process" in message and "in _index" in message
    with pytest.raises(WorkerBug, match="a shard worker raised DecoderBug: TypeError"):
        check_shard_error(info.value, str(tmp_path))
    assert decoder(VideoTask(2, "ok-video", video))[0].error is None  # the decoder process goes on
    record("bug in our code (TypeError in the decode process)", True, "DecoderBug: exit 2 with the child's traceback")


def test_transient_io_errors_are_retried_with_backoff(demo_corpus, tmp_path, caplog):
    """EIO from the kernel (/proc/self/mem at offset 0): retried; a link repaired between two attempts
    decodes ok, one that stays broken is recorded failed after the retries."""
    rows = [dict(r) for r in demo_corpus["rows"][:4]]
    for name in ("flaky", "broken"):
        (tmp_path / f"{name}.mp4").symlink_to("/proc/self/mem")
    rows[1] = dict(rows[1], video_id="flaky", path=str(tmp_path / "flaky.mp4"))
    rows[2] = dict(rows[2], video_id="broken", path=str(tmp_path / "broken.mp4"))
    good = demo_corpus["root"] / demo_corpus["rows"][1]["path"]

    class Repair(logging.Handler):  # the file system recovers after the first failed read of "flaky"
        def emit(self, record):
            if "flaky" in record.getMessage() and (tmp_path / "flaky.mp4").is_symlink():
                (tmp_path / "flaky.mp4").unlink()
                shutil.copy(good, tmp_path / "flaky.mp4")

    logging.getLogger("pipeline.work").addHandler(handler := Repair())
    try:
        stats = Job(job_config(write_manifest(tmp_path / "m.csv", rows), tmp_path / "out", video_root=demo_corpus["root"],
                               runner="local", io_retries=2, io_backoff_s=0.05)).run()
    finally:
        logging.getLogger("pipeline.work").removeHandler(handler)
    errors = dict(open_store(tmp_path / "out").status.failures)
    assert stats.videos_ok == 3 and list(errors) == ["broken"]
    assert errors["broken"].startswith("decode: I/O error after 3 attempts:") and "Input/output error" in errors["broken"]
    assert sum("transient EIO" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records) == 2


def test_a_bug_stops_the_job_with_its_traceback(marked_corpus, tmp_path, capsys):
    """An exception that is no decode or model-input error: exit 2 with the traceback; the shard before
    it stays committed, and no failure is written to the ledger."""
    from pipeline.extract import main as extract_main

    out = tmp_path / "out"
    args = ["--manifest", marked_corpus["manifest"], "--out", out, "--runner", "local", "--shard-size", 4,
            "--batch-videos", 2, "--set", "run.max_inflight_videos=4", "--no-progress", "--config",
            REPO / "configs" / "extract" / "tiny.yaml", "--set", f"extractor.regions.plugin={PLUGINS}:bug"]
    assert extract_main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: unsupported operand (injected bug)" in err
    assert "vlpcache extract: error: a shard worker raised TypeError" in err.splitlines()[-1]
    status = open_store(out).status
    assert ledgers(out) == ["shard-000000.json"] and status.failed == 0 and status.ok == 4 and not partials(out)
    record("bug in our code (TypeError in a model)", True, "exit 2 with traceback; ledger has no failure")


def test_failure_rate_stops_the_job_early(demo_corpus, tmp_path, capsys):
    from pipeline.extract import main as extract_main

    rows = [dict(r, path=f"videos/nope-{i}.mp4") for i, r in enumerate(demo_corpus["rows"])]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    args = ["--manifest", manifest, "--video-root", demo_corpus["root"], "--out", tmp_path / "out", "--runner", "local",
            "--shard-size", 2, "--no-progress", *tiny_sets(), "--set", "run.failure_check_after=4"]
    assert extract_main(list(map(str, args))) == 1
    out = capsys.readouterr().out
    assert "stopped early: 4 of the 4 videos committed so far failed (1.000 > --max-failure-rate 0.05)" in out
    status = open_store(tmp_path / "out").status
    assert (status.failed, status.pending) == (4, 8)  # two shards committed, the rest left for a rerun


def test_second_job_on_one_out_is_refused_and_a_stale_lock_taken_over(demo_corpus, tmp_path, capsys, caplog):
    from pipeline.extract import main as extract_main
    from pipeline.lock import LOCK_FILE, OutLock

    out = tmp_path / "out"
    args = list(map(str, ["--manifest", demo_corpus["manifest"], "--out", out, "--runner", "local", "--shard-size", 4,
                          "--no-progress", *tiny_sets()]))
    with OutLock(out, lease_s=60):  # a live job of this host (this very process) holds OUT
        assert extract_main(args) == 2
    err = capsys.readouterr().err
    assert f"is being written by another job (pid {os.getpid()} on {os.uname().nodename}" in err and not ledgers(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"host": os.uname().nodename, "pid": int(dead.stdout), "started": "2026-01-01T00:00:00+00:00",
            "proc_start": 0.0, "lease_until": 4e9, "token": "x"}
    out.mkdir()  # the refused job left nothing behind
    (out / LOCK_FILE).write_text(json.dumps(lock))  # a job killed with -9 left its lock
    assert extract_main(args) == 0
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_FILE).exists() and len(ledgers(out)) == 3
    (out / LOCK_FILE).write_text(json.dumps(dict(lock, host="elsewhere", lease_until=4e9)))  # alive elsewhere
    assert extract_main(args) == 2 and "pid" in capsys.readouterr().err
    (out / LOCK_FILE).write_text(json.dumps(dict(lock, host="elsewhere", lease_until=1.0)))  # its lease ran out
    # What a job killed inside a commit leaves once its ledger is written: no writer of that shard comes again.
    (out / ".partial" / "shard-000001-99999-deadbeef").mkdir(parents=True)
    (out / "ledgers" / "shard-000001.json.99999.0badf00d.partial").write_text("{")
    assert extract_main(args) == 0
    assert not partials(out) and ledgers(out) == [f"shard-{i:06d}.json" for i in range(3)]
    assert not list((out / "ledgers").glob("*.partial"))
    record("second job on one --out (lock held / stale)", True, "refused with exit 2 / taken over with a warning")


def test_ray_environment_is_set_before_import_and_another_cluster_refused(ray_local):
    from pipeline.config import ConfigError
    from pipeline.runners import ray_init

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = ("import sys; from pipeline.runners import ray_init; ray_init('', 1); import ray, socket; "
            "from ray._private import ray_constants as c; print(c.ENABLE_RAY_CLUSTER, ray.get_runtime_context().gcs_address); "
            "ray.shutdown()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    enabled, gcs = result.stdout.split()[-2:]
    assert enabled == "False" and gcs.startswith("127.0.0.1:")
    with pytest.raises(ConfigError, match="already initialised in this process on the cluster at 127.0.0.1:"):
        ray_init("127.0.0.1:1", 1)
    assert ray_init("", 1) is False  # no address: the running Ray is used


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted after the test."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_disk_full_fails_cleanly_and_a_rerun_with_space_completes(demo_corpus, small_tmpfs, tmp_path):
    """ENOSPC in a shard: exit 1 with one line naming the folder and the error, no traceback, no partial
    left; a rerun once there is space completes the store."""
    out = small_tmpfs / "out"
    Job(job_config(demo_corpus["manifest"], tmp_path / "ref", runner="local")).run()
    one_shard = sum(f.stat().st_size for f in (tmp_path / "ref" / "features.zarr").rglob("*") if "/c/0/" in str(f))
    stat = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(one_shard * 1.5) - 64 * 1024))
    full = cli("extract", "--manifest", demo_corpus["manifest"], "--out", out, "--runner", "local", "--shard-size", 4,
               "--batch-videos", 2, "--set", "run.max_inflight_videos=4", "--no-progress", *tiny_sets())
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert "Traceback" not in full.stderr
    assert last.startswith(f"vlpcache extract: error: no space left on device in {out} (No space left on device")
    assert len(ledgers(out)) == 1 and not partials(out)  # room for one shard: it committed, the next one failed
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    Job(job_config(demo_corpus["manifest"], out, runner="local")).run()
    check_recovered("disk full (4 MiB tmpfs), rerun with space", tmp_path / "ref", out,
                    note=f"exit 1: {last[len('vlpcache extract: error: '):].replace(str(out), 'OUT')[:70]}")
