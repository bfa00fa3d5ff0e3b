"""Bad input made here, on disk, and found by verify or open_store with a clear message."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from stores import StoreError, open_store
from stores.cli import verify_main
from stores.verify import verify_store

from _stores_helpers import assert_row_equal, make_store, video_id

BACKENDS = [("zarr", None), ("zarr", "zstd"), ("hdf5", None)]


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1] or 'raw'}")
def store(request, tmp_path):
    backend, compression = request.param
    make_store(tmp_path, backend, compression)  # 8 videos, shards of 3: rows 0-2, 3-5, 6-7
    return tmp_path, backend


def shard_file(out, backend, shard, name="region_features"):
    if backend == "hdf5":
        return out / "shards" / (f"shard-{shard}.h5" if shard < 2 else f"shard-{shard}-last.h5")
    return out / "features.zarr" / name / "c" / str(shard) / "0" / "0" / "0"


def chunk_span(out, backend, shard, local):
    """(offset, nbytes) of one region_features chunk's payload inside its shard file."""
    if backend == "hdf5":
        with h5py.File(shard_file(out, backend, shard)) as f:
            info = f["region_features"].id.get_chunk_info_by_coord((local, 0, 0, 0))
            return info.byte_offset, info.size
    data = shard_file(out, backend, shard).read_bytes()
    n = 3 * 16  # shard_size 3 -> index of 3 (offset, nbytes) pairs before the 4-byte crc
    index = np.frombuffer(data[-n - 4:-4], dtype="<u8").reshape(3, 2)
    return int(index[local, 0]), int(index[local, 1])


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_truncated_shard_file(store, capsys):
    out, backend = store
    path = shard_file(out, backend, 1)
    path.write_bytes(path.read_bytes()[:-100])
    assert verify_main([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "BAD shard 1" in printed and "truncated" in printed and "BAD shard 0" not in printed
    r = open_store(out)
    with pytest.raises(StoreError, match="truncated"):
        r[video_id(4)]
    assert_row_equal(r[video_id(0)], 0)  # other shards still read


def test_flipped_bytes_in_chunk_data(store, capsys):
    out, backend = store
    offset, nbytes = chunk_span(out, backend, 0, 1)
    flip(shard_file(out, backend, 0), offset + nbytes // 2)
    assert verify_main([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "BAD shard 0" in printed and "corrupt" in printed
    report = verify_store(out)
    assert sorted(report.bad) == [0] and len(report.good) == 2
    with pytest.raises(StoreError, match="crc32c|fletcher32|does not decode"):
        open_store(out, verify_checksums=True)[video_id(1)]


def test_flipped_byte_in_zarr_shard_index_caught_even_unchecked(tmp_path):
    make_store(tmp_path, "zarr")
    path = shard_file(tmp_path, "zarr", 2)
    flip(path, path.stat().st_size - 10)
    with pytest.raises(StoreError, match="shard index checksum mismatch"):
        open_store(tmp_path)[video_id(6)]
    assert sorted(verify_store(tmp_path).bad) == [2]


def test_missing_ledger(store, capsys):
    out, backend = store
    (out / "ledgers" / "shard-000001.json").unlink()
    assert verify_main([str(out)]) == 2
    printed = capsys.readouterr().out
    assert "INCOMPLETE shard 1: data files without a ledger" in printed
    r = open_store(out)
    assert video_id(4) not in r.video_ids and r.status.pending == 3
    with pytest.raises(StoreError, match="pending"):
        r[video_id(4)]


def test_damaged_ledger(store, capsys):
    out, _ = store
    path = out / "ledgers" / "shard-000002.json"
    path.write_bytes(path.read_bytes()[:50])
    reader = open_store(out)  # opening reads no ledger; the first look at the shards finds it
    with pytest.raises(StoreError, match="shard-000002.json: shard ledger is unreadable"):
        reader.status
    assert verify_main([str(out)]) == 1
    assert "BAD shard 2" in capsys.readouterr().out


def test_ledger_counts_that_disagree(store):
    out, _ = store
    path = out / "ledgers" / "shard-000000.json"
    ledger = json.loads(path.read_text())
    ledger["counts"]["ok"] += 1
    path.write_text(json.dumps(ledger))
    with pytest.raises(StoreError, match="counts .* disagree"):
        len(open_store(out))


def test_unknown_format_version(store, capsys):
    out, _ = store
    meta = json.loads((out / "store.json").read_text())
    meta["format_version"] = 99
    (out / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"format version 99, but this vlpcache reads versions \(1, 2\)"):
        open_store(out)
    assert verify_main([str(out)]) == 1
    assert "format version 99" in capsys.readouterr().out


def test_unknown_ledger_format_version(store):
    out, _ = store
    path = out / "ledgers" / "shard-000001.json"
    ledger = json.loads(path.read_text())
    ledger["format_version"] = 3
    path.write_text(json.dumps(ledger))
    with pytest.raises(StoreError, match="shard-000001.json: ledger format version 3"):
        open_store(out).status


def test_missing_store_metadata(store):
    out, _ = store
    (out / "store.json").unlink()
    with pytest.raises(StoreError, match="not a vlpcache store"):
        open_store(out)


def test_wrong_dtype_in_zarr_metadata(tmp_path, capsys):
    make_store(tmp_path, "zarr")
    path = tmp_path / "features.zarr" / "region_scores" / "zarr.json"
    md = json.loads(path.read_text())
    md["data_type"] = "float32"
    path.write_text(json.dumps(md))
    with pytest.raises(StoreError, match='region_scores/zarr.json: data_type is "float32", but the schema .* "float16"'):
        open_store(tmp_path)
    assert verify_main([str(tmp_path)]) == 1
    assert "data_type" in capsys.readouterr().out


def test_wrong_dtype_in_hdf5_files(tmp_path):
    make_store(tmp_path, "hdf5")
    with h5py.File(tmp_path / "features.h5", "r+") as f:
        del f["region_scores"]
        f.create_dataset("region_scores", shape=(8, 3, 4), dtype="f4")
    # vlpcache's reader and writers never read features.h5 (they map the shard files); verify checks it.
    msg = "features.h5: dataset 'region_scores' has dtype float32, but the schema needs float16"
    assert msg in verify_store(tmp_path).store_error


def test_wrong_dtype_in_hdf5_shard_file(tmp_path):
    make_store(tmp_path, "hdf5")
    path = shard_file(tmp_path, "hdf5", 1)
    with h5py.File(path, "r+") as f:
        data = f["region_scores"][:]
        del f["region_scores"]
        f.create_dataset("region_scores", data=data.astype("f4"), chunks=(1, 3, 4))
    # Make the ledger agree with the new file so only the dtype is wrong.
    import crc32c
    ledger_path = tmp_path / "ledgers" / "shard-000001.json"
    ledger = json.loads(ledger_path.read_text())
    ledger["files"]["shard"].update(nbytes=path.stat().st_size, crc32c=crc32c.crc32c(path.read_bytes()))
    ledger_path.write_text(json.dumps(ledger))
    with pytest.raises(StoreError, match="shard-1.h5: dataset 'region_scores' has dtype float32"):
        open_store(tmp_path)[video_id(3)]
    assert sorted(verify_store(tmp_path).bad) == [1]
