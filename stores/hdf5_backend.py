"""HDF5 backend: one file per pipeline shard under OUT/shards/, plus OUT/features.h5.

A shard file holds the schema's datasets for its rows ([rows, ...], chunk = one video, fletcher32
checksum per chunk, no compression) and their row_status. OUT/features.h5 holds one virtual dataset
per array, written once at creation, whose size does not depend on the number of shards: two mappings,
a printf-style one (`shards/shard-%b.h5`, block b = rows [b*S, (b+1)*S)) for every shard but the last,
and one for the last shard's file `shards/shard-<s>-last.h5` (named apart so that the pattern never
covers it and the dataset keeps exactly N rows). HDF5 reads a missing source as the fill value (and
follows the pattern up to the first missing file), so features.h5 never has to be rebuilt as shards
arrive. Files are written with the HDF5 1.10 format (libver v110) so h5dump/h5ls 1.10 read them.
"""
from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import crc32c
import h5py
import numpy as np

from h5py import h5d, h5p, h5s, h5t

from stores.errors import StoreError
from stores.io import durable_replace, fsync_path, makedirs_durable
from stores.ledger import FileRecord, Layout, StoreMeta
from stores.schema import ARRAYS, ROW_STATUS

LIBVER = ("earliest", "v110")
FLETCHER_BYTES = 4


PATTERN = "shards/shard-%b.h5"  # relative: HDF5 resolves it against the directory of features.h5


def shard_path(layout: Layout, meta: StoreMeta, shard: int) -> Path:
    if meta.format_version < 2:
        return layout.h5_shard(shard)
    last = "-last" if shard == meta.n_shards - 1 else ""
    return layout.h5_shards / f"shard-{shard}{last}.h5"


def init_layout(layout: Layout, meta: StoreMeta) -> None:
    makedirs_durable(layout.h5_shards)
    tmp = layout.out / f".features.h5.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as f:
            f.attrs["vlpcache_format_version"] = meta.format_version
            for spec in (*ARRAYS.values(), ROW_STATUS):
                _create_virtual(f, spec, layout, meta)
        fsync_path(tmp)
        durable_replace(tmp, layout.h5)
    finally:
        tmp.unlink(missing_ok=True)
    validate_layout(layout, meta, deep=True)


def _create_virtual(f: h5py.File, spec, layout: Layout, meta: StoreMeta) -> None:
    """[N, ...] virtual dataset: the pattern maps full shards 0..n-2, one mapping the last shard."""
    shape, S, N = spec.shape(meta.dims), meta.shard_size, meta.n_videos
    ones, zeros = (1,) * len(shape), (0,) * len(shape)
    dtype = spec.dtype.newbyteorder("<")
    space = lambda: h5s.create_simple((N, *shape), (h5s.UNLIMITED, *shape))  # noqa: E731
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_fill_value(np.array(spec.fill, dtype=dtype))
    name = spec.name.encode()
    if meta.n_shards > 1:
        virtual = space()
        virtual.select_hyperslab((0, *zeros), (h5s.UNLIMITED, *ones), stride=(S, *ones), block=(S, *shape))
        dcpl.set_virtual(virtual, PATTERN.encode(), name, h5s.create_simple((S, *shape)))
    last = meta.shard_rows(meta.n_shards - 1)
    virtual = space()
    virtual.select_hyperslab((last.start, *zeros), (1, *ones), block=(len(last), *shape))
    src = str(shard_path(layout, meta, meta.n_shards - 1).relative_to(layout.out)).encode()
    dcpl.set_virtual(virtual, src, name, h5s.create_simple((len(last), *shape)))
    h5d.create(f.id, name, h5t.py_create(dtype), space(), dcpl=dcpl)


def validate_layout(layout: Layout, meta: StoreMeta, deep: bool = False) -> None:
    """features.h5 exists; deep (verify, creation): every dataset's dtype, shape and mappings. Opening a
    virtual dataset makes HDF5 look for its source files, so writers and readers skip the deep check."""
    if not layout.h5.exists():
        raise StoreError(f"{layout.h5} is missing: not a complete vlpcache HDF5 store; re-extract")
    if not deep:
        return
    try:
        with h5py.File(layout.h5, "r") as f:
            for spec in ARRAYS.values() if meta.format_version < 2 else ():
                _check_dataset(f, spec, (meta.n_videos, *spec.shape(meta.dims)), layout.h5)
            for spec in (*ARRAYS.values(), ROW_STATUS) if meta.format_version >= 2 else ():
                _check_virtual(f, spec, layout, meta)
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:  # h5py's errors for damaged metadata
        raise StoreError(f"{layout.h5}: cannot be read as vlpcache's HDF5 virtual file ({type(e).__name__}: {e}); it is "
                         f"written once, when the store is created, and holds no features: restore it from a backup, "
                         f"or re-extract into a new --out") from e


def _check_virtual(f: h5py.File, spec, layout: Layout, meta: StoreMeta) -> None:
    """dtype and mappings of a format-2 virtual dataset, read from its creation properties: asking for
    its shape would make HDF5 open the shard files, whose damage verify reports per shard."""
    if spec.name not in f:
        raise StoreError(f"{layout.h5}: dataset {spec.name!r} is missing; the file was not written by vlpcache or is damaged")
    ds = f[spec.name]
    if ds.dtype != spec.dtype.newbyteorder("<"):
        raise StoreError(f"{layout.h5}: dataset {spec.name!r} has dtype {ds.dtype}, but the schema needs {spec.dtype}; re-extract")
    dcpl = ds.id.get_create_plist()
    want = ([PATTERN] if meta.n_shards > 1 else []) + [str(shard_path(layout, meta, meta.n_shards - 1).relative_to(layout.out))]
    got = [dcpl.get_virtual_filename(i) for i in range(dcpl.get_virtual_count())] if ds.is_virtual else []
    shape = (meta.n_videos, *spec.shape(meta.dims))
    if got != want or any(dcpl.get_virtual_vspace(i).shape != shape for i in range(len(got))):
        raise StoreError(f"{layout.h5}: dataset {spec.name!r} maps {got}, expected {want} with shape {shape}; "
                         f"the file was not written by vlpcache (format {meta.format_version}) or is damaged: re-extract")


def _check_dataset(f: h5py.File, spec, shape: tuple[int, ...], path: Path) -> h5py.Dataset:
    name = spec.name
    if name not in f:
        raise StoreError(f"{path}: dataset {name!r} is missing; the file was not written by vlpcache or is damaged")
    ds = f[name]
    if ds.dtype != spec.dtype.newbyteorder("<"):
        raise StoreError(f"{path}: dataset {name!r} has dtype {ds.dtype}, but the schema needs {spec.dtype}; re-extract")
    if ds.shape != shape:
        raise StoreError(f"{path}: dataset {name!r} has shape {ds.shape}, expected {shape}; re-extract")
    return ds


def status_files(layout: Layout, meta: StoreMeta, shard: int) -> list[Path]:
    return [shard_path(layout, meta, shard)]  # row_status lives inside the shard file: removing it makes the rows pending


class HDF5ShardSink:
    """Writes one shard file under a partial name; closed and renamed by the shard writer."""

    def __init__(self, layout: Layout, meta: StoreMeta, shard: int, partial_dir: Path) -> None:
        self.layout, self.meta, self.shard = layout, meta, shard
        self.path = partial_dir / "shard.h5"
        rows = meta.shard_rows(shard)
        self.file = h5py.File(self.path, "w", libver=LIBVER, track_order=True)
        self.file.attrs["vlpcache_format_version"] = meta.format_version
        self.file.attrs["shard"] = shard
        self.file.attrs["row_start"] = rows.start
        for spec in ARRAYS.values():
            shape = spec.shape(meta.dims)
            self.file.create_dataset(
                spec.name, shape=(len(rows), *shape), chunks=(1, *shape), dtype=spec.dtype.newbyteorder("<"),
                fletcher32=True, fillvalue=spec.fill, track_times=False,
            )

    def write(self, local: int, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            self.file[name][local] = a

    def keep(self, local: int, prev: HDF5ShardReader) -> None:
        self.write(local, {name: prev.read(name, local) for name in ARRAYS})

    def finish(self, status: np.ndarray) -> list[tuple[Path, Path, str, FileRecord]]:
        """status: [rows] int8 row statuses, stored in the same file (so they appear with the data, atomically)."""
        self.file.create_dataset(ROW_STATUS.name, data=np.asarray(status, dtype=ROW_STATUS.dtype), track_times=False)
        self.file.close()
        crc = 0
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
            while block := f.read(1 << 22):
                crc = crc32c.crc32c(block, crc)
        final = shard_path(self.layout, self.meta, self.shard)
        record = FileRecord(path=str(final.relative_to(self.layout.out)), nbytes=self.path.stat().st_size, crc32c=crc)
        return [(self.path, final, "shard", record)]

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class HDF5ShardReader:
    """One committed shard file. Unchecked reads copy chunk bytes straight from an mmap of the file via
    the chunk's offset in the file; checked reads go through h5py, whose filter verifies fletcher32."""

    def __init__(self, layout: Layout, meta: StoreMeta, shard: int, files: dict[str, FileRecord], check: bool) -> None:
        self.meta, self.shard, self.check = meta, shard, check
        if "shard" not in files:
            raise StoreError(f"shard {shard}: ledger lists no shard file; the ledger is damaged: re-extract the shard")
        self.path = layout.out / files["shard"].path
        self.map = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != files["shard"].nbytes:
                    raise StoreError(f"{self.path}: {size} bytes on disk, but the ledger recorded {files['shard'].nbytes}; the file is truncated or was replaced: re-extract the shard")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.file = h5py.File(self.path, "r")
        except FileNotFoundError as e:
            raise StoreError(f"{self.path} is missing but its shard's ledger says it was committed; re-extract the shard") from e
        except OSError as e:
            raise StoreError(f"{self.path}: cannot be opened as HDF5 ({e}); the file is corrupt: re-extract the shard") from e
        rows = len(meta.shard_rows(shard))
        self.datasets = {
            spec.name: _check_dataset(self.file, spec, (rows, *spec.shape(meta.dims)), self.path) for spec in ARRAYS.values()
        }
        self.offsets: dict[tuple[str, int], int] = {}  # (array, local row) -> chunk offset in the file
        self.layouts = {name: (spec.shape(meta.dims), spec.dtype.newbyteorder("<"), int(np.prod(spec.shape(meta.dims))))
                        for name, spec in ARRAYS.items()}

    def read(self, name: str, local: int) -> np.ndarray:
        """One video's chunk: a read-only view of the mmap (unchecked) or a fresh array (checked)."""
        if self.check:
            try:
                return self.datasets[name][local]
            except OSError as e:
                raise StoreError(f"{self.path}: dataset {name!r} row {self._row(local)} fails its fletcher32 checksum ({e}); the file is corrupt: re-extract the shard") from e
        shape, dtype, count = self.layouts[name]
        offset = self.offsets.get((name, local))
        if offset is None:
            offset = self.offsets[(name, local)] = self._chunk_offset(name, local)
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def _chunk_offset(self, name: str, local: int) -> int:
        shape, dtype, count = self.layouts[name]
        info = self.datasets[name].id.get_chunk_info_by_coord((local,) + (0,) * len(shape))
        if info.byte_offset is None:
            raise StoreError(f"{self.path}: no chunk stored for dataset {name!r} row {self._row(local)}, which the ledger says is ok; the shard is damaged: re-extract it")
        if info.size != count * dtype.itemsize + FLETCHER_BYTES or info.filter_mask != 0 or info.byte_offset + info.size > len(self.map):
            raise StoreError(f"{self.path}: chunk of dataset {name!r} row {self._row(local)} has an unexpected size/filter; the file is corrupt")
        return info.byte_offset

    def _row(self, local: int) -> int:
        return self.shard * self.meta.shard_size + local

    def stored_rows(self, name: str) -> set[int]:
        """Local rows that have a chunk allocated in this shard file."""
        dsid = self.datasets[name].id
        return {int(dsid.get_chunk_info(i).chunk_offset[0]) for i in range(dsid.get_num_chunks())}

    def close(self) -> None:
        if getattr(self, "file", None) is not None and self.file.id.valid:
            self.file.close()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass
