"""The fault suite, heavier part (`make test-faults` runs it with tests/test_faults.py and the kill tests
of tests/test_pipeline_ray.py, then prints the table): kill -9 of the driver at seeded random moments,
some inside a commit; a decode worker killed; a hung model actor; two jobs started at once on one
--out; flipped bytes and truncation in every kind of store file."""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from _faults_table import check_recovered, record
from _pipeline_helpers import (cli, job_config, kill_group, kill_mid_shard, ledgers, partials, start_cli, tiny_sets,
                               wait_for)
from pipeline.job import Job
from stores import open_store
from stores.schema import ARRAYS
from stores.writer import CREATE_LOCK
from test_faults import marked_corpus, plugin_extractor  # noqa: F401 - a fixture shared with the fast part
from test_pipeline_ray import ray_local, reference  # noqa: F401 - the same module fixtures as the Ray tests

pytestmark = pytest.mark.slow

ARGS = ["--shard-size", 2, "--batch-videos", 2, "--set", "run.max_inflight_videos=4", "--no-progress", *tiny_sets()]


@pytest.fixture(scope="module")
def reference_cli(demo_corpus, tmp_path_factory):
    """The uninterrupted CLI run (6 shards of 2) and its wall time, which the random moments fall in."""
    out = tmp_path_factory.mktemp("ref") / "out"
    start = time.monotonic()
    result = cli("extract", "--manifest", demo_corpus["manifest"], "--out", out, "--runner", "local", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return {"out": out, "wall_s": time.monotonic() - start}


def _in_commit(out: Path, shard: int) -> bool:
    """Data files of `shard` renamed into place, its ledger not yet written: the middle of its commit."""
    data = [out / "features.zarr" / name / "c" / str(shard) for name in ARRAYS]
    return any(p.exists() for p in data) and not (out / "ledgers" / f"shard-{shard:06d}.json").exists()


# 12 seeded moments: 8 at a random time of the run, 4 inside the commit of a random shard.
MOMENTS = [("time", seed) for seed in range(8)] + [("commit", seed) for seed in range(8, 12)]


@pytest.mark.parametrize("kind,seed", MOMENTS, ids=[f"{k}-{s}" for k, s in MOMENTS])
def test_driver_kill_at_a_random_moment(demo_corpus, reference_cli, tmp_path, kind, seed):
    rng = random.Random(seed)
    out = tmp_path / "out"
    args = ["extract", "--manifest", demo_corpus["manifest"], "--out", out, "--runner", "local", *ARGS]
    proc = start_cli(*args, log=tmp_path / "killed.log")
    try:
        if kind == "time":
            at = rng.uniform(1.0, reference_cli["wall_s"])
            note = f"at {at:.1f} s"
            deadline = time.monotonic() + at
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        else:
            shard = rng.randrange(1, 6)
            wait_for(lambda: (out / "ledgers").exists(), 120, "the store", proc)
            while proc.poll() is None and not _in_commit(out, shard):  # poll hard: a commit lasts milliseconds
                if (out / "ledgers" / f"shard-{shard:06d}.json").exists():
                    break
            note = f"in the commit of shard {shard}"
    finally:
        kill_group(proc)
    if kind == "commit":
        inside = _in_commit(out, shard)
        note += "" if inside else " (missed: landed after it)"
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not partials(out)
    check_recovered(f"kill -9 driver ({kind}, seed {seed})", reference_cli["out"], out,
                    note=f"{note}; {len(ledgers(out))} shards after rerun")


def _decode_worker_pid() -> int | None:
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "ray::_decode" in " ".join(p.cmdline()):
                return p.pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_decode_worker_killed(ray_local, demo_corpus, reference, tmp_path):
    out = tmp_path / "out"
    killed = []

    kill_decoder = kill_mid_shard(out, _decode_worker_pid, "a decode task running", killed)
    stats = Job(job_config(demo_corpus["manifest"], out, runner="ray", concurrent_shards=1)).run(on_runner_ready=kill_decoder)
    assert killed and not stats.shards_failed and stats.videos_failed == 0
    check_recovered("kill -9 of a decode worker", reference, out, note="Ray reruns the decode task")


@pytest.mark.timeout(900)  # three actor restarts, each building the models again
def test_hung_model_actor_is_killed_and_the_video_recorded(ray_local, marked_corpus, tmp_path):
    """A forward pass that never returns on one video: after encode_timeout_s the actor is killed and
    replaced; the batch is retried, then its videos one by one; that video alone is recorded failed."""
    extractor = plugin_extractor("hang")
    Job(job_config(marked_corpus["without"], tmp_path / "ref", extractor=extractor, runner="local")).run()
    stats = Job(job_config(marked_corpus["manifest"], tmp_path / "out", extractor=extractor, runner="ray",
                           encode_timeout_s=5.0)).run()
    assert stats.exit_reason == "" and stats.shard_retries == 0
    errors = dict(open_store(tmp_path / "out").status.failures)
    assert errors == {"marked": "model worker timed out: no result within 5 s; the actor was killed"}
    check_recovered("hung model actor (sleeps forever on one video)", tmp_path / "ref", tmp_path / "out",
                    same_failures=False, note="killed after 5 s, 3 times; recorded failed: timed out")


def test_two_jobs_started_at_once_on_one_out(demo_corpus, reference_cli, tmp_path):
    out = tmp_path / "out"
    args = ["extract", "--manifest", demo_corpus["manifest"], "--out", out, "--runner", "local", *ARGS]
    procs = [start_cli(*args, log=tmp_path / f"job{i}.log") for i in range(2)]
    try:
        codes = sorted(p.wait(timeout=280) for p in procs)
    finally:
        for p in procs:
            kill_group(p)
    logs = [(tmp_path / f"job{i}.log").read_text() for i in range(2)]
    assert codes == [0, 2], logs
    refused = next(text for text in logs if "is being written by another job" in text)
    assert "vlpcache extract: error:" in refused and "pid" in refused
    check_recovered("two jobs started at once on one --out", reference_cli["out"], out, note="the second refused, exit 2")


# ---------------------------------------------------------------- damaged files


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _delete(path: Path) -> None:
    path.unlink()


# Damage that verify does not see (kind, damage) -> why; strict: a gap verify starts to report fails the test.
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("id list sidecar", "delete"): "stores written before buffer sidecars have none, so verify cannot require it; "
                                   "readers then read video_ids.arrow through pyarrow, with the same answers",
}


def _store_files(out: Path, backend: str) -> list[tuple[str, Path, int | None]]:
    """(kind, file, shard it belongs to or None for store-wide files): every file of a format-2 store but
    the run records (runs/, extract_config.yaml) and the creation lock (empty), shard 1's for per-shard files."""
    files = [("ledger", out / "ledgers" / "shard-000001.json", 1), ("rows part", out / "rows" / "shard-000001.arrow", 1),
             ("rows part sidecar", out / "rows" / "shard-000001.buffers.json", 1),
             ("store.json", out / "store.json", None), ("id list", out / "index" / "video_ids.arrow", None),
             ("id list sidecar", out / "index" / "video_ids.buffers.json", None),
             ("id table", out / "index" / "id_table.npy", None)]
    if backend == "zarr":
        files += [(f"zarr shard file {name}", next(p for p in (out / "features.zarr" / name / "c" / "1").rglob("*")
                                                    if p.is_file()), 1) for name in ARRAYS]
        files += [("zarr row_status chunk", out / "features.zarr" / "row_status" / "c" / "1", 1)]
        files += [(f"zarr array metadata {name}", out / "features.zarr" / name / "zarr.json", None)
                  for name in (*ARRAYS, "row_status")]
        files += [("zarr group metadata", out / "features.zarr" / "zarr.json", None)]
    else:
        files += [("hdf5 shard file", out / "shards" / "shard-1.h5", 1), ("hdf5 virtual file", out / "features.h5", None)]
    return files


@pytest.mark.timeout(1800)  # 48 damaged copies (zarr), each verified; the shard ones redone by a job
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_damaged_files_are_named_by_verify_and_redone(demo_corpus, tmp_path, backend):
    """Every file of a store, flipped, truncated and deleted: verify names exactly the damaged shard (or
    the store and the file, for store-wide files), with the fix. Doing what it says for the shard (its
    ledger removed, the job rerun) restores the store bit for bit."""
    from stores.verify import verify_store

    ref = tmp_path / "ref"
    Job(job_config(demo_corpus["manifest"], ref, runner="local", store=backend)).run()
    listed = {p for _, p, _ in _store_files(ref, backend)}
    every = {p for p in ref.rglob("*") if p.is_file() and "runs" not in p.relative_to(ref).parts
             and p.name not in ("extract_config.yaml", CREATE_LOCK) and ("1" in p.relative_to(ref).parts or "shard-000001" in p.name
                                                    or "shard-1" in p.name or not _per_shard(p.relative_to(ref)))}
    assert every == listed, sorted(map(str, every ^ listed))  # a new kind of file must be added above
    for kind, path, shard in _store_files(ref, backend):
        for damage in (_flip, _truncate, _delete):
            out = tmp_path / f"{backend}-{kind.replace(' ', '_')}-{damage.__name__}"
            shutil.copytree(ref, out)
            damage(out / path.relative_to(ref))
            name = f"{damage.__name__[1:]} {kind} ({backend})"
            gap = KNOWN_GAPS.get((kind, damage.__name__[1:]))
            if gap:
                assert verify_store(out).ok, f"verify now reports {name}: remove it from KNOWN_GAPS"
                record(name, False, f"NOT detected: {gap}")
                continue
            report = verify_store(out)
            if shard is None:
                assert report.store_error is not None and str(path.relative_to(ref)) in report.store_error, \
                    (name, report.to_json())
                assert report.fix and report.exit_code == 1
                record(name, True, f"verify: {report.store_error.replace(str(out), 'OUT')[:70]}")
                continue
            if kind == "ledger" and damage is _delete:  # the shard is pending again: extract redoes it
                assert sorted(report.incomplete) == [shard] and not report.bad, (name, report.to_json())
            else:
                assert sorted(report.bad) == [shard], (name, report.to_json())
                assert any(str(out / path.relative_to(ref)) in p for p in report.bad[shard]), (name, report.to_json())
                assert f"rm {out / 'ledgers' / f'shard-{shard:06d}.json'}" in report.fix[0]
                assert f"vlpcache extract --config {out / 'extract_config.yaml'} --out {out}" in report.fix[1]
                (out / "ledgers" / f"shard-{shard:06d}.json").unlink(missing_ok=True)  # report.fix, first step
            Job(job_config(demo_corpus["manifest"], out, runner="local", store=backend)).run()
            check_recovered(name, ref, out, note=f"verify named shard {shard}; redone")


def _per_shard(rel: Path) -> bool:
    return rel.parts[0] in ("ledgers", "rows", "shards") or (rel.parts[0] == "features.zarr" and "c" in rel.parts)
