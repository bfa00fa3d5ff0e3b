"""Format 2's index: streamed ids, hash lookups, the lazy reader, format-1 stores still read, ledger hygiene."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from stores import StoreError, VideoNotStoredError, create_store, open_store
from stores.bench_scale import write_format1_copy
from stores.idindex import IdIndex, table_slots, write_id_index
from stores.verify import verify_store

from _stores_helpers import DIMS, PROVENANCE, assert_row_equal, fill_shard, make_store, video_id

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_format1_store_written_by_the_old_code_still_reads(backend, tmp_path):
    # tests/fixtures/store_v1_*: make_store(shards=(0, 1), failed=(4,)) run with the format-1 code (main before format 2).
    out = tmp_path / "v1"
    shutil.copytree(FIXTURES / f"store_v1_{backend}", out)
    r = open_store(out, verify_checksums=True)
    assert r.store_meta.format_version == 1
    assert list(r.video_ids) == [video_id(i) for i in (0, 1, 2, 3, 5)] and len(r) == 5
    for v in r.video_ids:
        assert_row_equal(r[v], r.row_of(v))
    status = r.status
    assert (status.ok, status.failed, status.pending) == (5, 1, 2)
    assert status.failures == [(video_id(4), "DecodeError: bad video 4")]
    assert r.meta(video_id(4)) == {"split": "val"} and r.record(1).flags == ("short",)
    with pytest.raises(VideoNotStoredError, match="row 6.* is pending") as e:
        r.row_of(video_id(6))
    assert e.value.status == "pending"
    assert pickle.loads(pickle.dumps(r)).read_row(3)["caption"] == "caption 3"
    assert verify_store(out).exit_code == 2  # intact, shard 2 pending
    with pytest.raises(StoreError, match="format-1 store; this vlpcache reads it but writes only format 2"):
        create_store(out, backend, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE)


def test_format1_copy_of_the_bench_matches_the_old_writer(tmp_path):
    """The bench's format-1 stores are what the format-1 writer wrote: same JSON, same data bytes."""
    make_store(tmp_path / "v2", "zarr", shards=(0, 1), failed=(4,))
    write_format1_copy(tmp_path / "v2", tmp_path / "v1")
    old = FIXTURES / "store_v1_zarr"
    for path in sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file()):
        got, want = tmp_path / "v1" / path, old / path
        if path.suffix == ".json":
            strip = lambda d: {k: v for k, v in d.items() if k != "code_version"} if isinstance(d, dict) else d  # noqa: E731
            assert strip(json.loads(got.read_text())) == strip(json.loads(want.read_text())), path
        else:
            assert got.read_bytes() == want.read_bytes(), path


def test_streamed_ids_index_round_trip_with_collisions(tmp_path):
    n = 5000
    write_id_index(tmp_path / "ix", (f"id{i}" for i in range(n)), n)  # a generator: streamed in batches
    table = np.load(tmp_path / "ix" / "id_table.npy")
    assert len(table) == table_slots(n) and (table["row"] >= 0).sum() == n
    slots = table["hash"][table["row"] >= 0] & np.uint64(len(table) - 1)
    assert (np.flatnonzero(table["row"] >= 0) != slots).any()  # some ids probed past their home slot
    ix = IdIndex(tmp_path / "ix")
    assert [ix.row(f"id{i}") for i in range(n)] == list(range(n))
    assert ix.video_id(4321) == "id4321" and ix.row("id5000") is None and ix.row("") is None


def test_repeated_or_miscounted_ids_are_refused_at_creation(tmp_path):
    ids = [video_id(i) for i in range(8)]
    with pytest.raises(StoreError, match=r"video id 'vid002' appears twice in the manifest \(rows 2 and 6\)"):
        create_store(tmp_path / "a", "zarr", dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE,
                     video_ids=ids[:6] + [ids[2], ids[7]])
    assert not (tmp_path / "a" / "store.json").exists() and not (tmp_path / "a" / "index").exists()
    with pytest.raises(StoreError, match="video_ids has 7 entries but n_videos=8"):
        create_store(tmp_path / "b", "zarr", dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE, video_ids=ids[:7])
    with pytest.raises(StoreError, match="more than n_videos=8"):
        create_store(tmp_path / "c", "zarr", dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE, video_ids=ids + ["x"])


def test_lazy_video_ids_pickle_and_what_open_reads(tmp_path):
    make_store(tmp_path, n_videos=20, shard_size=3, shards=(0, 2, 3, 6), failed=(7, 9, 18))
    want = [video_id(i) for s in (0, 2, 3, 6) for i in range(3 * s, min(3 * s + 3, 20)) if i not in (7, 9, 18)]
    r = open_store(tmp_path)
    ids = r.video_ids
    assert len(ids) == len(r) == len(want) and list(ids) == want and ids == want
    assert [ids[i] for i in range(-len(want), len(want))] == want * 2 and ids[2:5] == want[2:5]
    with pytest.raises(IndexError):
        ids[len(want)]
    state = pickle.dumps(r)
    assert len(state) < 4000  # shard numbers and counts; no ids, records or maps
    r2 = pickle.loads(state)
    assert list(r2.video_ids) == want and r2.row_of(video_id(19)) == 19 and r2.meta(video_id(18)) == {"split": "val"}
    assert r2.status.failures == [(video_id(i), f"DecodeError: bad video {i}") for i in (7, 9, 18)]
    with pytest.raises(VideoNotStoredError, match="row 4.* is pending") as e:
        r2[video_id(4)]
    assert e.value.status == "pending"
    with pytest.raises(VideoNotStoredError, match="not in") as e:
        r2["nope"]


def test_store_created_without_ids_finds_committed_ids(tmp_path):
    w = create_store(tmp_path, "zarr", dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE)
    fill_shard(w, 1, failed=(4,))
    r = open_store(tmp_path)
    assert list(r.video_ids) == [video_id(3), video_id(5)] and r.row_of(video_id(5)) == 5
    with pytest.raises(VideoNotStoredError) as e:
        r[video_id(0)]  # pending, but the store cannot know its name
    assert e.value.status == "pending"


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside/file", "features.zarr/../../x", "", "a//b"])
def test_ledger_paths_must_stay_inside_the_store(tmp_path, path):
    make_store(tmp_path)
    ledger_path = tmp_path / "ledgers" / "shard-000001.json"
    ledger = json.loads(ledger_path.read_text())
    ledger["files"]["region_features"]["path"] = path
    ledger_path.write_text(json.dumps(ledger))
    with pytest.raises(StoreError, match="is not a plain relative path inside the store"):
        open_store(tmp_path).read_row(3)
    assert "not a plain relative path" in verify_store(tmp_path).bad[1][0]


def test_stale_partial_files_of_a_shard_are_cleaned_at_writer_open(tmp_path):
    w = make_store(tmp_path, shards=(0,))
    stale = [tmp_path / "ledgers" / "shard-000001.json.4242.deadbeef.partial", tmp_path / ".partial" / "shard-000001-4242-deadbeef"]
    other = [tmp_path / "ledgers" / "shard-000002.json.4242.deadbeef.partial", tmp_path / ".partial" / "shard-000002-4242-deadbeef"]
    for p in stale + other:
        p.write_text("left by a kill") if p.suffix == ".partial" else p.mkdir()
    w.shard_writer(1).abort()
    assert [p.exists() for p in stale + other] == [False, False, True, True]  # only its own shard's leftovers


def test_bench_scale_runs_its_code_on_a_tiny_store(tmp_path):
    from stores.bench_scale import MEASUREMENTS, run, table

    pickled = next(m for m in MEASUREMENTS if m.name == "pickled reader")
    results = run([2500], tmp_path, measurements=[pickled], workers=1)  # 3 shards; measured in subprocesses
    fig = results["figures"]["pickled reader"]
    assert fig["v2"]["values"][0] * 20 < fig["v1"]["values"][0]  # sizes, not timings
    assert "| pickled reader (MB) |" in table(results)
    for m in MEASUREMENTS:  # every figure's code, in this process (the subprocesses only add start-up time)
        for fmt in ("v2", "v1"):
            assert m.run(tmp_path / f"{fmt}-2500", 2500) > 0, (m.name, fmt)
    v1 = open_store(tmp_path / "v1-2500")
    assert v1.store_meta.format_version == 1 and len(v1) == len(open_store(tmp_path / "v2-2500")) == 2475


@pytest.mark.parametrize("backend,unused", [("zarr", ["h5py", "numcodecs", "pyarrow", "stores.writer", "zarr"]),
                                            ("hdf5", ["numcodecs", "pyarrow", "stores.writer", "stores.zarr_backend", "zarr"])])
def test_a_reader_loads_only_what_its_store_needs(backend, unused, tmp_path):
    """Every reading process (DataLoader workers, status) pays for what it imports: a Zarr store's reader
    never loads h5py, an HDF5 store's never loads Zarr code, neither loads the writer nor pyarrow."""
    import subprocess
    import sys

    make_store(tmp_path / "s", backend, shards=(0, 2), failed=(7,))
    code = (f"import json, sys; from stores import open_store; r = open_store({str(tmp_path / 's')!r}); "
            f"print(json.dumps([len(r), r.row_of({video_id(6)!r}), float(r.read_row(1)['frame_features'].sum()), "
            f"r.status.failed, [list(r.video_ids), r.rows_of({[video_id(6), video_id(0)]!r}).tolist(), "
            f"r.read_row(1)['caption'], r.meta({video_id(7)!r}), list(r.record(1).flags), r.record(7).error, "
            f"r.read_many([{video_id(2)!r}])['caption']], [m for m in {unused!r} if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    n, row, total, failed, answers, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (n, row, failed) == (4, 6, 1) and total != 0
    assert answers == [[video_id(i) for i in (0, 1, 2, 6)], [6, 0], "caption 1", {"split": "val"}, ["short"],
                       "DecodeError: bad video 7", ["caption 2"]]
    assert loaded == [], f"reading a {backend} store imported {loaded}"


def test_a_killed_creation_leaves_nothing_the_next_one_trips_on(tmp_path):
    """A creation killed before store.json leaves temp folders (and maybe a renamed index / Zarr group);
    the next create_store, holding the creation lock, removes them and creates the store afresh."""
    import subprocess
    import sys

    out = tmp_path / "s"
    # Killed while streaming the ids: the generator SIGKILLs its own process mid-way.
    code = (f"import os, signal; from stores import create_store; from stores.schema import Dims\n"
            f"def ids():\n    yield from ('a', 'b')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"create_store({str(out)!r}, 'zarr', dims=Dims(T=2, K=2, Df=4, Dr=4), n_videos=8, shard_size=3, "
            f"provenance={{}}, video_ids=ids())")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    assert done.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert any(n.startswith(".index.") and n.endswith(".partial") for n in left), left
    (out / "features.zarr").mkdir()  # as if killed after the Zarr group's rename
    (out / ".features.h5.123.abcd1234.partial").write_bytes(b"x")
    make_store(out, "zarr", shards=(0,))
    assert sorted(p.name for p in out.iterdir()) == [".create.lock", ".partial", "features.zarr", "index", "ledgers",
                                                     "rows", "store.json"]
    r = open_store(out)
    assert list(r.video_ids) == [video_id(i) for i in range(3)]
    with pytest.raises(VideoNotStoredError, match="row 5.* is pending"):  # the new index knows every id
        r.row_of(video_id(5))
    assert verify_store(out).exit_code == 2  # intact, shards pending
