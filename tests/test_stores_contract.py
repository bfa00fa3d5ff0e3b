"""The store contract, run against every backend (a base class subclassed per backend/layout)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stores import StoreError, VideoNotStoredError, create_store, open_store
from stores.cli import status_main, verify_main
from stores.schema import ARRAYS, Dims
from stores.verify import verify_store

from _stores_helpers import DIMS, PROVENANCE, assert_row_equal, fill_shard, make_store, row_arrays, video_id


class StoreContract:
    backend = "zarr"
    compression: str | None = None

    def make(self, out, **kw):
        return make_store(out, self.backend, self.compression, **kw)

    def test_round_trip_every_array_bitwise(self, tmp_path):
        self.make(tmp_path, failed=(4,))
        for check in (False, True):
            r = open_store(tmp_path, verify_checksums=check)
            assert r.video_ids == [video_id(i) for i in range(8) if i != 4]
            assert len(r) == 7 and r.dims == DIMS and r.provenance == PROVENANCE
            for vid in r.video_ids:
                got = r[vid]
                assert got["caption"] == f"caption {r.row_of(vid)}"
                assert_row_equal(got, r.row_of(vid))
                assert_row_equal(r.read_row(r.row_of(vid)), r.row_of(vid))
            assert r.meta(video_id(1)) == {"split": "train"} and r.meta(video_id(4)) == {"split": "val"}
            assert r.record(1).flags == ("short",)
            r.close()

    def test_batched_reads_equal_single_reads(self, tmp_path):
        self.make(tmp_path)
        r = open_store(tmp_path)
        ids = [video_id(i) for i in (7, 0, 3, 3, 5, 1)]  # across shards, out of order, a repeat
        batch = r.read_many(ids)
        assert batch["caption"] == [r[v]["caption"] for v in ids]
        for name, spec in ARRAYS.items():
            assert batch[name].shape == (len(ids), *spec.shape(DIMS)) and batch[name].dtype == spec.dtype
            assert batch[name].tobytes() == np.stack([r[v][name] for v in ids]).tobytes()

    def test_failed_and_pending_videos_raise_never_zeros(self, tmp_path):
        self.make(tmp_path, shards=(0, 2), failed=(1,))  # shard 1 (rows 3..5) never written
        r = open_store(tmp_path)
        assert r.video_ids == [video_id(i) for i in (0, 2, 6, 7)]
        with pytest.raises(VideoNotStoredError, match="failed during extraction: DecodeError: bad video 1") as e:
            r[video_id(1)]
        assert e.value.status == "failed"
        with pytest.raises(VideoNotStoredError, match="pending") as e:
            r[video_id(4)]
        assert e.value.status == "pending"
        with pytest.raises(StoreError, match="not in"):
            r["no-such-video"]
        with pytest.raises(StoreError, match="failed"):
            r.read_many([video_id(0), video_id(1)])
        with pytest.raises(StoreError, match="pending"):
            r.read_row(4)
        with pytest.raises(StoreError, match="failed"):
            r.read_row(1)
        status = r.status
        assert (status.ok, status.failed, status.pending) == (4, 1, 3)
        assert status.failures == [(video_id(1), "DecodeError: bad video 1")]

    def test_status_and_verify_cli(self, tmp_path, capsys):
        self.make(tmp_path, shards=(0, 1), failed=(2,))
        assert status_main([str(tmp_path), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["ok"], status["failed"], status["pending"]) == (5, 1, 2)
        assert status["failures"] == [{"video_id": video_id(2), "error": "DecodeError: bad video 2"}]
        assert status_main([str(tmp_path)]) == 0
        assert f"failed {video_id(2)}: DecodeError" in capsys.readouterr().out
        assert verify_main([str(tmp_path)]) == 2  # intact, but shard 2 pending
        assert "pending shards (1): [2]" in capsys.readouterr().out
        fill_shard(create_store(tmp_path, self.backend, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE,
                                compression=self.compression), 2)
        assert verify_main([str(tmp_path)]) == 0
        assert "OK: 3 shards intact" in capsys.readouterr().out
        assert status_main([str(tmp_path / "nope")]) == 1
        assert "not a vlpcache store" in capsys.readouterr().err

    def test_uncommitted_shard_is_invisible_and_abort_cleans_up(self, tmp_path):
        w = self.make(tmp_path, shards=(0,))
        sw = w.shard_writer(1)
        for row in sw.rows:
            sw.put(row, video_id(row), "c", row_arrays(row))
        assert w.committed_shards() == {0}
        assert open_store(tmp_path).video_ids == [video_id(i) for i in range(3)]
        sw.abort()
        assert list((tmp_path / ".partial").iterdir()) == []
        with pytest.raises(StoreError, match="already committed or aborted"):
            sw.put(3, video_id(3), "c", row_arrays(3))

    def test_kill_mid_write_leaves_shard_invisible_and_redoable(self, tmp_path):
        self.make(tmp_path, shards=(0,))
        child = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from _stores_helpers import DIMS, PROVENANCE, row_arrays, video_id
            from stores import create_store
            w = create_store({str(tmp_path)!r}, {self.backend!r}, dims=DIMS, n_videos=8, shard_size=3,
                             provenance=PROVENANCE, compression={self.compression!r})
            sw = w.shard_writer(1)
            for row in sw.rows:
                sw.put(row, video_id(row), "c", row_arrays(row))
            print("ready", flush=True)
            time.sleep(60)
        """)
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert any((tmp_path / ".partial").iterdir())  # the killed writer's partial shard is left behind...
        r = open_store(tmp_path)  # ...and invisible
        assert r.video_ids == [video_id(i) for i in range(3)] and r.status.pending == 5
        assert verify_store(tmp_path).exit_code == 2
        w = create_store(tmp_path, self.backend, dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE,
                         compression=self.compression)
        assert w.committed_shards() == {0}
        fill_shard(w, 1)  # redo: the stale partial is removed, the shard committed
        fill_shard(w, 2)
        assert [p.name for p in (tmp_path / ".partial").iterdir()] == []
        r = open_store(tmp_path, verify_checksums=True)
        assert len(r) == 8
        for row in range(8):
            assert_row_equal(r.read_row(row), row)
        assert verify_store(tmp_path).exit_code == 0

    def test_keep_copies_committed_rows_for_retry_failed(self, tmp_path):
        w = self.make(tmp_path, failed=(3, 5))
        sw = w.shard_writer(1)
        assert sw.previous is not None and sw.previous.counts == {"ok": 1, "failed": 2}
        for rec in sw.previous.videos:
            if rec.status == "ok":
                sw.keep(rec.row)
            elif rec.row == 3:
                sw.put(rec.row, rec.video_id, rec.caption, row_arrays(rec.row))
            else:
                sw.keep(rec.row)  # still failed: kept as failed, with its error
        ledger = sw.commit()
        assert ledger.counts == {"ok": 2, "failed": 1}
        r = open_store(tmp_path, verify_checksums=True)
        assert r.video_ids == [video_id(i) for i in range(8) if i != 5]
        assert_row_equal(r[video_id(3)], 3)
        assert_row_equal(r[video_id(4)], 4)
        assert r.record(4).flags == () and r.meta(video_id(4)) == {"split": "train"}
        assert r.status.failures == [(video_id(5), "DecodeError: bad video 5")]
        assert verify_store(tmp_path).exit_code == 0

    def test_reopen_checks_dims_backend_and_provenance(self, tmp_path):
        self.make(tmp_path, shards=(0,))
        kw = dict(dims=DIMS, n_videos=8, shard_size=3, provenance=PROVENANCE, compression=self.compression)
        assert create_store(tmp_path, self.backend, **kw).committed_shards() == {0}
        with pytest.raises(StoreError, match="dims"):
            create_store(tmp_path, self.backend, **{**kw, "dims": Dims(T=3, K=4, Df=8, Dr=7)})
        with pytest.raises(StoreError, match="provenance_hash"):
            create_store(tmp_path, self.backend, **{**kw, "provenance": {**PROVENANCE, "sampling": {"frames": 4}}})
        with pytest.raises(StoreError, match="shard_size"):
            create_store(tmp_path, self.backend, **{**kw, "shard_size": 4})

    def test_put_rejects_bad_rows_and_arrays(self, tmp_path):
        w = self.make(tmp_path, shards=())
        sw = w.shard_writer(0)
        good = row_arrays(0)
        with pytest.raises(ValueError, match="region_features has shape"):
            sw.put(0, "a", "c", {**good, "region_features": good["region_features"][:, :2]})
        with pytest.raises(ValueError, match="missing \\['frame_times'\\]"):
            sw.put(0, "a", "c", {k: v for k, v in good.items() if k != "frame_times"})
        with pytest.raises(ValueError, match="does not cast"):
            sw.put(0, "a", "c", {**good, "region_classes": good["region_classes"].astype(np.float32)})
        with pytest.raises(ValueError, match="non-finite"):
            sw.put(0, "a", "c", {**good, "frame_features": np.full((3, 8), 1e6, np.float32)})
        with pytest.raises(ValueError, match="not in shard 0"):
            sw.put(5, "a", "c", good)
        sw.put(0, "a", "c", {**good, "frame_features": good["frame_features"].astype(np.float32)})
        with pytest.raises(StoreError, match="already written"):
            sw.fail(0, "a", "c", "x")
        with pytest.raises(StoreError, match="rows 1, 2 were neither"):
            sw.commit()
        with pytest.raises(StoreError, match="no committed ledger"):
            w.shard_writer(1).keep(3)


class TestZarr(StoreContract):
    backend = "zarr"


class TestZarrZstd(StoreContract):
    backend = "zarr"
    compression = "zstd"


class TestHDF5(StoreContract):
    backend = "hdf5"


def test_hdf5_refuses_zstd(tmp_path):
    with pytest.raises(ValueError, match="only available for the zarr backend"):
        create_store(tmp_path, "hdf5", dims=DIMS, n_videos=2, shard_size=1, provenance={}, compression="zstd")
