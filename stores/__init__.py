"""The on-disk store: sharded Zarr v3 or HDF5 behind one reader, atomic shard commits, verification.

Knows nothing of models, Ray or the pipeline. See docs/store-format.md for the layout. Names are
imported on first use (PEP 562): `from stores import open_store` loads neither the writer nor the
backend a store does not use, which keeps a reading process (a DataLoader worker, `vlpcache status`) small.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "StoreError": "stores.errors", "VideoNotStoredError": "stores.errors",
    "ShardLedger": "stores.ledger", "StoreStatus": "stores.ledger", "VideoRecord": "stores.ledger",
    "assert_same_provenance": "stores.provenance", "provenance_diff": "stores.provenance",
    "StoreReader": "stores.reader", "open_store": "stores.reader",
    "ARRAYS": "stores.schema", "FORMAT_VERSION": "stores.schema", "Dims": "stores.schema",
    "ShardHandle": "stores.writer", "ShardWriter": "stores.writer", "StoreWriter": "stores.writer",
    "create_store": "stores.writer", "open_writer": "stores.writer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stores' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
