"""A demo corpus written as video2dataset writes it: the `files` layout and webdataset tar shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

PER_SHARD = 4  # samples per video2dataset shard


def v2d_samples(demo_corpus, n: int) -> list[dict]:
    """The first n demo clips as video2dataset samples: key, mp4 bytes, caption, metadata."""
    samples = []
    for i, row in enumerate(demo_corpus["rows"][:n]):
        shard, key = f"{i // PER_SHARD:05d}", f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}"
        info = {"key": key, "url": f"http://example.com/{row['video_id']}.mp4", "status": "success",
                "caption": row["caption"], "split": row["split"], "duration": 2.5, "error_message": None}
        mp4 = (demo_corpus["root"] / row["path"]).read_bytes()
        samples.append({"shard": shard, "key": key, "mp4": mp4, "txt": row["caption"].encode(),
                        "json": json.dumps(info).encode()})
    return samples


def write_files_layout(folder: Path, samples: list[dict]) -> Path:
    for s in samples:
        d = folder / s["shard"]
        d.mkdir(parents=True, exist_ok=True)
        for ext in ("mp4", "txt", "json"):
            (d / f"{s['key']}.{ext}").write_bytes(s[ext])
    (folder / "_stats.json").write_text("{}")
    return folder


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder: Path, samples: list[dict], exts=("json", "mp4", "txt")) -> Path:
    """As video2dataset's webdataset writer: NNNNN.tar with the members of a sample together, plus
    NNNNN.parquet and _stats.json beside them (which the reader does not need)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted({s["shard"] for s in samples}):
        mine = [s for s in samples if s["shard"] == shard]
        with tarfile.open(folder / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in mine:
                for ext in exts:
                    add_member(tar, f"{s['key']}.{ext}", s[ext])
        pq.write_table(pa.table({"key": [s["key"] for s in mine], "status": ["success"] * len(mine)}),
                       folder / f"{shard}.parquet")
        (folder / f"{shard}_stats.json").write_text("{}")
    return folder
