"""`make bench-scale`: what opening a WebVid-size store costs, format 2 against format 1, side by side.

Builds synthetic stores (tiny dims, 1,000 videos per shard, WebVid-like captions and metadata, 1% of
videos failed) through the public writer API, then a format-1 copy of each (`write_format1_copy`: the
ledgers, store.json and video_ids.json exactly as the format-1 writer wrote them; data files hard-linked).
Each figure is measured in a fresh subprocess (so peak RSS is the figure's own) and printed with its
linear projection to 10M videos (the line through the two sizes measured). Times are the process's CPU
time (time.process_time): on a shared machine wall time measures the neighbours.

    python -m stores.bench_scale [--sizes 100000 1000000] [--workdir DIR | --keep DIR] [--only FIGURE ...] [--json OUT]

More store figures: append a Measurement to MEASUREMENTS; its function runs in the subprocess and
returns one number. The extract driver's figures (RSS while planning, bytes per shard task) are
pipeline/bench_scale.py; `make bench-scale` runs both.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stores.idindex import IdIndex
from stores.index import IndexV2
from stores.ledger import Layout, ShardLedger, load_store_meta
from stores.schema import ARRAYS, Dims

log = logging.getLogger(__name__)

SHARD_SIZE = 1000
DIMS = Dims(T=2, K=2, Df=4, Dr=4)
PROVENANCE = {"bench": "scale", "extractor": {"frame_encoder": "tiny", "weights_sha256": "0" * 64}, "sampling": {"frames": 2}}
FAIL_EVERY = 100  # 1% of videos fail
LOOKUPS = 20000
PROJECT_TO = 10_000_000


def video_id(row: int) -> str:
    return str(1_000_000_000 + row)


def row_meta(row: int) -> dict[str, str]:
    """WebVid-10M partition columns besides id and caption."""
    page = row // 50 * 50
    return {"contentUrl": f"https://ak.picdn.net/shutterstock/videos/{video_id(row)}/preview/stock-footage-{row}.mp4",
            "duration": f"PT00H00M{10 + row % 50:02d}S", "page_dir": f"{page:06d}_{page + 49:06d}", "split": "train"}


def caption(row: int) -> str:
    return f"Aerial view of a green valley with a river and mountains in the background, clip {row}"


# ---- building the stores


def build_store(out: Path, n: int, backend: str = "zarr", workers: int = 2) -> None:
    """A format-2 store of n videos through the public API: streamed ids, one ShardHandle per shard task."""
    from stores import create_store

    writer = create_store(out, backend, dims=DIMS, n_videos=n, shard_size=SHARD_SIZE, provenance=PROVENANCE,
                          video_ids=(video_id(r) for r in range(n)))
    handles = [writer.handle(s) for s in range(writer.n_shards)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_fill_shard, handles, chunksize=8))
    else:
        for h in handles:
            _fill_shard(h)


def _fill_shard(handle) -> None:
    rng = np.random.default_rng(handle.shard)
    arrays = {name: rng.random(spec.shape(DIMS)).astype(spec.dtype) for name, spec in ARRAYS.items()}
    with handle.open() as sw:
        for row in sw.rows:
            if row % FAIL_EVERY == FAIL_EVERY - 1:
                sw.fail(row, video_id(row), caption(row), "DecodeError: moov atom not found", meta=row_meta(row))
            else:
                sw.put(row, video_id(row), caption(row), arrays, meta=row_meta(row))
        sw.commit()


def write_format1_copy(src: Path, dst: Path) -> None:
    """The same store in format 1, as the format-1 writer laid it out: store.json (version 1),
    video_ids.json, and one ledger per shard holding every record and the provenance. Data files are
    hard-linked (format 1 and 2 Zarr shard files are the same bytes); index/, rows/ and row_status are left out."""
    src_layout, dst_layout = Layout(src), Layout(dst)
    meta = load_store_meta(src_layout)
    if meta.backend != "zarr":  # format-2 HDF5 shard files also hold row_status: not format-1 bytes
        raise ValueError(f"format-1 copies are made of zarr stores only; {src} is {meta.backend}")
    dst.mkdir(parents=True)
    store = {**meta.to_json(), "format_version": 1}
    _write_json(dst_layout.store_json, store)
    ids = IdIndex(src_layout.index)
    _write_json(dst_layout.video_ids_json, [ids.video_id(r) for r in range(meta.n_videos)])
    dst_layout.ledgers.mkdir()
    index = IndexV2(src_layout, meta)
    for shard in sorted(index.committed):
        ledger: ShardLedger = index.ledger(shard)
        videos = [{"row": v.row, "video_id": v.video_id, "caption": v.caption, "status": v.status, "error": v.error,
                   "flags": list(v.flags), "meta": v.meta} for v in index.rows(shard).videos]
        files = {k: {"path": f.path, "nbytes": f.nbytes, "crc32c": f.crc32c} for k, f in ledger.files.items()
                 if k not in ("rows", "rows_buffers", "row_status")}
        _write_json(dst_layout.ledger(shard), {
            "format_version": 1, "code_version": ledger.code_version, "backend": ledger.backend, "shard": shard,
            "row_start": ledger.row_start, "row_stop": ledger.row_stop, "counts": ledger.counts,
            "provenance_hash": meta.provenance_hash, "provenance": meta.provenance, "files": files, "videos": videos})
    shutil.copytree(src / "features.zarr", dst / "features.zarr", copy_function=os.link,
                    ignore=shutil.ignore_patterns("row_status"))
    group = dst / "features.zarr" / "zarr.json"  # its attributes repeat store.json
    md = json.loads(group.read_text())
    md["attributes"]["vlpcache"]["format_version"] = 1
    group.unlink()  # a hard link to the source's file: replace it, never write through it
    group.write_text(json.dumps(md, indent=2))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


# ---- the figures (each runs in its own subprocess)


@dataclass(frozen=True)
class Measurement:
    name: str
    unit: str
    goal: str  # at 1M videos, and projected to 10M
    run: Callable[[Path, int], float]  # (store folder, n videos) -> the figure


def _open_s(out: Path, n: int) -> float:
    from stores import open_store

    t = time.process_time()
    open_store(out)
    return time.process_time() - t


def _open_rss_mb(out: Path, n: int) -> float:
    from stores import open_store

    reader = open_store(out)
    len(reader), reader.row_of(video_id(0))  # first use too: counts and one lookup
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked copy of the parent.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: an upper bound


def _status_s(out: Path, n: int) -> float:
    from stores.cli import status_main

    t = time.process_time()
    with open(os.devnull, "w") as null:
        stdout, sys.stdout = sys.stdout, null
        try:
            status_main([str(out), "--json"])
        finally:
            sys.stdout = stdout
    return time.process_time() - t


def _lookups_per_s(out: Path, n: int, passes: int = 1) -> float:
    """LOOKUPS random ids, one at a time (ok ids: row_of; failed ids: meta, their record); the last of
    `passes` passes over them is timed. At 1M, one pass touches each shard ~20 times, so format 2 pays each
    shard's first use (mapping its rows part) in the figure; a second pass measures lookups alone."""
    from stores import open_store

    reader = open_store(out)
    rows = random.Random(0).sample(range(n), min(LOOKUPS, n))
    ids = [video_id(r) for r in rows]
    for _ in range(passes):
        t = time.process_time()
        for v, r in zip(ids, rows):
            if r % FAIL_EVERY != FAIL_EVERY - 1:
                reader.row_of(v)
            else:
                reader.meta(v)  # failed ids: their record
        dt = time.process_time() - t
    return len(ids) / dt


def _warm_lookups_per_s(out: Path, n: int) -> float:
    return _lookups_per_s(out, n, passes=2)


def _batched_lookups_per_s(out: Path, n: int) -> float:
    """The same ids as _lookups_per_s, the ok ones in one `rows_of` call (numpy probes, one pass per shard)."""
    from stores import open_store

    reader = open_store(out)
    rows = random.Random(0).sample(range(n), min(LOOKUPS, n))
    ok = [video_id(r) for r in rows if r % FAIL_EVERY != FAIL_EVERY - 1]
    failed = [video_id(r) for r in rows if r % FAIL_EVERY == FAIL_EVERY - 1]
    t = time.process_time()
    reader.rows_of(ok)
    for v in failed:
        reader.meta(v)
    return len(rows) / (time.process_time() - t)


def _pickled_reader_mb(out: Path, n: int) -> float:
    from stores import open_store

    reader = open_store(out)
    len(reader)  # as a DataLoader would have used it before forking / pickling
    return len(pickle.dumps(reader)) / 1e6


MEASUREMENTS: list[Measurement] = [
    Measurement("open_store", "CPU s", "<= 1 s", _open_s),
    Measurement("open_store peak RSS", "MB", "<= 300 MB", _open_rss_mb),
    Measurement("vlpcache status", "CPU s", "<= 5 s", _status_s),
    Measurement("id lookups", "/CPU s", "", _lookups_per_s),
    Measurement("id lookups, batched", "/CPU s", "", _batched_lookups_per_s),
    Measurement("id lookups, second pass", "/CPU s", "", _warm_lookups_per_s),
    Measurement("pickled reader", "MB", "< 1 MB", _pickled_reader_mb),
]
_LOWER_IS_BETTER = {"CPU s", "MB"}


def measure_in_subprocess(m: Measurement, out: Path, n: int) -> float:
    code = ("import sys, json; from pathlib import Path; from stores.bench_scale import MEASUREMENTS; "
            f"m = [m for m in MEASUREMENTS if m.name == {m.name!r}][0]; "
            f"print(json.dumps(m.run(Path({str(out)!r}), {n})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {m.name} on {out} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def project(sizes: list[int], values: list[float]) -> float:
    """Linear projection to 10M through the two largest sizes (never below the largest measured value)."""
    if len(sizes) < 2:
        return values[-1] * PROJECT_TO / sizes[-1]
    (n0, v0), (n1, v1) = (sizes[-2], values[-2]), (sizes[-1], values[-1])
    return max(v1, v1 + (v1 - v0) / (n1 - n0) * (PROJECT_TO - n1))


def run(sizes: list[int], workdir: Path, measurements: list[Measurement] = MEASUREMENTS, workers: int = 2,
        reuse: bool = False) -> dict:
    results: dict = {"sizes": sizes, "figures": {}}
    for n in sizes:
        if reuse and all((workdir / f"{fmt}-{n}" / "store.json").exists() for fmt in ("v2", "v1")):
            log.info("reusing the %d-video stores in %s", n, workdir)
            continue
        t = time.perf_counter()
        build_store(workdir / f"v2-{n}", n, workers=workers)
        write_format1_copy(workdir / f"v2-{n}", workdir / f"v1-{n}")
        log.info("built %d-video stores in %.1f s", n, time.perf_counter() - t)
    for m in measurements:
        fig = {}
        for fmt in ("v2", "v1"):
            values = [measure_in_subprocess(m, workdir / f"{fmt}-{n}", n) for n in sizes]
            fig[fmt] = {"values": values, "projected_10M": project(sizes, values)}
        better = (lambda new, old: old / new) if m.unit in _LOWER_IS_BETTER else (lambda new, old: new / old)
        fig["x_better"] = better(fig["v2"]["values"][-1], fig["v1"]["values"][-1])
        results["figures"][m.name] = {"unit": m.unit, "goal": m.goal, **fig}
    return results


def table(results: dict) -> str:
    sizes = results["sizes"]
    head = (["figure"] + [f"format 2 @ {n:,}" for n in sizes] + ["format 2 @ 10M (proj.)"]
            + [f"format 1 @ {n:,}" for n in sizes] + ["format 1 @ 10M (proj.)", f"× better @ {sizes[-1]:,}", "goal"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, f in results["figures"].items():
        cells = [f"{name} ({f['unit']})"]
        for fmt in ("v2", "v1"):
            cells += [_fmt(v) for v in f[fmt]["values"]] + [_fmt(f[fmt]["projected_10M"])]
        cells += [f"{_fmt(f['x_better'])}×", f["goal"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _default_workdir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and shutil.disk_usage(shm).free > 4e9 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stores.bench_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="store sizes (videos)")
    parser.add_argument("--workdir", type=Path, default=_default_workdir(),
                        help="where the stores are built, in a temp dir removed afterwards (default: /dev/shm where "
                             "there is one: tmpfs skips the commits' fsyncs while building; reads are warm-cache either way)")
    parser.add_argument("--workers", type=int, default=2, help="processes writing shards")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the stores in this folder and keep them; a later run with the same --keep measures "
                             "the stores already there (both formats of a size) instead of building them again")
    parser.add_argument("--only", nargs="+", default=None, metavar="FIGURE", choices=[m.name for m in MEASUREMENTS],
                        help="measure only these figures (names as in the table, e.g. 'open_store peak RSS')")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    measurements = [m for m in MEASUREMENTS if args.only is None or m.name in args.only]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("stores.writer").setLevel(logging.WARNING)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run(sorted(args.sizes), args.keep, measurements, workers=args.workers, reuse=True)
    else:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            results = run(sorted(args.sizes), Path(tmp), measurements, workers=args.workers)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
