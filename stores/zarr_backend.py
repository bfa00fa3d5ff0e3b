"""Zarr v3 backend: OUT/features.zarr, one sharded array per schema array.

Each array has chunk = one video and shard = one pipeline shard, with the codec chain
sharding_indexed(chunk codecs: bytes(little) [-> zstd] -> crc32c; index codecs: bytes(little) -> crc32c;
index at the end). zarr-python creates the metadata; shard files are written here directly, one
chunk at a time as videos arrive (bounded memory, one writer per file, written once), in exactly the
byte layout of the Zarr v3 sharding spec, so zarr-python and tensorstore read them as usual.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
from pathlib import Path

import crc32c
import numpy as np

from stores.errors import StoreError
from stores.io import fsync_path, fsync_tree
from stores.ledger import FileRecord, Layout, StoreMeta
from stores.schema import ARRAYS, ROW_STATUS

ZSTD_LEVEL = 3
EMPTY = np.uint64(2**64 - 1)  # sharding spec: offset and nbytes of a chunk that is not stored
_EMPTY_INT = 2**64 - 1
CRC_BYTES = 4

DIMENSION_NAMES = {"T": "frame", "K": "region", "Df": "feature", "Dr": "feature", "4": "coord"}


def _chunk_codecs(compression: str | None) -> list[dict]:
    codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}})
    codecs.append({"name": "crc32c"})
    return codecs


_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def init_layout(layout: Layout, meta: StoreMeta) -> None:
    """Create the group and array metadata (no chunk data) in a temp dir, then rename it into place."""
    import zarr  # imported here: readers and writers never need zarr-python itself
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    tmp = layout.out / f".features.zarr.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    compressors = [Crc32cCodec()]
    if meta.compression == "zstd":
        compressors = [ZstdCodec(level=ZSTD_LEVEL, checksum=False), Crc32cCodec()]
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"vlpcache": meta.to_json()})
        for spec in ARRAYS.values():
            shape = spec.shape(meta.dims)
            group.create_array(
                spec.name, shape=(meta.n_videos, *shape), chunks=(1, *shape), shards=(meta.shard_size, *shape),
                dtype=spec.dtype, fill_value=spec.fill, serializer=BytesCodec(endian="little"),
                compressors=compressors, dimension_names=("video", *(DIMENSION_NAMES[a] for a in spec.axes)),
            )
        # Per-row commit state for foreign readers: one plain chunk (not sharded) per pipeline shard.
        group.create_array(ROW_STATUS.name, shape=(meta.n_videos,), chunks=(meta.shard_size,), dtype=ROW_STATUS.dtype,
                           fill_value=ROW_STATUS.fill, serializer=BytesCodec(endian="little"),
                           compressors=[Crc32cCodec()], dimension_names=("video",))
        fsync_tree(tmp)  # every zarr.json durable before the rename publishes them
        os.rename(tmp, layout.zarr)  # creators hold the creation lock (stores/writer.py): no race here
        fsync_path(layout.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    validate_layout(layout, meta)


def validate_layout(layout: Layout, meta: StoreMeta, deep: bool = False) -> None:
    """Check every array's zarr.json against the schema: dtype, shape, chunk/shard shape, codecs (a few
    small files: done on every open). deep (verify): also every other key foreign readers use (fill value,
    dimension names, node type), and the group's zarr.json, whose attributes must equal store.json."""
    for spec in ARRAYS.values():
        path = layout.zarr / spec.name / "zarr.json"
        try:
            md = json.loads(path.read_bytes())
        except FileNotFoundError as e:
            raise StoreError(f"{path} is missing: {layout.zarr} is not a complete vlpcache Zarr store; re-extract") from e
        except (OSError, ValueError) as e:
            raise StoreError(f"{path} is unreadable ({e}); re-extract or restore the file") from e
        _check_metadata(path, md, _expected_metadata(spec, meta), meta)
        if deep:
            _check_metadata(path, md, {
                "zarr_format": 3, "node_type": "array", "fill_value": spec.fill, "attributes": {},
                "dimension_names": ["video", *(DIMENSION_NAMES[a] for a in spec.axes)], "storage_transformers": [],
            }, meta)
    if deep:
        _check_group(layout, meta)
    if meta.format_version >= 2:
        path = layout.zarr / ROW_STATUS.name / "zarr.json"
        try:
            md = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path} is missing or unreadable ({e}); {layout.zarr} is not a complete vlpcache Zarr store; re-extract") from e
        _check_metadata(path, md, {
            "data_type": "int8", "shape": [meta.n_videos],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [meta.shard_size]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "codecs": [{"name": "bytes"}, {"name": "crc32c"}],  # int8: no endianness
            **({"zarr_format": 3, "node_type": "array", "fill_value": ROW_STATUS.fill, "attributes": {},
                "dimension_names": ["video"], "storage_transformers": []} if deep else {}),
        }, meta)


def _check_group(layout: Layout, meta: StoreMeta) -> None:
    path = layout.zarr / "zarr.json"
    try:
        md = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is missing or unreadable ({e}); foreign readers (zarr-python, tensorstore) open "
                         f"the store through it. It is written once, at creation: restore it from a backup, or "
                         f"re-extract into a new --out") from e
    _check_metadata(path, md, {"zarr_format": 3, "node_type": "group"}, meta)
    if md.get("attributes") != {"vlpcache": meta.to_json()}:
        raise StoreError(f"{path}: attribute 'vlpcache' differs from {layout.store_json} (both are written once, "
                         f"at creation, with the same store metadata): one of them is damaged; restore it from a "
                         f"backup, or re-extract into a new --out")


def _expected_metadata(spec, meta: StoreMeta) -> dict:
    shape = spec.shape(meta.dims)
    return {
        "data_type": spec.dtype.name,
        "shape": [meta.n_videos, *shape],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [meta.shard_size, *shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *shape], "codecs": _chunk_codecs(meta.compression),
            "index_codecs": _INDEX_CODECS, "index_location": "end"}}],
    }


def _check_metadata(path: Path, md: dict, expect: dict, meta: StoreMeta) -> None:
    for key, want in expect.items():
        got = md.get(key)
        if got != want:
            raise StoreError(
                f"{path}: {key} is {json.dumps(got)}, but the schema (format v{meta.format_version}) needs "
                f"{json.dumps(want)}; this array was not written by vlpcache or was modified: re-extract"
            )


def _encode(a: np.ndarray, compression: str | None) -> bytes:
    payload = np.ascontiguousarray(a).tobytes()  # dtype is already little-endian (checked by the writer)
    if compression == "zstd":
        payload = _zstd().encode(payload)
    return payload + crc32c.crc32c(payload).to_bytes(CRC_BYTES, "little")


class ZarrShardSink:
    """Streams the chunks of one shard into one partial file per array; index and checksum at finish()."""

    def __init__(self, layout: Layout, meta: StoreMeta, shard: int, partial_dir: Path) -> None:
        self.layout, self.meta, self.shard = layout, meta, shard
        self.files: dict[str, tuple[Path, object]] = {}
        self.index = {name: np.full((meta.shard_size, 2), EMPTY, dtype="<u8") for name in ARRAYS}  # [S, (offset, nbytes)]
        self.pos = dict.fromkeys(ARRAYS, 0)
        self.crc = dict.fromkeys(ARRAYS, 0)
        for name in ARRAYS:
            path = partial_dir / name
            self.files[name] = (path, open(path, "wb"))

    def write(self, local: int, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            chunk = _encode(a, self.meta.compression)
            self._append(name, local, chunk)

    def keep(self, local: int, prev: ZarrShardReader) -> None:
        """Copy a committed row's chunks byte for byte (prev opened with check=True verifies them)."""
        for name in ARRAYS:
            prev.read(name, local)
            self._append(name, local, prev.raw_chunk(name, local))

    def _append(self, name: str, local: int, chunk: bytes) -> None:
        _, f = self.files[name]
        f.write(chunk)
        self.index[name][local] = (self.pos[name], len(chunk))
        self.pos[name] += len(chunk)
        self.crc[name] = crc32c.crc32c(chunk, self.crc[name])

    def finish(self, status: np.ndarray) -> list[tuple[Path, Path, str, FileRecord]]:
        """Write each index, fsync, close; then the shard's row_status chunk (status: [rows] int8).
        Returns (partial, final, key, record) for the caller to rename in this order (row_status last)."""
        out = []
        for name, (path, f) in self.files.items():
            index = self.index[name].tobytes()
            tail = index + crc32c.crc32c(index).to_bytes(CRC_BYTES, "little")
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            final = self.layout.zarr_shard(name, self.shard, 1 + len(ARRAYS[name].axes))
            record = FileRecord(
                path=str(final.relative_to(self.layout.out)), nbytes=self.pos[name] + len(tail),
                crc32c=crc32c.crc32c(tail, self.crc[name]),
            )
            out.append((path, final, name, record))
        out.append(self._row_status(status))
        return out

    def _row_status(self, status: np.ndarray) -> tuple[Path, Path, str, FileRecord]:
        chunk = np.zeros(self.meta.shard_size, dtype=ROW_STATUS.dtype)  # edge chunks are stored whole
        chunk[: len(status)] = status
        data = chunk.tobytes() + crc32c.crc32c(chunk.tobytes()).to_bytes(CRC_BYTES, "little")
        path = self.files[next(iter(ARRAYS))][0].parent / ROW_STATUS.name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        final = row_status_path(self.layout, self.shard)
        return path, final, ROW_STATUS.name, FileRecord(str(final.relative_to(self.layout.out)), len(data), crc32c.crc32c(data))

    def close(self) -> None:
        for _, f in self.files.values():
            f.close()


def row_status_path(layout: Layout, shard: int) -> Path:
    return layout.zarr / ROW_STATUS.name / "c" / str(shard)


def status_files(layout: Layout, meta: StoreMeta, shard: int) -> list[Path]:
    return [row_status_path(layout, shard)]


def read_index(buf: mmap.mmap | bytes, shard_size: int, path: Path) -> np.ndarray:
    """The shard index at the end of a shard file: [S, 2] uint64 (offset, nbytes), crc32c-checked."""
    n = shard_size * 16
    if len(buf) < n + CRC_BYTES:
        raise StoreError(f"{path}: {len(buf)} bytes is too short for a shard index of {shard_size} chunks; the file is truncated")
    raw = bytes(buf[len(buf) - n - CRC_BYTES: len(buf) - CRC_BYTES])
    stored = int.from_bytes(buf[len(buf) - CRC_BYTES:], "little")
    if crc32c.crc32c(raw) != stored:
        raise StoreError(f"{path}: shard index checksum mismatch; the file is corrupt or truncated: run `vlpcache verify`, then re-extract the shard")
    index = np.frombuffer(raw, dtype="<u8").reshape(shard_size, 2)
    stored_end = index[index[:, 0] != EMPTY]
    if len(stored_end) and int((stored_end[:, 0] + stored_end[:, 1]).max()) > len(buf) - n - CRC_BYTES:
        raise StoreError(f"{path}: shard index points past the chunk data; the file is corrupt")
    return index


class ZarrShardReader:
    """mmaps one committed shard's files and decodes chunks straight from them through the shard index."""

    def __init__(self, layout: Layout, meta: StoreMeta, shard: int, files: dict[str, FileRecord], check: bool) -> None:
        self.meta, self.shard, self.check = meta, shard, check
        self.maps: dict[str, mmap.mmap] = {}
        self.index: dict[str, np.ndarray] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}  # per local row: (offset, nbytes) as Python ints
        self.paths: dict[str, Path] = {}
        self.layouts = {name: (spec.shape(meta.dims), spec.dtype.newbyteorder("<"),
                               int(np.prod(spec.shape(meta.dims))) * spec.dtype.itemsize) for name, spec in ARRAYS.items()}
        self.zstd = _zstd() if meta.compression == "zstd" else None
        try:
            for name in ARRAYS:
                if name not in files:
                    raise StoreError(f"shard {shard}: ledger lists no file for array {name!r}; the ledger is damaged: re-extract the shard")
                path = layout.out / files[name].path
                self.paths[name] = path
                self.maps[name] = _map_checked(path, files[name].nbytes)
                self.index[name] = read_index(self.maps[name], meta.shard_size, path)
                self.spans[name] = [(int(o), int(n)) for o, n in self.index[name]]
        except BaseException:
            self.close()
            raise

    def read(self, name: str, local: int) -> np.ndarray:
        """Decoded chunk of one video: a read-only view of the mmap when uncompressed (copy it to keep it)."""
        offset, nbytes = self.spans[name][local]
        if offset == _EMPTY_INT:
            raise StoreError(f"{self.paths[name]}: no chunk stored for row {self._row(local)}, which the ledger says is ok; the shard is damaged: re-extract it")
        end = offset + nbytes - CRC_BYTES
        buf = self.maps[name]
        if self.check and crc32c.crc32c(memoryview(buf)[offset:end]) != int.from_bytes(buf[end: end + CRC_BYTES], "little"):
            raise StoreError(f"{self.paths[name]}: crc32c mismatch in the chunk of row {self._row(local)}; the file is corrupt: run `vlpcache verify`, then re-extract the shard")
        shape, dtype, want = self.layouts[name]
        if self.zstd is not None:
            try:
                data = self.zstd.decode(memoryview(buf)[offset:end])
            except Exception as e:  # numcodecs raises RuntimeError on bad frames
                raise StoreError(f"{self.paths[name]}: zstd chunk of row {self._row(local)} does not decode ({e}); the file is corrupt") from e
            if len(data) != want:
                raise StoreError(f"{self.paths[name]}: chunk of row {self._row(local)} decodes to {len(data)} bytes, expected {want}; the file is corrupt")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        if end - offset != want:
            raise StoreError(f"{self.paths[name]}: chunk of row {self._row(local)} has {end - offset} bytes, expected {want} ({dtype} {shape}); the file is corrupt")
        return np.frombuffer(buf, dtype=dtype, count=want // dtype.itemsize, offset=offset).reshape(shape)

    def _row(self, local: int) -> int:
        return self.shard * self.meta.shard_size + local

    def stored_rows(self, name: str) -> set[int]:
        """Local rows that have a chunk in this shard file."""
        return {int(i) for i in np.flatnonzero(self.index[name][:, 0] != EMPTY)}

    def raw_chunk(self, name: str, local: int) -> bytes:
        offset, nbytes = self.spans[name][local]
        return bytes(self.maps[name][offset: offset + nbytes])

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a zero-copy view; the map closes with it
                pass
        self.maps.clear()


def _zstd():
    from numcodecs import Zstd  # imported here: only zstd stores need it

    return Zstd(level=ZSTD_LEVEL)


def _map_checked(path: Path, nbytes: int) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes:
                raise StoreError(f"{path}: {size} bytes on disk, but the ledger recorded {nbytes}; the file is truncated or was replaced: re-extract the shard")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as e:
        raise StoreError(f"{path} is missing but its shard's ledger says it was committed; re-extract the shard") from e
