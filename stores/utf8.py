"""Fast single-value reads from a memory-mapped Arrow utf8 column.

`column[i].as_py()` builds a pyarrow scalar first (several µs, more for a many-chunk column); an id
lookup does it twice. Here the offsets are int32 memoryviews of the mapped buffers (indexing one gives
a Python int, with none of a numpy scalar's cost) and a value is decoded from a slice of the mapped
data: nothing is copied at open, and a read costs about a µs whatever the column size.
"""
from __future__ import annotations

from bisect import bisect_right

import pyarrow as pa


class Utf8Column:
    """Values of a non-null utf8 column (pa.Array or pa.ChunkedArray), read by position."""

    def __init__(self, column: pa.Array | pa.ChunkedArray) -> None:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        if column.type != pa.string() or column.null_count:
            raise ValueError(f"expected a utf8 column without nulls, got {column.type} with {column.null_count} null(s)")
        self._starts = [0]  # first position of each chunk, then the total
        self._offsets: list[memoryview] = []  # per chunk: [len + 1] int32 byte offsets into its data
        self._data: list[memoryview] = []
        for chunk in chunks:
            _, offsets, data = chunk.buffers()
            self._offsets.append(memoryview(offsets).cast("i")[chunk.offset:chunk.offset + len(chunk) + 1])
            self._data.append(memoryview(data) if data is not None else memoryview(b""))
            self._starts.append(self._starts[-1] + len(chunk))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self._starts[-1]:
            raise IndexError(f"position {i} out of range for {self._starts[-1]} values")
        k = bisect_right(self._starts, i) - 1 if len(self._offsets) > 1 else 0
        offsets, local = self._offsets[k], i - self._starts[k]
        return str(self._data[k][offsets[local]:offsets[local + 1]], "utf-8")
