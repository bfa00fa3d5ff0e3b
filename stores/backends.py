"""The two backends behind one small interface: layout creation/validation, a shard sink, a shard reader.

A backend's module is imported the first time it is asked for: a reader of a Zarr store never loads
h5py, and one of an HDF5 store never loads the Zarr code (each costs its process memory and start time).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable

MODULES = {"zarr": ("stores.zarr_backend", "ZarrShardSink", "ZarrShardReader"),
           "hdf5": ("stores.hdf5_backend", "HDF5ShardSink", "HDF5ShardReader")}


@dataclass(frozen=True)
class Backend:
    name: str
    init_layout: Callable  # (Layout, StoreMeta) -> None: metadata only, then validate
    validate_layout: Callable  # (Layout, StoreMeta, deep=False) -> None, raises StoreError
    sink: type  # (Layout, StoreMeta, shard, partial_dir) -> .write/.keep/.finish/.close
    reader: type  # (Layout, StoreMeta, shard, files, check) -> .read(name, local)/.close
    status_files: Callable  # (Layout, StoreMeta, shard) -> files holding the shard's row_status apart from its data


class _Backends(Mapping):
    """name -> Backend, importing the backend's module on first use."""

    def __init__(self) -> None:
        self._loaded: dict[str, Backend] = {}

    def __getitem__(self, name: str) -> Backend:
        if name not in self._loaded:
            module_name, sink, reader = MODULES[name]
            m = importlib.import_module(module_name)
            self._loaded[name] = Backend(name, m.init_layout, m.validate_layout, getattr(m, sink), getattr(m, reader),
                                         m.status_files)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(MODULES)

    def __len__(self) -> int:
        return len(MODULES)


BACKENDS: Mapping[str, Backend] = _Backends()
