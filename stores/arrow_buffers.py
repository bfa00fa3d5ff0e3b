"""The store's Arrow IPC files read without pyarrow: the writer records where pyarrow finds each buffer.

The files stay standard Arrow IPC files (pyarrow, polars, DuckDB read them). Next to each, the writer
puts a small JSON sidecar `NAME.buffers.json` (for `NAME.arrow`) that says, per column and record batch,
the byte range of each of the column's buffers in the file. The writer takes these from pyarrow itself:
it maps the finished file, reads it with `pyarrow.ipc.open_file`, and records each buffer's address
minus the map's address (pyarrow reads uncompressed IPC in place, so every buffer is a slice of the
map). Nothing here parses the IPC format. A reader maps the file and views those ranges as numpy arrays
and memoryviews, so a reading process never imports pyarrow (28 MB of RSS).

A sidecar is derived data; `vlpcache verify` recomputes it from the file with pyarrow and compares.
Files without a sidecar (format-2 stores written before sidecars) are read through pyarrow: both paths
give the same buffers, so one decoding code (the classes below) serves both.

Sidecar (JSON):
    {"format": "vlpcache-arrow-buffers/1", "file": "shard-000003.arrow", "nbytes": 151234,
     "tail_crc32": <zlib.crc32 of the file's last min(nbytes, 65536) bytes>,
     "columns": [["row", "int64", [[length, null_count, [[offset, size] | null, ...]], ...]], ...],
     "crc32": <zlib.crc32 of the canonical JSON of every other key>}
A column's buffers are listed in pyarrow's `Array.buffers()` order (validity, offsets, data; a list
column's own then its child's); null is an absent buffer (no nulls).
"""
from __future__ import annotations

import json
import mmap
import os
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stores.errors import StoreError

FORMAT = "vlpcache-arrow-buffers/1"
SUFFIX = ".buffers.json"
TAIL = 65536  # bytes of the file's end (the IPC footer: every batch's place and size) that the reader checks
INTS = {"int8": np.dtype("<i1"), "int64": np.dtype("<i8")}
STRING, STRING_LIST = "string", "list<item: string>"
TYPES = (*INTS, STRING, STRING_LIST)

Batch = tuple[int, int, list]  # (length, null_count, buffers: memoryview or None each, in Array.buffers() order)


def sidecar_path(arrow: Path) -> Path:
    return arrow.with_name(arrow.name[: -len(".arrow")] + SUFFIX if arrow.name.endswith(".arrow") else arrow.name + SUFFIX)


# ---- writing (pyarrow)

def describe(arrow: Path, name: str | None = None) -> dict:
    """The sidecar of `arrow` as pyarrow reads it: each column's buffers as byte ranges of the file.
    name: the file name recorded (default: arrow's own; the writer writes under a temporary name)."""
    import pyarrow as pa

    with pa.memory_map(str(arrow)) as source:
        whole = source.read_buffer()  # [nbytes] the map itself: pyarrow reads IPC buffers as slices of it
        reader = pa.ipc.open_file(whole)
        names = reader.schema.names
        if len(set(names)) != len(names):
            raise StoreError(f"{arrow}: repeated column names {names}; a sidecar needs unique names")
        columns = [[n, str(reader.schema.field(n).type), []] for n in names]
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            for column, array in zip(columns, batch.columns):
                if array.offset or (isinstance(array, pa.ListArray) and array.values.offset):
                    raise StoreError(f"{arrow}: column {column[0]!r} batch {i} starts at offset {array.offset}; "
                                     f"the writer writes whole arrays")
                ranges = []
                for buf in array.buffers():
                    if buf is not None and not buf.size:  # an empty buffer may be allocated apart from the map
                        ranges.append([0, 0])
                        continue
                    at = None if buf is None else buf.address - whole.address
                    if at is not None and not 0 <= at <= at + buf.size <= whole.size:
                        raise StoreError(f"{arrow}: column {column[0]!r} batch {i}: a buffer is not read in place "
                                         f"(a compressed IPC file?); the store writes uncompressed files")
                    ranges.append(None if buf is None else [at, buf.size])
                column[2].append([len(array), array.null_count, ranges])
        nbytes = whole.size
        tail = zlib.crc32(memoryview(whole)[max(0, nbytes - TAIL):])
    body = {"format": FORMAT, "file": name or arrow.name, "nbytes": nbytes, "tail_crc32": tail, "columns": columns}
    return {**body, "crc32": _crc(body)}


def sidecar_bytes(arrow: Path, name: str | None = None) -> bytes:
    return json.dumps(describe(arrow, name), separators=(",", ":")).encode()


def write_sidecar(arrow: Path, name: str | None = None) -> Path:
    """Write and fsync `arrow`'s sidecar next to it (the caller renames both into place)."""
    path = sidecar_path(arrow)
    with open(path, "wb") as f:
        f.write(sidecar_bytes(arrow, name))
        f.flush()
        os.fsync(f.fileno())
    return path


def check_sidecar(arrow: Path) -> list[str]:
    """verify: the sidecar must be exactly what pyarrow reads from the file now (a problem per line)."""
    sidecar = sidecar_path(arrow)
    try:
        stored = json.loads(sidecar.read_bytes())
    except (OSError, ValueError) as e:
        return [f"{sidecar}: unreadable ({e}); {fix(arrow)}"]
    if stored != describe(arrow, arrow.name):
        return [f"{sidecar}: the buffer locations do not match what pyarrow reads from {arrow.name}; {fix(arrow)}"]
    return []


def fix(arrow: Path) -> str:
    out = arrow.parent.parent  # OUT/rows/x.arrow, OUT/index/x.arrow
    return (f"readers must not use it (it locates the bytes they read): rewrite it from the Arrow file with "
            f"`vlpcache migrate {out}`{', or re-extract the shard' if arrow.parent.name == 'rows' else ''}")


def _crc(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# ---- reading

class ArrowColumns:
    """The columns of one Arrow IPC file, by name: each as a list of record batches of buffers."""

    def __init__(self, path: Path, types: dict[str, str], batches: dict[str, list[Batch]]) -> None:
        self.path, self.types, self._batches = path, types, batches

    @property
    def names(self) -> list[str]:
        return list(self.types)

    def _get(self, name: str, types: Sequence[str]) -> list[Batch]:
        if name not in self.types:
            raise StoreError(f"{self.path}: no column {name!r} (columns: {self.names})")
        if self.types[name] not in types:
            raise StoreError(f"{self.path}: column {name!r} is {self.types[name]}, expected {' or '.join(types)}")
        return self._batches[name]

    def ints(self, name: str) -> np.ndarray:
        """[rows] a non-null int column, zero-copy when it is one batch."""
        batches = self._get(name, tuple(INTS))
        dtype, parts = INTS[self.types[name]], []
        for length, nulls, bufs in batches:
            if nulls:
                raise StoreError(f"{self.path}: column {name!r} has {nulls} null(s); the store writes none")
            parts.append(np.frombuffer(_need(bufs[1], length * dtype.itemsize, self.path, name), dtype=dtype, count=length))
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype)

    def strings(self, name: str) -> Utf8Column:
        return Utf8Column(self._get(name, (STRING,)), f"{self.path} column {name!r}")

    def string_lists(self, name: str) -> StringListColumn:
        return StringListColumn(self._get(name, (STRING_LIST,)), f"{self.path} column {name!r}")


def open_columns(path: Path) -> ArrowColumns:
    """The file's columns: from its sidecar and a map of the file when it has one, else through pyarrow
    (files written before sidecars). FileNotFoundError when the Arrow file is missing; StoreError when
    the sidecar is damaged or does not belong to the file."""
    sidecar = sidecar_path(path)
    try:
        text = sidecar.read_bytes()
    except FileNotFoundError:
        return _from_pyarrow(path)
    return _from_sidecar(path, sidecar, text)


def _from_sidecar(path: Path, sidecar: Path, text: bytes) -> ArrowColumns:
    def bad(why: str) -> StoreError:
        return StoreError(f"{sidecar}: {why}; {fix(path)}")

    try:
        side = json.loads(text)
        body = {k: v for k, v in side.items() if k != "crc32"}
    except (ValueError, AttributeError) as e:
        raise bad(f"not a buffer sidecar ({e})") from None
    if side.get("format") != FORMAT or side.get("crc32") != _crc(body):
        raise bad(f"damaged (its format or checksum is wrong: {side.get('format')!r})")
    if side.get("file") != path.name:
        raise bad(f"it describes {side.get('file')!r}, not {path.name!r}")
    with open(path, "rb") as f:
        nbytes = os.fstat(f.fileno()).st_size
        if nbytes != side.get("nbytes"):
            raise bad(f"it describes a file of {side.get('nbytes')} bytes, {path.name} has {nbytes}")
        if zlib.crc32(os.pread(f.fileno(), TAIL, max(0, nbytes - TAIL))) != side.get("tail_crc32"):
            raise bad(f"it describes another version of {path.name} (the file's footer differs)")
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if nbytes else memoryview(b"")
    types, batches = {}, {}
    try:
        for name, type_, column in side["columns"]:
            if type_ not in TYPES:
                raise bad(f"column {name!r} has type {type_}; readers know {', '.join(TYPES)}")
            types[name] = type_
            out = batches[name] = []
            for length, nulls, ranges in column:
                if any(r is not None and not 0 <= r[0] <= r[0] + r[1] <= nbytes for r in ranges):
                    raise bad(f"column {name!r} has a buffer outside the file's {nbytes} bytes")
                out.append((int(length), int(nulls), [None if r is None else view[r[0]:r[0] + r[1]] for r in ranges]))
    except (KeyError, TypeError, ValueError) as e:  # a checksum that holds over a malformed body: not ours
        raise bad(f"malformed ({type(e).__name__}: {e})") from None
    return ArrowColumns(path, types, batches)


def _from_pyarrow(path: Path) -> ArrowColumns:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:  # the buffers keep the mapping; no fd stays open
            table = pa.ipc.open_file(source).read_all()
    except pa.ArrowException as e:
        raise StoreError(f"{path}: unreadable Arrow IPC file ({e}); run `vlpcache verify`") from e
    types = {f.name: str(f.type) for f in table.schema}
    # Unsigned bytes, as the map's: a memoryview compares with bytes element by element, format included.
    batches = {name: [(len(c), c.null_count, [None if b is None else memoryview(b).cast("B") for b in c.buffers()])
                      for c in table.column(name).chunks] for name in table.column_names if types[name] in TYPES}
    return ArrowColumns(path, {n: t for n, t in types.items() if n in batches}, batches)


def _need(buf: memoryview | None, nbytes: int, where, name: str = "") -> memoryview:
    if buf is None or len(buf) < nbytes:
        raise StoreError(f"{where} {name}: a buffer holds {0 if buf is None else len(buf)} bytes, its column needs "
                         f"{nbytes}; the file or its sidecar is damaged: run `vlpcache verify`")
    return buf


class Utf8Column:
    """Values of a utf8 column (None where null), read by position: nothing is decoded at open, a value
    costs about a µs (int32 memoryviews of the offsets; a slice of the data decoded)."""

    def __init__(self, batches: list[Batch], where: str) -> None:
        self.where = where
        self._starts = [0]  # first position of each batch, then the total
        self._valid: list[memoryview | None] = []  # per batch: validity bitmap, None when no nulls
        self._offsets: list[memoryview] = []  # per batch: [len + 1] int32 byte offsets into its data
        self._data: list[memoryview] = []
        self.null_count = 0
        for length, nulls, (valid, offsets, data) in batches:
            offsets = _need(offsets, 4 * (length + 1), where)[: 4 * (length + 1)].cast("i")
            data = data if data is not None else memoryview(b"")
            if offsets[0] != 0 or not 0 <= offsets[length] <= len(data):
                raise StoreError(f"{where}: offsets [{offsets[0]}, {offsets[length]}] do not fit its {len(data)}-byte "
                                 f"data; the file or its sidecar is damaged: run `vlpcache verify`")
            self._valid.append(_need(valid, (length + 7) // 8, where) if nulls else None)
            self._offsets.append(offsets)
            self._data.append(data)
            self._starts.append(self._starts[-1] + length)
            self.null_count += nulls

    def __len__(self) -> int:
        return self._starts[-1]

    def _at(self, i: int) -> tuple[int, int]:
        return _locate(self._starts, i, self.where)

    def _bytes(self, k: int, local: int) -> memoryview | None:
        if _is_null(self._valid[k], local):
            return None
        offsets = self._offsets[k]
        return self._data[k][offsets[local]:offsets[local + 1]]

    def __getitem__(self, i: int) -> str | None:
        value = self._bytes(*self._at(i))
        return None if value is None else str(value, "utf-8")

    def equals(self, i: int, key: bytes) -> bool:
        """Whether value i is the string whose utf-8 bytes are key (no decoding)."""
        value = self._bytes(*self._at(i))
        return value is not None and value == key

    def to_list(self) -> list[str | None]:
        return [self[i] for i in range(len(self))]


class StringListColumn:
    """Values of a list<utf8> column (a tuple of str, None where null), read by position."""

    def __init__(self, batches: list[Batch], where: str) -> None:
        self.where = where
        self._starts, self._valid, self._offsets, self._values = [0], [], [], []
        for length, nulls, (valid, offsets, *child) in batches:
            offsets = _need(offsets, 4 * (length + 1), where)[: 4 * (length + 1)].cast("i")
            n_child = offsets[length] - offsets[0]
            # The child's null count is not recorded by Array.buffers(); a validity buffer means it may have nulls.
            self._values.append(Utf8Column([(n_child, 1 if child[0] is not None else 0, child)], where))
            self._valid.append(_need(valid, (length + 7) // 8, where) if nulls else None)
            self._offsets.append(offsets)
            self._starts.append(self._starts[-1] + length)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> tuple[str | None, ...] | None:
        k, local = _locate(self._starts, i, self.where)
        if _is_null(self._valid[k], local):
            return None
        offsets = self._offsets[k]
        values = self._values[k]
        return tuple(values[j] for j in range(offsets[local], offsets[local + 1]))


def _locate(starts: list[int], i: int, where: str) -> tuple[int, int]:
    """(batch, position in it) of value i; starts: each batch's first position, then the total."""
    if not 0 <= i < starts[-1]:
        raise IndexError(f"position {i} out of range for {starts[-1]} values of {where}")
    k = bisect_right(starts, i) - 1 if len(starts) > 2 else 0
    return k, i - starts[k]


def _is_null(valid: memoryview | None, local: int) -> bool:
    """Whether bit `local` of an Arrow validity bitmap is clear (None: the batch has no nulls)."""
    return valid is not None and not (valid[local >> 3] >> (local & 7)) & 1
