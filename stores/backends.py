"""The two backends behind one small interface: layout creation/validation, a shard sink, a shard reader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stores import hdf5_backend, zarr_backend


@dataclass(frozen=True)
class Backend:
    name: str
    init_layout: Callable  # (Layout, StoreMeta) -> None: metadata only, then validate
    validate_layout: Callable  # (Layout, StoreMeta, deep=False) -> None, raises StoreError
    sink: type  # (Layout, StoreMeta, shard, partial_dir) -> .write/.keep/.finish/.close
    reader: type  # (Layout, StoreMeta, shard, files, check) -> .read(name, local)/.close
    status_files: Callable  # (Layout, StoreMeta, shard) -> files holding the shard's row_status apart from its data


BACKENDS: dict[str, Backend] = {
    "zarr": Backend("zarr", zarr_backend.init_layout, zarr_backend.validate_layout,
                    zarr_backend.ZarrShardSink, zarr_backend.ZarrShardReader,
                    zarr_backend.status_files),
    "hdf5": Backend("hdf5", hdf5_backend.init_layout, hdf5_backend.validate_layout,
                    hdf5_backend.HDF5ShardSink, hdf5_backend.HDF5ShardReader,
                    hdf5_backend.status_files),
}
