"""Re-read every shard of a store: ledgers, file sizes and checksums, every chunk, counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import h5py
import numpy as np

from stores.backends import BACKENDS
from stores.errors import StoreError
from stores.hdf5_backend import shard_path
from stores.ledger import Layout, ShardLedger, StoreMeta, committed_shards, load_ledger, load_store_meta
from stores.legacy import LedgerV1
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
        }


def verify_store(out: str | Path) -> VerifyReport:
    layout = Layout(out)
    report = VerifyReport(out=layout.out)
    try:
        meta = load_store_meta(layout)
        BACKENDS[meta.backend].validate_layout(layout, meta, deep=True)
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
        problems = _verify_shard(layout, meta, shard)
        if problems:
            report.bad[shard] = problems
        else:
            report.good.append(shard)
            report.videos_checked += len(meta.shard_rows(shard))
    return report


def _data_files(layout: Layout, meta: StoreMeta, shard: int) -> list[Path]:
    if meta.backend == "hdf5":
        candidates = [shard_path(layout, meta, shard)]
    else:
        candidates = [layout.zarr_shard(name, shard, 1 + len(spec.axes)) for name, spec in ARRAYS.items()]
        candidates += BACKENDS[meta.backend].status_files(layout, meta, shard)
    return [p for p in candidates if p.exists()]


def _verify_shard(layout: Layout, meta: StoreMeta, shard: int) -> list[str]:
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
            part = ShardRows(layout.out / ledger.files["rows"].path, ledger.row_start, ledger.row_stop - ledger.row_start)
            status = part.status  # [rows] int8
            if part.counts != ledger.counts or part.failures() != list(ledger.failures):
                return [f"shard {shard}: the rows part's statuses or failures disagree with the ledger ({ledger.counts})"]
            problems += _check_row_status(layout, meta, ledger, status)
        else:
            status = np.array([STATUS_CODES[v.status] for v in ledger.videos], dtype=np.int8)
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
