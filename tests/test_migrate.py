"""`vlpcache migrate`: format-1 stores (written by the format-1 code, tests/fixtures/store_v1_*) become format 2
in place with every reader figure unchanged; refusals; kill -9 at seeded moments (slow)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli
from stores import StoreError, VideoNotStoredError, open_store, open_writer
from stores.bench_scale import write_format1_copy
from stores.ledger import Layout, load_store_meta
from stores.migrate import MARKER, migrate_store, staging_path
from stores.verify import verify_store

from _stores_helpers import fill_shard, make_store, video_id

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def figures(out: Path) -> dict:
    """Everything a reader answers about the store: ok ids in order, every manifest id's lookup, records
    (caption, status, error, flags, meta), status, every ok video's arrays, and a pickled reader's read."""
    with open_store(out, verify_checksums=True) as r:
        n = r.store_meta.n_videos
        lookups = {}
        for v in map(video_id, range(n + 1)):  # + one id the store does not know
            try:
                lookups[v] = ("ok", r.row_of(v), r.meta(v))
            except VideoNotStoredError as e:
                lookups[v] = (e.status, str(e).replace(str(out), "OUT"), r.meta(v) if e.status == "failed" else None)
        committed = [row for s in range(r.store_meta.n_shards) if s not in r.pending_shards() for row in r.store_meta.shard_rows(s)]
        reads = {v: {k: a.tobytes() if isinstance(a, np.ndarray) else a for k, a in r[v].items()} for v in r.video_ids}
        many = r.read_many(list(r.video_ids)[::-1])
        return {"ids": list(r.video_ids), "len": len(r), "lookups": lookups, "records": [r.record(row) for row in committed],
                "status": r.status, "reads": reads, "many": {k: a.tobytes() if isinstance(a, np.ndarray) else a for k, a in many.items()},
                "pickled": pickle.loads(pickle.dumps(r)).read_row(r.row_of(r.video_ids[0]))["caption"],
                "provenance": r.provenance, "dims": r.dims}


def v1_store(tmp_path: Path, backend: str, complete: bool) -> Path:
    """A format-1 store: the fixture the format-1 code wrote (shards 0, 1 of 3), or (zarr, complete) the
    bench's format-1 copy of a complete store, which test_stores_index checks against the format-1 writer."""
    out = tmp_path / f"v1-{backend}"
    if complete:
        make_store(tmp_path / "v2src", backend, failed=(4,))
        write_format1_copy(tmp_path / "v2src", out)
    else:
        shutil.copytree(FIXTURES / f"store_v1_{backend}", out)
    (out / "extract_config.yaml").write_text("kept: true\n")  # the pipeline's own files survive the swap
    (out / "runs").mkdir()
    (out / "runs" / "r1.json").write_text("{}")
    return out


def data_inodes(out: Path) -> dict[str, int]:
    """The Zarr chunk files (every file under an array's c/), by path: their inode."""
    return {str(p.relative_to(out)): p.stat().st_ino for p in (out / "features.zarr").rglob("*")
            if p.is_file() and "c" in p.relative_to(out).parts}


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_migrate_keeps_every_figure_and_extract_finishes_the_pending_shard(backend, tmp_path, capsys):
    out = v1_store(tmp_path, backend, complete=False)
    before, inodes = figures(out), data_inodes(out)
    assert load_store_meta(Layout(out)).format_version == 1 and before["status"].pending == 2
    assert cli(["migrate", str(out)]) == 1
    assert "1 of 3 shards pending" in capsys.readouterr().err and load_store_meta(Layout(out)).format_version == 1
    assert cli(["migrate", str(out), "--allow-pending"]) == 0
    assert "migrated 2 shards to format 2" in capsys.readouterr().out
    assert load_store_meta(Layout(out)).format_version == 2
    assert figures(out) == before
    if backend == "zarr":
        assert len(inodes) == 14  # 7 arrays x 2 committed shards
        assert {k: v for k, v in data_inodes(out).items() if "row_status" not in k} == inodes  # not rewritten
    assert (out / "extract_config.yaml").read_text() == "kept: true\n" and (out / "runs" / "r1.json").exists()
    assert not staging_path(out).exists() and not (out / MARKER).exists() and not (out / "video_ids.json").exists()
    report = verify_store(out)
    assert (report.exit_code, report.good, report.pending) == (2, [0, 1], [2])  # intact; shard 2 pending
    fill_shard(open_writer(out), 2)  # this vlpcache's writer finishes what format 1 left pending
    assert verify_store(out).exit_code == 0 and len(open_store(out)) == 7
    assert cli(["migrate", str(out)]) == 0
    assert "already a format-2 store" in capsys.readouterr().out


@pytest.mark.slow
def test_migrate_complete_store_then_verify(tmp_path):
    out = v1_store(tmp_path, "zarr", complete=True)
    before = figures(out)
    result = migrate_store(out)
    assert (result.action, result.shards, result.resumed) == ("migrated", 3, 0)
    assert figures(out) == before and verify_store(out).exit_code == 0
    assert migrate_store(out).action == "already"


def test_migrate_refuses_what_it_cannot_convert(tmp_path, capsys):
    assert cli(["migrate", str(tmp_path / "nothing")]) == 1
    assert "is not a vlpcache store" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    out = v1_store(tmp_path, "zarr", complete=False)
    ledger = out / "ledgers" / "shard-000001.json"
    ledger.write_text(ledger.read_text()[:-40])  # torn
    assert cli(["migrate", str(out), "--allow-pending"]) == 1
    err = capsys.readouterr().err
    assert str(ledger) in err and f"vlpcache verify {out}" in err and "unchanged" in err
    assert load_store_meta(Layout(out)).format_version == 1
    shutil.copy(FIXTURES / "store_v1_zarr" / "ledgers" / "shard-000001.json", ledger)  # restored
    staging_path(out).rename(tmp_path / "elsewhere")  # a folder that is not migrate's is never taken over
    (tmp_path / "elsewhere" / MARKER).unlink()
    (tmp_path / "elsewhere").rename(staging_path(out))
    with pytest.raises(StoreError, match="is not a vlpcache migration folder"):
        migrate_store(out, allow_pending=True)
    shutil.rmtree(staging_path(out))
    assert migrate_store(out, allow_pending=True).action == "migrated"
    h5 = v1_store(tmp_path / "h", "hdf5", complete=False)
    shard = h5 / "shards" / "shard-000001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard}: .* bytes with crc32c .*vlpcache verify"):
        migrate_store(h5, allow_pending=True)
    assert load_store_meta(Layout(h5)).format_version == 1
    ids = v1_store(tmp_path / "i", "zarr", complete=False) / "video_ids.json"
    ids.write_text(ids.read_text()[:-5])
    with pytest.raises(StoreError, match=f"{ids}: not a JSON list of video ids .*vlpcache verify"):
        migrate_store(ids.parent, allow_pending=True)


def test_format1_open_logs_the_migrate_hint_once(tmp_path, caplog):
    out = v1_store(tmp_path, "zarr", complete=False)
    with caplog.at_level(logging.WARNING, logger="stores.legacy"):
        for _ in range(3):
            open_store(out).close()
    assert [r.getMessage().count("vlpcache migrate") for r in caplog.records] == [1]


def test_migrate_help_documents_it(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["migrate", "--help"])
    assert e.value.code == 0 and "format-1 store to format 2 in place" in capsys.readouterr().out


# ---- kill -9 at seeded moments

KILLER = """
import os, signal, sys
import stores.migrate as m
kill_at, n = int(sys.argv[2]), [0]
def hook(fn, name):
    def wrapped(*a, **k):
        n[0] += 1
        if name == "exchange":
            print("exchange", n[0], flush=True)
        if n[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
for name in ("replace", "rename", "link", "unlink", "fsync", "mkdir", "rmdir", "symlink"):
    setattr(os, name, hook(getattr(os, name), name))
m._exchange = hook(m._exchange, "exchange")
m.migrate_store(sys.argv[1], allow_pending=True)
print("ops", n[0])
"""


def run_killer(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", KILLER, str(out), str(kill_at)], capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_migrate_survives_kill_9_at_seeded_moments(backend, tmp_path):
    """Count the migration's filesystem steps (rename, link, unlink, fsync, mkdir, rmdir and the swap), then
    SIGKILL a fresh copy at seeded steps (and around the swap): after each kill the store reads exactly as
    before, in one format or the other, and a rerun finishes the migration."""
    src = v1_store(tmp_path, backend, complete=backend == "zarr")
    before = figures(src)
    dry = tmp_path / "dry"
    shutil.copytree(src, dry)
    done = run_killer(dry, 0)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split() for line in done.stdout.split("\n") if line)
    ops, swap = int(lines["ops"]), int(lines["exchange"])
    moments = sorted({*random.Random(9).sample(range(1, ops + 1), 6), swap - 1, swap, swap + 1, ops})
    formats = set()
    for k in moments:
        out = tmp_path / f"k{k}"
        shutil.copytree(src, out)
        killed = run_killer(out, k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        formats.add(load_store_meta(Layout(out)).format_version)
        assert figures(out) == before, f"killed at step {k} of {ops}: the store reads differently"
        migrate_store(out, allow_pending=True)
        assert figures(out) == before and load_store_meta(Layout(out)).format_version == 2, k
        assert not staging_path(out).exists() and not (out / MARKER).exists(), k
        assert verify_store(out).exit_code == (0 if backend == "zarr" else 2), k
        assert json.loads((out / "store.json").read_text())["format_version"] == 2
        shutil.rmtree(out)
    assert formats == {1, 2}  # kills landed both before and after the swap


def test_verify_rebuilds_the_id_table_the_writer_wrote_past_one_insert_slice(tmp_path):
    """Stores of more than INSERT_SLICE ids (8,192) failed verify, the migrated 100k bench store among them:
    rebuild_table inserted a batch at once, the writer by home slot a slice at a time, and linear probing
    places ids by insertion order."""
    import pyarrow as pa

    from stores.idindex import BATCH, INSERT_SLICE, TABLE_FILE, rebuild_table, write_id_index

    n = BATCH + 3 * INSERT_SLICE  # two batches, the first of several slices
    ids = [f"v{i}" for i in range(n)]
    write_id_index(tmp_path / "index", iter(ids), n)
    assert np.array_equal(np.load(tmp_path / "index" / TABLE_FILE), rebuild_table(pa.chunked_array([ids]), n))


def test_json_ids_streams_format1_video_ids(tmp_path):
    from stores.migrate import json_ids

    ids = ["a", 'q"uo\\te', "\u00e9t\u00e9 \U0001f600", "", "x" * 50, "\\u0041"]
    path = tmp_path / "video_ids.json"
    for text in (json.dumps(ids), json.dumps(ids, indent=1), json.dumps(ids, ensure_ascii=False), "[]", " [ ] \n"):
        path.write_text(text, encoding="utf-8")
        for block in (1, 2, 3, 7, 1 << 20):  # ids and escapes cut at every place
            assert list(json_ids(path, block)) == json.loads(text), (text, block)
    for text in ('["a", "b"', '["a",]', '["a" "b"]', '["a", 5]', '{"a": 1}', '["a"] x', '["a', ""):
        path.write_text(text)
        with pytest.raises(StoreError, match="not a JSON list of video ids"):
            list(json_ids(path, 2))
