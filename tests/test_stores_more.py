"""Provenance comparison, format fidelity against zarr-python's own writer, concurrency, pickling, bench."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from stores import StoreError, assert_same_provenance, create_store, open_store, provenance_diff
from stores.schema import ARRAYS
from stores.verify import verify_store

from _stores_helpers import DIMS, PROVENANCE, assert_row_equal, make_store, row_arrays, video_id

HERE = os.path.dirname(__file__)


def test_provenance_diff_and_assert_same(tmp_path):
    make_store(tmp_path / "a", n_videos=2, shard_size=2)
    same = create_store(tmp_path / "b", "hdf5", dims=DIMS, n_videos=1, shard_size=1, provenance=PROVENANCE)
    other = {**PROVENANCE, "extractor": {**PROVENANCE["extractor"], "weights_sha256": "abc"}, "manifest": "val.csv"}
    create_store(tmp_path / "c", dims=DIMS, n_videos=1, shard_size=1, provenance=other)
    a, b, c = (open_store(tmp_path / x) for x in "abc")
    assert_same_provenance(a, b)  # backend and size may differ: the extraction is the same
    assert provenance_diff(a.provenance, c.provenance) == ["extractor.weights_sha256", "manifest"]
    assert provenance_diff(a.provenance, c.provenance, ignore=["manifest"]) == ["extractor.weights_sha256"]
    with pytest.raises(StoreError, match="extractor.weights_sha256: 'seeded:0' vs 'abc'"):
        assert_same_provenance(a, c, ignore=["manifest"])
    assert json.loads((tmp_path / "a" / "store.json").read_text())["provenance_hash"] == a.store_meta.provenance_hash


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_shard_files_are_byte_identical_to_zarr_pythons_own(tmp_path, compression):
    """Our streaming writer produces exactly the bytes zarr-python writes for the same full shard."""
    make_store(tmp_path / "ours", "zarr", compression, n_videos=6, shard_size=3)
    ours = zarr.open_group(str(tmp_path / "ours" / "features.zarr"), mode="r")
    theirs = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w")
    for name in ARRAYS:
        a = ours[name]
        b = theirs.create_array(name, shape=a.shape, chunks=a.chunks, shards=a.shards, dtype=a.dtype,
                                fill_value=a.fill_value, serializer=a.serializer, compressors=a.compressors)
        b[:] = np.stack([row_arrays(r)[name] for r in range(6)])
        for shard in range(2):
            key = "/".join(["c", str(shard)] + ["0"] * (a.ndim - 1))
            mine = (tmp_path / "ours" / "features.zarr" / name / key).read_bytes()
            assert mine == (tmp_path / "theirs.zarr" / name / key).read_bytes(), (name, shard)


def test_read_many_maps_each_shard_once_and_reader_pickles(tmp_path):
    make_store(tmp_path)
    r = open_store(tmp_path)
    opened = []
    real = r.backend.reader

    def counting(*args):
        opened.append(args[2])
        return real(*args)

    r.backend = dataclasses.replace(r.backend, reader=counting)
    batch = r.read_many([video_id(i) for i in (7, 0, 1, 6, 2, 3)])
    assert sorted(opened) == [0, 1, 2]
    assert batch["region_features"][1].tobytes() == row_arrays(0)["region_features"].tobytes()
    clone = pickle.loads(pickle.dumps(open_store(tmp_path)))  # DataLoader workers under spawn
    assert_row_equal(clone[video_id(5)], 5)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_concurrent_writers_in_processes_create_and_own_their_shards(tmp_path, backend):
    """Processes race to create the same fresh store, then each writes its own shards."""
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from _stores_helpers import DIMS, PROVENANCE, fill_shard
        from stores import create_store
        w = create_store({str(tmp_path)!r}, {backend!r}, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE)
        for shard in map(int, sys.argv[1:]):
            fill_shard(w, shard)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, *shards]) for shards in (["0"], ["1"], ["2"])]
    assert [p.wait() for p in procs] == [0, 0, 0]
    assert verify_store(tmp_path).exit_code == 0
    r = open_store(tmp_path, verify_checksums=True)
    for row in range(8):
        assert_row_equal(r.read_row(row), row)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_sigkill_sweep_never_corrupts(tmp_path, backend):
    """Kill a writer that keeps re-committing shards at many random moments (mid-put, mid-commit):
    the store always opens, verify never finds corruption (only pending/incomplete), and a redo works."""
    make_store(tmp_path, backend, failed=(4,))
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from _stores_helpers import DIMS, PROVENANCE, row_arrays, video_id
        from stores import create_store
        w = create_store({str(tmp_path)!r}, {backend!r}, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE)
        print("ready", flush=True)
        cycle = 0
        while True:  # every cycle changes which rows are ok, so old and new files differ
            cycle += 1
            for shard in range(w.n_shards):
                sw = w.shard_writer(shard)
                for row in sw.rows:
                    if sw.previous is not None and (row + cycle) % 2:
                        sw.keep(row)
                    elif (row + cycle) % 3 == 0:
                        sw.fail(row, video_id(row), f"caption {{row}}", f"failed in cycle {{cycle}}")
                    else:
                        sw.put(row, video_id(row), f"caption {{row}}", row_arrays(row))
                sw.commit()
    """)
    rng = np.random.default_rng(0)
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = verify_store(tmp_path)
        assert report.exit_code in (0, 2), report.to_json()
        r = open_store(tmp_path, verify_checksums=True)
        for vid in r.video_ids:
            assert_row_equal(r[vid], r.row_of(vid))
    w = create_store(tmp_path, backend, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE)
    for shard in set(range(w.n_shards)) - w.committed_shards():
        with w.shard_writer(shard) as sw:
            for row in sw.rows:
                sw.put(row, video_id(row), f"caption {row}", row_arrays(row))
            sw.commit()
    assert verify_store(tmp_path).exit_code == 0


def test_bench_runs_and_reports_every_goal(tmp_path):
    from stores import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--videos", "8", "--frames", "2", "--boxes", "12", "--region-dim", "16", "--frame-dim", "16",
                       "--shard-size", "4", "--batch", "4", "--rounds", "1", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["goals"]) == 9 and all(g["value"] > 0 for g in report["goals"].values())
    assert report["ms_per_video"]["np.memmap copy (limit)"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # layouts cleaned up


def test_vlpcache_status_and_verify_commands(tmp_path):
    """The real CLI dispatch (python -m pipeline) reaches stores.cli; exit codes and JSON as documented."""
    make_store(tmp_path, "hdf5", shards=(0, 1), failed=(2,))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)

    status = run("status", str(tmp_path), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["failures"] == [{"video_id": video_id(2), "error": "DecodeError: bad video 2"}]
    verify = run("verify", str(tmp_path), "--json")
    assert verify.returncode == 2 and json.loads(verify.stdout)["pending_shards"] == [2]
    (tmp_path / "shards" / "shard-1.h5").write_bytes(b"not hdf5")
    verify = run("verify", str(tmp_path))
    assert verify.returncode == 1 and "BAD shard 1" in verify.stdout
