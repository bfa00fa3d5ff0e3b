"""Foreign readers open what we write: zarr-python, tensorstore's zarr3 driver, h5py, h5dump, h5ls."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import tensorstore as ts
import zarr

from stores import open_store
from stores.schema import ARRAYS, FORMAT_VERSION

from _stores_helpers import DIMS, fill_shard, make_store, row_arrays

FAILED = (4,)


def expected(name: str, row: int) -> np.ndarray:
    """What a foreign reader must see: the row's data, or the fill value for a failed row."""
    if row in FAILED:
        spec = ARRAYS[name]
        return np.full(spec.shape(DIMS), spec.fill, dtype=spec.dtype)
    return row_arrays(row)[name]


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_zarr_python_and_tensorstore_read_every_array(tmp_path, compression):
    make_store(tmp_path, "zarr", compression, failed=FAILED)
    group = zarr.open_group(str(tmp_path / "features.zarr"), mode="r")
    assert group.attrs["vlpcache"]["format_version"] == FORMAT_VERSION
    for name, spec in ARRAYS.items():
        arr = group[name]
        assert arr.dtype == spec.dtype and arr.shape == (8, *spec.shape(DIMS))
        assert arr.metadata.dimension_names[0] == "video"
        all_rows = arr[:]  # whole array at once: every shard file decoded by zarr-python
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "features.zarr" / name)}},
                    read=True).result()
        assert t.dtype.numpy_dtype == spec.dtype
        via_ts = t.read().result()
        for row in range(8):
            assert all_rows[row].tobytes() == expected(name, row).tobytes(), (name, row)
            assert via_ts[row].tobytes() == expected(name, row).tobytes(), (name, row)


def test_h5py_reads_virtual_datasets_and_shard_files(tmp_path):
    make_store(tmp_path, "hdf5", failed=FAILED, shards=(0, 1))  # shard 2 (rows 6, 7) pending
    with h5py.File(tmp_path / "features.h5", "r") as f:
        for name, spec in ARRAYS.items():
            ds = f[name]
            assert ds.is_virtual and ds.dtype == spec.dtype and ds.shape == (8, *spec.shape(DIMS))
            data = ds[:]
            for row in range(6):
                assert data[row].tobytes() == expected(name, row).tobytes(), (name, row)
            assert (data[6:] == spec.fill).all()  # missing shard file reads as the fill value
    with h5py.File(tmp_path / "shards" / "shard-1.h5", "r") as f:
        assert f.attrs["row_start"] == 3
        assert f["region_features"][0].tobytes() == row_arrays(3)["region_features"].tobytes()
    make_store(tmp_path, "hdf5", failed=FAILED, shards=(2,))  # features.h5 picks up the new shard file
    with h5py.File(tmp_path / "features.h5", "r") as f:
        assert f["frame_times"][7].tobytes() == row_arrays(7)["frame_times"].tobytes()


def test_features_h5_size_does_not_grow_with_shards(tmp_path):
    sizes = {}
    for shard_size in (1, 3, 8):  # 8, 3 and 1 shards
        out = tmp_path / str(shard_size)
        make_store(out, "hdf5", failed=FAILED, shard_size=shard_size)
        sizes[shard_size] = (out / "features.h5").stat().st_size
        with h5py.File(out / "features.h5", "r") as f:
            assert len(f["frame_times"].virtual_sources()) <= 2
            assert f["frame_times"][:].tobytes() == np.stack([expected("frame_times", r) for r in range(8)]).tobytes()
    assert sizes[1] == sizes[3], sizes


@pytest.mark.skipif(shutil.which("h5dump") is None or shutil.which("h5ls") is None, reason="hdf5-tools not installed (make sysdeps)")
def test_h5dump_and_h5ls(tmp_path):
    make_store(tmp_path, "hdf5", failed=FAILED)
    listing = subprocess.run(["h5ls", "-r", str(tmp_path / "features.h5")], capture_output=True, text=True, check=True).stdout
    for name, spec in ARRAYS.items():
        dims = ", ".join(map(str, ("8/Inf", *spec.shape(DIMS))))  # 8 rows; unlimited maxshape: the %b mapping
        assert re.search(rf"^/{name}\s+Dataset \{{{dims}\}}$", listing, re.M), listing
    dump = subprocess.run(["h5dump", "-d", "/region_counts", "-w", "0", str(tmp_path / "features.h5")],
                          capture_output=True, text=True, check=True).stdout
    assert "H5T_STD_I16LE" in dump
    rows = re.findall(r"^\s*\((\d+),0\): ([-\d, ]+?),?$", dump, re.M)
    assert [int(r) for r, _ in rows] == list(range(8))
    for row, values in rows:
        assert [int(v) for v in values.split(",")] == expected("region_counts", int(row)).tolist()
    header = subprocess.run(["h5dump", "-H", "-p", str(tmp_path / "shards" / "shard-0.h5")],
                            capture_output=True, text=True, check=True).stdout
    assert "CHECKSUM FLETCHER32" in header and "CHUNKED ( 1, 3, 4, 6 )" in header


def test_our_reader_agrees_with_zarr_python_on_the_same_files(tmp_path):
    make_store(tmp_path, "zarr", failed=FAILED)
    r = open_store(tmp_path)
    arr = zarr.open_array(str(tmp_path / "features.zarr" / "region_features"), mode="r")
    for vid in r.video_ids:
        assert r[vid]["region_features"].tobytes() == arr[r.row_of(vid)].tobytes()


def _foreign_row_status(out, backend) -> np.ndarray:
    """row_status as zarr-python or h5py (through features.h5) read it: 0 pending, 1 ok, 2 failed."""
    if backend == "zarr":
        return zarr.open_group(str(out / "features.zarr"), mode="r")["row_status"][:]
    with h5py.File(out / "features.h5", "r") as f:
        return f["row_status"][:]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_row_status_tells_foreign_readers_what_is_committed_even_after_a_kill(tmp_path, backend):
    w = make_store(tmp_path, backend, shards=(0,), failed=(1,))
    pending_writer = w.shard_writer(1)  # a writer with data in flight: nothing visible yet
    for row in pending_writer.rows:
        pending_writer.put(row, f"vid{row:03d}", "c", row_arrays(row))
    assert _foreign_row_status(tmp_path, backend).tolist() == [1, 2, 1, 0, 0, 0, 0, 0]
    pending_writer.abort()
    # A retry of shard 0's failed row, killed (SIGKILL) just before its first file is replaced.
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _stores_helpers import row_arrays, video_id
        import stores.writer
        from stores import open_writer
        stores.writer.durable_replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die at the first rename
        sw = open_writer({str(tmp_path)!r}).shard_writer(0)
        sw.keep(0); sw.put(1, video_id(1), "caption 1", row_arrays(1)); sw.keep(2)
        sw.commit()
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _foreign_row_status(tmp_path, backend).tolist() == [0] * 8  # marked pending before any data moved
    assert open_store(tmp_path).status.pending == 8
    fill_shard(w, 0)  # the resumed job redoes the shard
    fill_shard(w, 2, failed=(7,))
    status = _foreign_row_status(tmp_path, backend)
    assert status.tolist() == [1, 1, 1, 0, 0, 0, 1, 2]
    if backend == "zarr":  # the documented rule: rows with row_status 1 hold their data
        feats = zarr.open_group(str(tmp_path / "features.zarr"), mode="r")["frame_features"][:]
        for row in np.flatnonzero(status == 1):
            assert feats[row].tobytes() == row_arrays(int(row))["frame_features"].tobytes()


def test_features_h5_stops_at_the_first_missing_shard_unless_the_printf_gap_is_raised(tmp_path):
    make_store(tmp_path, "hdf5", n_videos=11, shard_size=3, shards=(1, 3), failed=(4,))  # shards 0, 2 pending
    pending, shard1, last = [0] * 3, [1, 2, 1], [1, 1]
    with h5py.File(tmp_path / "features.h5", "r") as f:
        assert f["row_status"][:].tolist() == pending * 3 + last  # the pattern stops at shard-0.h5: missing
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_virtual_printf_gap(4)  # the number of shards, as docs/store-format.md shows
        status = h5py.Dataset(h5py.h5d.open(f.id, b"row_status", dapl=dapl))
        assert status.shape == (11,) and status[:].tolist() == pending + shard1 + pending + last
