"""Re-read every file of a store: store-wide metadata and id index, then every shard's ledger, file sizes
and checksums, rows part, row statuses, every chunk and the counts.

Shard files are checked against the sizes and crc32c their ledger recorded. Store-wide files are written
once, at creation, and no checksum of them is recorded: each is checked against what it must hold (the
array metadata against the schema, the group attributes against store.json, features.h5's virtual
mappings, and the id table rebuilt from the ids it indexes), so a flipped byte that changes anything a
reader sees is caught."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import h5py
import numpy as np
import pyarrow as pa

from stores.arrow_buffers import check_sidecar, sidecar_path
from stores.backends import BACKENDS
from stores.errors import StoreError
from stores.hdf5_backend import shard_path
from stores.idindex import IDS_FILE, SLOT, TABLE_FILE, rebuild_table
from stores.ledger import Layout, ShardLedger, StoreMeta, committed_shards, load_ledger, load_store_meta
from stores.legacy import LedgerV1, load_video_ids
from stores.rows import ShardRows
from stores.schema import ARRAYS, STATUS_CODES



@dataclass
class VerifyReport:
    out: Path
    store_error: str | None = None  # the store as a whole cannot be read (metadata, format version, dtype)
    bad: dict[int, list[str]] = field(default_factory=dict)  # shard -> problems
    incomplete: dict[int, str] = field(default_factory=dict)  # shard -> data files but no ledger
    pending: list[int] = field(default_factory=list)  # no ledger, no data
    good: list[int] = field(default_factory=list)
    videos_checked: int = 0

    @property
    def fix(self) -> list[str]:
        """What to do, in order: one line per step (empty when the store is complete and intact)."""
        out = self.out
        steps = []
        if self.store_error:
            steps.append(f"first the store-wide file named above: {self.store_error.split(';')[-1].strip()}; "
                         f"then verify again (no shard was checked)")
        if self.bad:
            ledgers = " ".join(str(Layout(out).ledger(s)) for s in sorted(self.bad))
            steps.append(f"redo the {len(self.bad)} bad shard(s) {sorted(self.bad)}: rm {ledgers}")
        if self.bad or self.incomplete or self.pending:
            saved = out / "extract_config.yaml"  # the resolved config `vlpcache extract` saves in OUT
            command = (f"`vlpcache extract --config {saved} --out {out}`" if saved.exists() else
                       f"the extract command that made {out} (same manifest and config)")
            steps.append(f"{'then ' if self.bad else ''}rerun {command}: it redoes only the shards without a "
                         f"ledger and keeps the others")
        return steps

    @property
    def ok(self) -> bool:
        return self.store_error is None and not self.bad and not self.incomplete and not self.pending

    @property
    def exit_code(self) -> int:
        """0: complete and intact; 1: corrupt (store or shards); 2: intact but not complete."""
        if self.store_error or self.bad:
            return 1
        return 2 if self.incomplete or self.pending else 0

    def to_json(self) -> dict:
        return {
            "out": str(self.out), "ok": self.ok, "store_error": self.store_error,
            "bad_shards": {str(k): v for k, v in sorted(self.bad.items())},
            "incomplete_shards": {str(k): v for k, v in sorted(self.incomplete.items())},
            "pending_shards": self.pending, "good_shards": len(self.good), "videos_checked": self.videos_checked,
            "fix": self.fix,
        }


def verify_store(out: str | Path) -> VerifyReport:
    layout = Layout(out)
    report = VerifyReport(out=layout.out)
    try:
        meta = load_store_meta(layout)
        BACKENDS[meta.backend].validate_layout(layout, meta, deep=True)
        ids = _check_ids(layout, meta)
    except StoreError as e:
        report.store_error = str(e)
        return report
    committed = committed_shards(layout)
    for shard in sorted(s for s in committed if s >= meta.n_shards):
        report.bad[shard] = [f"{layout.ledger(shard)}: ledger of a shard beyond this store's {meta.n_shards} shards"]
    for shard in range(meta.n_shards):
        if shard not in committed:
            leftovers = _data_files(layout, meta, shard)
            if leftovers:
                report.incomplete[shard] = (f"data files without a ledger ({leftovers[0]}{' ...' if len(leftovers) > 1 else ''}): "
                                            f"an interrupted write or a deleted ledger; the shard is pending and is redone by extract")
            else:
                report.pending.append(shard)
            continue
        problems = _verify_shard(layout, meta, shard, ids)
        if problems:
            report.bad[shard] = problems
        else:
            report.good.append(shard)
            report.videos_checked += len(meta.shard_rows(shard))
    return report


def _check_ids(layout: Layout, meta: StoreMeta) -> pa.ChunkedArray | list[str] | None:
    """The store's manifest ids in row order (format 2: index/, format 1: video_ids.json), checked whole;
    None when the store was created without them. StoreError names the damaged file."""
    if meta.format_version < 2:
        return load_video_ids(layout, meta)
    folder = layout.index
    if not folder.exists():
        return None
    fix = (f"the id index is written once, when the store is created: restore {folder} from a backup, or "
           f"re-extract into a new --out")
    try:
        with pa.memory_map(str(folder / IDS_FILE)) as source:
            ids = pa.ipc.open_file(source).read_all().column("video_id")  # [N] utf8
        ids.validate(full=True)  # offsets and utf-8 of every id
    except FileNotFoundError as e:
        raise StoreError(f"{folder / IDS_FILE} is missing; {fix}") from e
    except (OSError, pa.ArrowException, KeyError) as e:
        raise StoreError(f"{folder / IDS_FILE} is damaged ({e}); {fix}") from e
    if len(ids) != meta.n_videos or ids.type != pa.string():
        raise StoreError(f"{folder / IDS_FILE}: {len(ids)} video ids of type {ids.type}, but the store has "
                         f"{meta.n_videos} rows of utf8 ids; {fix}")
    try:
        stored = np.load(folder / TABLE_FILE, mmap_mode="r")  # [M] (hash, row)
    except FileNotFoundError as e:
        raise StoreError(f"{folder / TABLE_FILE} is missing; {fix}") from e
    except Exception as e:  # noqa: BLE001 - numpy parses the header with ast: a damaged one raises anything
        raise StoreError(f"{folder / TABLE_FILE} is damaged ({type(e).__name__}: {e}); {fix}") from e
    if sidecar_path(folder / IDS_FILE).exists():  # readers locate the ids through it: it must be pyarrow's view
        problems = check_sidecar(folder / IDS_FILE)
        if problems:
            raise StoreError(problems[0])
    # The table is a function of the ids (idindex.rebuild_table builds it as the writer does): rebuilt, it
    # must equal the stored one, which catches damage in either file (a changed id hashes elsewhere).
    table = rebuild_table(ids, meta.n_videos)  # [M] (hash, row)
    if stored.dtype != SLOT or stored.shape != table.shape or not np.array_equal(stored, table):
        raise StoreError(f"{folder / TABLE_FILE} does not match the table rebuilt from {IDS_FILE} (dtype "
                         f"{stored.dtype}, {len(stored)} slots): one of the two files is damaged; {fix}")
    return ids


def _check_shard_ids(ids: pa.ChunkedArray | list[str] | None, rows: range, stored: list[str], shard: int, where) -> list[str]:
    """The ids a committed shard recorded must be the store's ids of those rows."""
    if ids is None:
        return []
    expected = ids[rows.start: rows.stop] if isinstance(ids, list) else ids[rows.start: rows.stop].to_pylist()
    if expected == stored:
        return []
    local = next(i for i, (a, b) in enumerate(zip(expected, stored)) if a != b) if len(expected) == len(stored) else 0
    return [f"{where}: row {rows.start + local} holds video {stored[local]!r} but the store's id index says "
            f"{expected[local]!r}; re-extract shard {shard}"]


def _data_files(layout: Layout, meta: StoreMeta, shard: int) -> list[Path]:
    if meta.backend == "hdf5":
        candidates = [shard_path(layout, meta, shard)]
    else:
        candidates = [layout.zarr_shard(name, shard, 1 + len(spec.axes)) for name, spec in ARRAYS.items()]
        candidates += BACKENDS[meta.backend].status_files(layout, meta, shard)
    return [p for p in candidates if p.exists()]


def _verify_shard(layout: Layout, meta: StoreMeta, shard: int, ids: pa.ChunkedArray | list[str] | None) -> list[str]:
    try:
        if meta.format_version >= 2:
            ledger = load_ledger(layout, meta, shard)
        else:
            ledger = load_ledger(layout, meta, shard, LedgerV1)
    except StoreError as e:
        return [str(e)]
    problems = _check_files(layout, ledger)
    if problems:
        return problems
    try:
        if meta.format_version >= 2:
            rows_path = layout.out / ledger.files["rows"].path
            if "rows_buffers" in ledger.files or sidecar_path(rows_path).exists():
                problems += check_sidecar(rows_path)
                if problems:
                    return problems
            part = ShardRows(rows_path, ledger.row_start, ledger.row_stop - ledger.row_start)
            status = part.status  # [rows] int8
            if part.counts != ledger.counts or part.failures() != list(ledger.failures):
                return [f"shard {shard}: the rows part's statuses or failures disagree with the ledger ({ledger.counts})"]
            problems += _check_row_status(layout, meta, ledger, status)
            problems += _check_shard_ids(ids, meta.shard_rows(shard), part.ids(), shard, part.path)
        else:
            status = np.array([STATUS_CODES[v.status] for v in ledger.videos], dtype=np.int8)
            problems += _check_shard_ids(ids, meta.shard_rows(shard), [v.video_id for v in ledger.videos], shard,
                                         layout.ledger(shard))
        reader = BACKENDS[meta.backend].reader(layout, meta, shard, ledger.files, True)
    except StoreError as e:
        return [*problems, str(e)]
    try:
        ok_rows = {int(i) for i in np.flatnonzero(status == 1)}
        for name in ARRAYS:
            stored = reader.stored_rows(name)
            if stored != ok_rows:
                problems.append(f"shard {shard} array {name}: {len(stored)} stored rows but the ledger counts "
                                f"{len(ok_rows)} ok videos (differ at local rows {sorted(stored ^ ok_rows)[:10]})")
                continue
            for local in sorted(ok_rows):
                reader.read(name, local)  # checksum + size checked (check=True)
    except StoreError as e:
        problems.append(str(e))
    finally:
        reader.close()
    return problems


def _check_row_status(layout: Layout, meta: StoreMeta, ledger: ShardLedger, status: np.ndarray) -> list[str]:
    """The row statuses foreign readers see must be the committed ones."""
    if meta.backend == "zarr":
        data = (layout.out / ledger.files["row_status"].path).read_bytes()  # size and crc checked by _check_files
        got = np.frombuffer(data[: len(status)], dtype=np.int8)
    else:
        with h5py.File(layout.out / ledger.files["shard"].path, "r") as f:
            got = f["row_status"][:] if "row_status" in f else None
    if got is None or not np.array_equal(got, status):
        return [f"shard {ledger.shard}: row_status does not match the committed statuses; re-extract the shard"]
    return []


def _check_files(layout: Layout, ledger: ShardLedger | LedgerV1) -> list[str]:
    problems = []
    for key, rec in ledger.files.items():
        path = layout.out / rec.path
        try:
            crc, size = 0, 0
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    crc = crc32c.crc32c(block, crc)
                    size += len(block)
        except FileNotFoundError:
            problems.append(f"{path} ({key}) is missing; re-extract shard {ledger.shard}")
            continue
        if size != rec.nbytes:
            problems.append(f"{path} ({key}): {size} bytes, the ledger recorded {rec.nbytes}: truncated or replaced; re-extract shard {ledger.shard}")
        elif crc != rec.crc32c:
            problems.append(f"{path} ({key}): crc32c {crc:08x}, the ledger recorded {rec.crc32c:08x}: the file is corrupt; re-extract shard {ledger.shard}")
    return problems
