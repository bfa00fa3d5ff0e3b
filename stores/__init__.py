"""The on-disk store: sharded Zarr v3 or HDF5 behind one reader, atomic shard commits, verification.

Knows nothing of models, Ray or the pipeline. See docs/store-format.md for the layout.
"""
from stores.errors import StoreError, VideoNotStoredError
from stores.ledger import ShardLedger, StoreStatus, VideoRecord
from stores.provenance import assert_same_provenance, provenance_diff
from stores.reader import StoreReader, open_store
from stores.schema import ARRAYS, FORMAT_VERSION, Dims
from stores.writer import ShardHandle, ShardWriter, StoreWriter, create_store, open_writer

__all__ = [
    "ARRAYS", "FORMAT_VERSION", "Dims", "ShardHandle", "ShardLedger", "ShardWriter", "StoreError", "StoreReader", "StoreStatus",
    "StoreWriter", "VideoNotStoredError", "VideoRecord", "assert_same_provenance", "create_store", "open_store", "open_writer",
    "provenance_diff",
]
