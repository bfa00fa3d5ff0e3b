"""HDF5 backend: one file per pipeline shard under OUT/shards/, plus OUT/features.h5.

A shard file holds the schema's datasets for its rows ([rows, ...], chunk = one video, fletcher32
checksum per chunk, no compression). OUT/features.h5 holds one virtual dataset per array that maps
every shard file from the start: HDF5 reads a missing source file as the fill value, so the file never
has to be rebuilt when shards arrive and two writers never race to rewrite it. Files are written with
the HDF5 1.10 format (libver v110) so h5dump/h5ls 1.10 read them.
"""
from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import crc32c
import h5py
import numpy as np

from stores.errors import StoreError
from stores.io import durable_replace, fsync_path
from stores.ledger import FileRecord, Layout, StoreMeta
from stores.schema import ARRAYS, ROW_STATUS

LIBVER = ("earliest", "v110")
FLETCHER_BYTES = 4


def init_layout(layout: Layout, meta: StoreMeta) -> None:
    layout.h5_shards.mkdir(parents=True, exist_ok=True)
    tmp = layout.out / f".features.h5.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as f:
            f.attrs["vlpcache_format_version"] = meta.format_version
            for spec in (*ARRAYS.values(), ROW_STATUS):
                shape = spec.shape(meta.dims)
                vds = h5py.VirtualLayout(shape=(meta.n_videos, *shape), dtype=spec.dtype.newbyteorder("<"))
                for shard in range(meta.n_shards):
                    rows = meta.shard_rows(shard)
                    # Relative source path: HDF5 resolves it against the directory of features.h5.
                    src = h5py.VirtualSource(str(layout.h5_shard(shard).relative_to(layout.out)), spec.name, shape=(len(rows), *shape))
                    vds[rows.start: rows.stop] = src
                f.create_virtual_dataset(spec.name, vds, fillvalue=spec.fill)
        fsync_path(tmp)
        durable_replace(tmp, layout.h5)
    finally:
        tmp.unlink(missing_ok=True)
    validate_layout(layout, meta)


def validate_layout(layout: Layout, meta: StoreMeta) -> None:
    if not layout.h5.exists():
        raise StoreError(f"{layout.h5} is missing: not a complete vlpcache HDF5 store; re-extract")
    try:
        with h5py.File(layout.h5, "r") as f:
            for spec in (*ARRAYS.values(), *((ROW_STATUS,) if meta.format_version >= 2 else ())):
                _check_dataset(f, spec, (meta.n_videos, *spec.shape(meta.dims)), layout.h5)
    except OSError as e:
        raise StoreError(f"{layout.h5}: cannot be opened as HDF5 ({e}); re-extract") from e


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


def status_files(layout: Layout, shard: int) -> list[Path]:
    return [layout.h5_shard(shard)]  # row_status lives inside the shard file: removing it makes the rows pending


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
        final = self.layout.h5_shard(self.shard)
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
