"""Convert a format-1 store to format 2 in place (`vlpcache migrate OUT`), crash-safe at every moment.

Format 1 and 2 differ in metadata only (docs/store-format.md): format 2 adds the id index, one rows part
and one row_status per shard, small ledgers, and (HDF5) shard files that hold their row_status under a
new name, with a constant-size features.h5. The Zarr feature chunk files are the same bytes in both.

How, so that OUT is a complete store of one format or the other at every moment:

1. Build the format-2 store beside OUT, in the staging folder `.<name>.vlpcache-migrate` of OUT's parent:
   new metadata, index, rows parts, row statuses and ledgers (each written atomically: *.partial, fsync,
   rename), Zarr chunk files hard-linked (no byte of them is written), HDF5 shard files copied to their
   format-2 name with row_status added (HDF5 cannot add a dataset crash-safely to a file readers use),
   and every non-store file of OUT (the pipeline's config, runs/, the job lock) hard-linked. A shard is
   done in staging when its ledger is there (written last), so a re-run after a kill skips it; store.json
   (format 2) is written last.
2. Swap OUT and the staging folder in one atomic rename (renameat2 RENAME_EXCHANGE): before it OUT is
   the untouched format-1 store, after it the complete format-2 one. The marker file MARKER travels
   with the new tree into OUT.
3. Delete the old tree (now at the staging path), then the marker. A re-run that finds the marker in a
   format-2 OUT finishes this step.

The caller holds OUT's job lock (`vlpcache migrate` takes pipeline/lock.py's, as extract does).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np

from stores.arrow_buffers import check_sidecar, sidecar_bytes, sidecar_path
from stores.backends import BACKENDS
from stores.errors import StoreError
from stores.idindex import IDS_FILE, write_id_index
from stores.io import atomic_write_bytes, atomic_write_json, durable_replace, fsync_path, makedirs_durable
from stores.ledger import FileRecord, Layout, ShardLedger, StoreMeta, committed_shards, load_ledger, load_store_meta
from stores.legacy import LedgerV1
from stores.rows import write_rows
from stores.schema import FORMAT_VERSION, ROW_STATUS, STATUS_CODES

log = logging.getLogger(__name__)

MARKER = ".vlpcache-migrate.json"  # in the staging folder; in OUT from the swap until the old tree is gone
# The format-1 store's own files: rebuilt in staging, never linked. Everything else in OUT is linked.
STORE_ENTRIES = {"store.json", "video_ids.json", "ledgers", "features.zarr", "features.h5", "shards", "index", "rows",
                 ".partial", MARKER}
_CRC_BYTES = 4
_COPY_BLOCK = 1 << 22


@dataclass(frozen=True)
class MigrateResult:
    out: Path
    action: str  # "migrated" | "finished" (a killed migration's cleanup) | "sidecars" (added to format 2) | "already"
    shards: int = 0  # committed shards converted
    resumed: int = 0  # of them, found already done in staging (a re-run after a kill)


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.vlpcache-migrate"


def migrate_store(out: str | Path, *, allow_pending: bool = False) -> MigrateResult:
    """Convert the format-1 store OUT to format 2 in place; a format-2 OUT is left as is ("already"),
    unless a killed migration left its cleanup to do. StoreError (naming the file) when it cannot."""
    out = Path(out)
    layout = Layout(out)
    meta = load_store_meta(layout)  # "not a vlpcache store" names the path
    out = out.resolve()  # the swap renames the real folder, not a symlink to it
    layout, staging = Layout(out), staging_path(out)
    if meta.format_version >= 2:
        if (out / MARKER).exists():
            _finish(out, staging)
            return MigrateResult(out, "finished")
        added = add_sidecars(layout, meta)
        return MigrateResult(out, "sidecars", shards=added) if added else MigrateResult(out, "already")
    _check_migratable(layout, meta, staging, allow_pending)
    shards, resumed = _build(layout, meta, staging)
    _exchange(out, staging)
    log.info("%s is now a format-2 store; removing the format-1 files (%s)", out, staging)
    _finish(out, staging)
    return MigrateResult(out, "migrated", shards, resumed)


def add_sidecars(layout: Layout, meta: StoreMeta) -> int:
    """A format-2 store written before buffer sidecars (stores/arrow_buffers.py) gets them, so that its
    readers need no pyarrow: the id index's, then each committed shard's, recorded in a rewritten ledger.
    Each sidecar is put in place before its ledger names it: a kill leaves a correct sidecar that a re-run
    records. A sidecar that is missing or does not match its file is (re)written; returns how many files
    got one. The Arrow files themselves are not touched, and each rows part is first checked against its
    ledger's crc32c (a sidecar must describe the committed bytes)."""
    done = 0
    ids = layout.index / IDS_FILE
    if ids.exists() and (not sidecar_path(ids).exists() or check_sidecar(ids)):
        atomic_write_bytes(sidecar_path(ids), sidecar_bytes(ids))
        done += 1
    for shard in sorted(committed_shards(layout)):
        ledger = load_ledger(layout, meta, shard)
        rows = layout.out / ledger.files["rows"].path
        if "rows_buffers" in ledger.files and not check_sidecar(rows):
            continue
        data = rows.read_bytes() if rows.exists() else b""
        if (len(data), crc32c.crc32c(data)) != (ledger.files["rows"].nbytes, ledger.files["rows"].crc32c):
            raise _damaged(rows, "missing, or not the bytes its shard's ledger recorded", layout.out)
        sidecar = sidecar_bytes(rows)
        atomic_write_bytes(sidecar_path(rows), sidecar)
        record = FileRecord(str(sidecar_path(rows).relative_to(layout.out)), len(sidecar), crc32c.crc32c(sidecar))
        atomic_write_json(layout.ledger(shard), replace(ledger, files={**ledger.files, "rows_buffers": record}).to_json())
        done += 1
    return done


def _check_migratable(layout: Layout, meta: StoreMeta, staging: Path, allow_pending: bool) -> None:
    out = layout.out
    pending = meta.n_shards - len(committed_shards(layout))
    if pending and not allow_pending:
        raise StoreError(
            f"{out} has {pending} of {meta.n_shards} shards pending: a format-1 extraction may still be writing it. "
            f"Finish it with the vlpcache that started it ({meta.code_version}), then migrate; or, if no extraction "
            f"runs on it any more, `vlpcache migrate {out} --allow-pending` converts it, and rerunning its extract "
            f"command (same manifest and config) with this vlpcache then extracts only the pending shards")
    if staging.exists() and not (staging / MARKER).exists():
        raise StoreError(f"{staging} exists and is not a vlpcache migration folder (no {MARKER}); migrate builds the "
                         f"new store there: move it away, then rerun")
    if (staging / MARKER).exists():
        mark = json.loads((staging / MARKER).read_text())
        if mark.get("source") != str(out) or mark.get("provenance_hash") != meta.provenance_hash:
            raise StoreError(f"{staging / MARKER}: a migration folder of another store ({mark.get('source')}); "
                             f"remove {staging}, then rerun")
    if meta.backend == "hdf5":  # shard files are copied (see the module doc): room for one more copy of them
        need = sum(p.stat().st_size for p in layout.h5_shards.glob("shard-*.h5"))
        free = shutil.disk_usage(out.parent).free
        if need > free:
            raise StoreError(f"migrating the HDF5 store {out} copies its shard files once ({need / 1e9:.1f} GB) and "
                             f"{out.parent} has {free / 1e9:.1f} GB free; free space, then rerun")


def _build(layout: Layout, meta: StoreMeta, staging: Path) -> tuple[int, int]:
    """The complete format-2 store in staging (store.json last). Returns (shards converted, found done)."""
    new_meta = StoreMeta(**{**meta.__dict__, "format_version": FORMAT_VERSION})
    new = Layout(staging)
    if not (staging / MARKER).exists():
        makedirs_durable(staging)
        atomic_write_json(staging / MARKER, {"source": str(layout.out), "provenance_hash": meta.provenance_hash})
    backend = BACKENDS[meta.backend]
    backend.validate_layout(layout, meta, deep=True)  # the format-1 arrays are what format 2 expects
    if not (new.zarr if meta.backend == "zarr" else new.h5).exists():
        backend.init_layout(new, new_meta)  # arrays + row_status metadata (Zarr) or features.h5: atomic
    makedirs_durable(new.ledgers)
    if not new.index.exists() and layout.video_ids_json.exists():
        tmp = staging / ".index.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_id_index(tmp, json_ids(layout.video_ids_json), meta.n_videos)
        except (StoreError, UnicodeDecodeError) as e:
            raise _damaged(layout.video_ids_json, str(e), layout.out) from e
        durable_replace(tmp, new.index)
    shards = sorted(committed_shards(layout))
    resumed = 0
    for i, shard in enumerate(shards):
        if new.ledger(shard).exists():
            resumed += 1
            continue
        _convert_shard(layout, meta, new, new_meta, shard)
        if (i + 1) % 1000 == 0:
            log.info("migrate %s: %d of %d shards converted", layout.out, i + 1, len(shards))
    _link_other_files(layout.out, staging)
    atomic_write_json(new.store_json, new_meta.to_json())
    return len(shards), resumed


def json_ids(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """The ids of format 1's video_ids.json (one JSON list of strings), streamed: json.load would hold them
    all (about 85 MB per 1M ids). StoreError when the file is not such a list."""
    decode = json.JSONDecoder().raw_decode
    bad = lambda why: StoreError(f"not a JSON list of video ids ({why})")  # noqa: E731
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, state = "", 0, False, "["  # state: what comes next: "[", "first", "id", "sep", "end"
        while state != "end":
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            c = buf[pos] if pos < len(buf) else ""
            if state in ("first", "id") and c == '"':
                try:
                    value, end = decode(buf, pos)
                except json.JSONDecodeError as e:  # an id cut at the end of the block: read on
                    if eof:
                        raise bad(e) from e
                    c = ""
                else:
                    yield value
                    pos, state = end, "sep"
                    continue
            if not c:  # the block is used up (or ends inside an id): read the next one
                if eof:
                    raise bad("it ends inside the list")
                chunk = f.read(block)
                buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            elif (state, c) in (("[", "["), ("sep", ",")):
                pos, state = pos + 1, "first" if c == "[" else "id"
            elif state in ("first", "sep") and c == "]":
                pos, state = pos + 1, "end"
            else:
                raise bad(f"unexpected {c!r} where {state!r} belongs")
        if (buf[pos:] + f.read()).strip():
            raise bad("text after the list")


def _convert_shard(layout: Layout, meta: StoreMeta, new: Layout, new_meta: StoreMeta, shard: int) -> None:
    """Shard `shard`'s format-2 files in staging, its ledger last."""
    try:
        old = load_ledger(layout, meta, shard, LedgerV1)
    except StoreError as e:
        raise StoreError(f"{e}. migrate stops here and OUT is unchanged: run `vlpcache verify {layout.out}` to see "
                         f"every damaged file") from e
    status = np.array([STATUS_CODES[v.status] for v in old.videos], dtype=ROW_STATUS.dtype)  # [rows] 1 ok / 2 failed
    if meta.backend == "zarr":
        files = {key: _link(layout, new, rec) for key, rec in old.files.items()}
        files["row_status"] = _write_row_status(new, new_meta, shard, status)
    else:
        files = {"shard": _copy_h5_shard(layout, new, new_meta, shard, old.files, status)}
    files["rows_buffers"], files["rows"] = _write_rows_part(new, shard, old)
    ledger = ShardLedger(shard=shard, row_start=old.row_start, row_stop=old.row_stop, counts=old.counts, files=files,
                         provenance_hash=meta.provenance_hash, backend=meta.backend, code_version=old.code_version,
                         failures=tuple((v.video_id, v.error or "") for v in old.videos if v.status == "failed"))
    for folder in {(new.out / rec.path).parent for rec in files.values()}:  # the links and renames above
        fsync_path(folder)
    atomic_write_json(new.ledger(shard), ledger.to_json())


def _damaged(path: Path, why: str, out: Path) -> StoreError:
    return StoreError(f"{path}: {why}; migrate stops here and {out} is unchanged: run `vlpcache verify {out}`")


def _link(layout: Layout, new: Layout, rec: FileRecord) -> FileRecord:
    """A committed Zarr data file, hard-linked into staging: the same bytes, nothing written."""
    src, dst = layout.out / rec.path, new.out / rec.path
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        raise _damaged(src, "missing, but its shard's ledger says it was committed", layout.out) from None
    if size != rec.nbytes:
        raise _damaged(src, f"{size} bytes, the ledger recorded {rec.nbytes}", layout.out)
    makedirs_durable(dst.parent)
    if dst.exists() and not os.path.samefile(src, dst):
        dst.unlink()
    if not dst.exists():
        os.link(src, dst)
    return rec


def _write_row_status(new: Layout, meta: StoreMeta, shard: int, status: np.ndarray) -> FileRecord:
    """The shard's row_status chunk as the Zarr writer stores it: [shard_size] int8 (padded with 0) + crc32c."""
    from stores.zarr_backend import row_status_path

    chunk = np.zeros(meta.shard_size, dtype=ROW_STATUS.dtype)
    chunk[: len(status)] = status
    data = chunk.tobytes() + crc32c.crc32c(chunk.tobytes()).to_bytes(_CRC_BYTES, "little")
    path = row_status_path(new, shard)
    atomic_write_bytes(path, data)
    return FileRecord(str(path.relative_to(new.out)), len(data), crc32c.crc32c(data))


def _write_rows_part(new: Layout, shard: int, old: LedgerV1) -> tuple[FileRecord, FileRecord]:
    """The rows part and its buffer sidecar, each put into place; their records (sidecar, part)."""
    final = new.rows_part(shard)
    makedirs_durable(final.parent)
    partial = final.with_name(final.name + ".partial")
    sidecar = write_rows(partial, shard, old.videos, final.name)  # both fsynced
    return _put(sidecar, sidecar_path(final), new), _put(partial, final, new)


def _put(partial: Path, final: Path, new: Layout) -> FileRecord:
    data = partial.read_bytes()
    durable_replace(partial, final)
    return FileRecord(str(final.relative_to(new.out)), len(data), crc32c.crc32c(data))


def _copy_h5_shard(layout: Layout, new: Layout, new_meta: StoreMeta, shard: int, files: dict[str, FileRecord],
                   status: np.ndarray) -> FileRecord:
    """The format-1 shard file copied (checked against its ledger on the way) to its format-2 name, with the
    row statuses added and the format attribute set to 2. Chunk bytes are copied, never re-encoded."""
    import h5py

    from stores.hdf5_backend import LIBVER, shard_path

    if "shard" not in files:
        raise _damaged(layout.ledger(shard), "ledger lists no shard file", layout.out)
    rec = files["shard"]
    src, final = layout.out / rec.path, shard_path(new, new_meta, shard)
    partial = final.with_name(final.name + ".partial")
    makedirs_durable(final.parent)
    crc, size = 0, 0
    try:
        with open(src, "rb") as fin, open(partial, "wb") as fout:
            while block := fin.read(_COPY_BLOCK):
                crc, size = crc32c.crc32c(block, crc), size + len(block)
                fout.write(block)
    except FileNotFoundError:
        raise _damaged(src, "missing, but its shard's ledger says it was committed", layout.out) from None
    if (size, crc) != (rec.nbytes, rec.crc32c):
        partial.unlink()
        raise _damaged(src, f"{size} bytes with crc32c {crc:08x}, the ledger recorded {rec.nbytes} bytes with "
                            f"{rec.crc32c:08x}", layout.out)
    with h5py.File(partial, "r+", libver=LIBVER) as f:
        f.create_dataset(ROW_STATUS.name, data=status, track_times=False)
        f.attrs["vlpcache_format_version"] = FORMAT_VERSION
    crc = 0
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
        while block := f.read(_COPY_BLOCK):
            crc = crc32c.crc32c(block, crc)
    durable_replace(partial, final)
    return FileRecord(str(final.relative_to(new.out)), final.stat().st_size, crc)


def _link_other_files(out: Path, staging: Path) -> None:
    """Hard-link every file of OUT that is not part of the store (pipeline config, runs/, job lock) into
    staging, so the swap keeps them. Relinked on every run: the job lock's lease file is replaced as it renews.
    Every folder it links into is fsynced (the links must survive a crash after the swap)."""
    folders = []
    for entry in out.iterdir():
        if entry.name in STORE_ENTRIES or entry.name.endswith(".partial"):
            continue
        for src in [entry] if not entry.is_dir() or entry.is_symlink() else [entry, *entry.rglob("*")]:
            dst = staging / src.relative_to(out)
            if src.is_symlink():
                if not dst.is_symlink():
                    os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                dst.mkdir(exist_ok=True)
                folders.append(dst)
            else:
                if dst.exists() and not os.path.samefile(src, dst):
                    dst.unlink()
                if not dst.exists():
                    os.link(src, dst)
    for folder in [*folders, staging]:  # after their entries: the links must survive a crash after the swap
        fsync_path(folder)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE), durably."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise StoreError("migrate swaps the old and new store in one atomic step, which needs Linux renameat2 "
                         f"(glibc 2.28 or later); {b} holds the complete format-2 store: nothing in {a} was changed")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"could not swap {a} with the new store {b} ({os.strerror(err)}): migrate needs a filesystem "
                         f"with atomic folder exchange (ext4, xfs, btrfs, tmpfs; not NFS); {a} is unchanged: copy the "
                         f"store to such a filesystem and migrate it there")
    fsync_path(a.parent)


def _finish(out: Path, staging: Path) -> None:
    """After the swap: staging holds the old format-1 tree (it never has a MARKER); remove it, then OUT's marker."""
    if staging.exists():
        if (staging / MARKER).exists():  # cannot happen after a swap: refuse rather than delete a new store
            raise StoreError(f"{staging} holds an unfinished migration of another store; remove it by hand")
        shutil.rmtree(staging)
        fsync_path(out.parent)
    (out / MARKER).unlink(missing_ok=True)
    fsync_path(out)
