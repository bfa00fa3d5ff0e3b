"""The store's Arrow files are read through the buffer sidecars the writer records (stores/arrow_buffers.py),
so a reading process never imports pyarrow (tested in test_stores_index.py, test_a_reader_loads_only_...);
stores written before sidecars still read; a damaged or foreign sidecar is an error naming it; batched
id lookups give what single lookups give."""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from stores import StoreError, VideoNotStoredError, open_store
from stores.arrow_buffers import open_columns, sidecar_path, write_sidecar
from stores.idindex import IdIndex, write_id_index
from stores.migrate import migrate_store
from stores.verify import verify_store

from _stores_helpers import assert_row_equal, make_store, video_id

FIXTURES = Path(__file__).parent / "fixtures"


def test_sidecar_and_pyarrow_paths_agree_with_pyarrow(tmp_path):
    """Nulls, empty and non-ASCII strings, list<utf8> with nulls and empty lists, record batches of unequal
    sizes (one with an empty data buffer): every value as pyarrow reads it, with and without the sidecar."""
    table = pa.table({
        "i64": pa.array([3, -1, 7, 0, 2**40], pa.int64()), "i8": pa.array([1, 2, -2, 1, 2], pa.int8()),
        "s": pa.array(["é漢", None, "", "plain", None], pa.string()),
        "l": pa.array([["x", ""], None, [], ["ü"], ["a", None, "c"]], pa.list_(pa.string()))})
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for batch in (table.slice(0, 2), table.slice(2, 1), table.slice(3, 2)):
            w.write_table(batch)
    for with_sidecar in (False, True):
        if with_sidecar:
            write_sidecar(path)
        c = open_columns(path)
        assert c.names == table.column_names
        assert c.ints("i64").tolist() == table.column("i64").to_pylist() and c.ints("i8").tolist() == [1, 2, -2, 1, 2]
        assert c.strings("s").to_list() == table.column("s").to_pylist() and c.strings("s").null_count == 2
        assert [c.string_lists("l")[i] for i in range(5)] == [("x", ""), None, (), ("ü",), ("a", None, "c")]
        assert c.strings("s").equals(0, "é漢".encode()) and not c.strings("s").equals(1, b"")
        with pytest.raises(StoreError, match="no column 'nope'"):
            c.ints("nope")
        with pytest.raises(StoreError, match="column 's' is string, expected int8 or int64"):
            c.ints("s")


def test_a_store_written_before_sidecars_reads_the_same_and_migrate_adds_them(tmp_path):
    """tests/fixtures/store_v2_nosidecar_zarr: make_store(shards=(0, 1), failed=(4,)) run with main's code
    before sidecars (151405b). It reads through pyarrow exactly as the same store written now reads through
    its sidecars; `vlpcache migrate` adds the sidecars (ledgers record them) and verify passes after."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "store_v2_nosidecar_zarr", old)
    assert not list(old.rglob("*.buffers.json"))
    make_store(tmp_path / "new", "zarr", shards=(0, 1), failed=(4,))

    def answers(out: Path):
        r = open_store(out)
        ids = list(r.video_ids)
        s = r.status
        return (len(r), ids, r.rows_of(ids).tolist(), [r.record(i) for i in range(6)], r.meta(video_id(4)),
                (s.ok, s.failed, s.pending, s.failures), [r.read_row(r.row_of(v)) for v in ids])

    want = answers(tmp_path / "new")
    for step in ("before", "after migrate"):
        got = answers(old)
        assert got[:6] == want[:6], step
        for row, (a, b) in zip(got[2], zip(got[6], want[6])):
            assert_row_equal(a, row) or assert_row_equal(b, row)
            assert a["caption"] == b["caption"] == f"caption {row}", step
        assert verify_store(old).exit_code == 2, step  # intact, shard 2 pending
        if step == "before":
            result = migrate_store(old)
            assert (result.action, result.shards) == ("sidecars", 3)  # the id index and 2 rows parts
    assert sorted(p.name for p in old.rglob("*.buffers.json")) == ["shard-000000.buffers.json", "shard-000001.buffers.json",
                                                                    "video_ids.buffers.json"]
    assert "rows_buffers" in json.loads((old / "ledgers" / "shard-000001.json").read_text())["files"]
    assert migrate_store(old).action == "already"


def test_a_damaged_or_foreign_sidecar_is_named_and_verify_catches_a_mismatch(tmp_path):
    out = tmp_path / "s"
    make_store(out, "zarr", shards=(0, 1))
    part, other = out / "rows" / "shard-000001.arrow", out / "rows" / "shard-000000.arrow"
    sidecar = sidecar_path(part)
    good = sidecar.read_bytes()
    changed = json.loads(good)
    changed["columns"][1][2][0][2][1][0] += 8  # video_id's offsets buffer moved: its checksum no longer holds
    cases = [(json.dumps(changed).encode(), "damaged"),
             (b"{not json", "not a buffer sidecar"),
             (sidecar_path(other).read_bytes(), "describes 'shard-000000.arrow', not 'shard-000001.arrow'")]
    for data, why in cases:
        sidecar.write_bytes(data)
        with pytest.raises(StoreError, match=why) as e:
            open_store(out).row_of(video_id(4))
        assert str(sidecar) in str(e.value) and "vlpcache migrate" in str(e.value)
        assert any(str(sidecar) in p for p in verify_store(out).bad[1])
    sidecar.write_bytes(good)
    assert open_store(out).row_of(video_id(4)) == 4

    # A sidecar whose own checksum holds but whose locations are not pyarrow's (the id index's: no ledger
    # covers it): verify names it; the reader's cheap checks do too, here (offsets outside the data).
    ids_sidecar = out / "index" / "video_ids.buffers.json"
    side = json.loads(ids_sidecar.read_bytes())
    column = side["columns"][0][2][0][2]  # the one batch's buffers: validity, offsets, data
    column[1], column[2] = column[2], column[1]
    body = {k: v for k, v in side.items() if k != "crc32"}
    side["crc32"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    ids_sidecar.write_text(json.dumps(side))
    assert "video_ids.buffers.json: the buffer locations do not match what pyarrow reads" in verify_store(out).store_error
    with pytest.raises(StoreError):
        IdIndex(out / "index")
    assert migrate_store(out).shards == 1 and verify_store(out).exit_code == 2  # migrate rewrites it


def test_batched_lookups_equal_single_ones(tmp_path):
    """IdIndex.rows against row(), over several index batches (BATCH is patched small) and with unknown ids;
    the reader's rows_of against row_of, including its errors for failed, pending and unknown ids."""
    import stores.idindex as idindex

    n, batch = 2500, idindex.BATCH
    try:
        idindex.BATCH = 1000  # three record batches in video_ids.arrow, the last one shorter
        write_id_index(tmp_path / "ix", (f"id{i}" for i in range(n)), n)
    finally:
        idindex.BATCH = batch
    ix = IdIndex(tmp_path / "ix")
    asked = [f"id{i}" for i in range(0, n, 7)] + ["id2500", "", "id1", "id1"]
    assert ix.rows(asked).tolist() == [-1 if ix.row(v) is None else ix.row(v) for v in asked]
    assert ix.rows(asked)[-4:].tolist() == [-1, -1, 1, 1]

    make_store(tmp_path / "s", "zarr", shards=(0, 2), failed=(7,))
    r = open_store(tmp_path / "s")
    ok = list(r.video_ids)
    assert r.rows_of(ok[::-1]).tolist() == [r.row_of(v) for v in ok[::-1]] and r.rows_of([]).tolist() == []
    for bad, status in [(video_id(7), "failed"), (video_id(4), "pending"), ("nope", "pending")]:
        with pytest.raises(VideoNotStoredError) as single:
            r.row_of(bad)
        with pytest.raises(VideoNotStoredError) as batched:
            r.rows_of([ok[0], bad])
        assert str(batched.value) == str(single.value) and batched.value.status == status


def test_a_rows_part_that_disagrees_with_the_index_is_named(tmp_path):
    """A rows part whose id differs from the index's (its sidecar rewritten to match, so that only the
    disagreement is left): single and batched lookups name the store as damaged."""
    make_store(tmp_path / "s", "zarr", shards=(0,))
    part = tmp_path / "s" / "rows" / "shard-000000.arrow"
    part.write_bytes(part.read_bytes().replace(video_id(1).encode(), b"vidXYZ"))  # same length: still well-formed
    write_sidecar(part)
    r = open_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"holds 'vidXYZ' there; the store is damaged"):
        r.row_of(video_id(1))
    with pytest.raises(StoreError, match=r"holds 'vidXYZ' there; the store is damaged"):
        r.rows_of([video_id(0), video_id(1)])
