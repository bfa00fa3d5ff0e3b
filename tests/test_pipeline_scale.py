"""The streaming driver: a shard's rows read back from its cursor equal the whole manifest's rows, for
every format; the duplicate check; shard tasks that carry only their own rows; the scale bench's code."""
from __future__ import annotations

import csv
import json
import pickle

import pytest

from _pipeline_helpers import job_config
from pipeline import manifest as manifest_module
from pipeline.bench_scale import run as bench_run
from pipeline.bench_scale import table, write_webvid_csv
from pipeline.job import Job, RunStats
from pipeline.manifest import ManifestError, read_manifest, scan_manifest
from stores.schema import Dims
from _tar_helpers import v2d_samples, write_files_layout, write_tars


def generic_csv(path, n: int):
    """Quoted multi-line captions, short rows, blank lines and bad rows among good ones."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "path", "caption", "split"])
        for i in range(n):
            if i % 7 == 3:
                w.writerow([f"v{i}", f"videos/v{i}.mp4", f"line one\r\nline two, \"quoted\" {i}", "train"])
            elif i % 11 == 5:
                w.writerow([f"v{i}", f"videos/v{i}.mp4"])  # short row: no caption
            elif i % 13 == 0:
                f.write("\r\n")  # blank line (DictReader skips it)
                w.writerow([f" v{i} ", f"./videos//v{i}.mp4", f"é caption {i}", "val"])
            else:
                w.writerow([f"v{i}", f"/abs/v{i}.mp4", f"caption {i}", "test"])
    return path


def jsonl(path, n: int):
    lines = [json.dumps({"video_id": f"v{i}", "path": f"v{i}.mp4", "caption": f"c {i}", "n": i}) for i in range(n)]
    lines[4] = "{broken"
    lines.insert(9, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def manifests(demo_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    samples = v2d_samples(demo_corpus, 11)
    return {
        "generic": generic_csv(root / "m.csv", 53),
        "webvid": write_webvid_csv(root / "webvid.csv", 41),
        "jsonl": jsonl(root / "m.jsonl", 29),
        "files": write_files_layout(root / "files", samples),
        "tars": write_tars(root / "tars", samples),
    }


@pytest.mark.parametrize("kind", ["generic", "webvid", "jsonl", "files", "tars"])
@pytest.mark.parametrize("stride", [1, 3, 4])
def test_rows_read_from_cursors_equal_the_whole_manifest(manifests, kind, stride):
    whole = read_manifest(manifests[kind])
    index = scan_manifest(manifests[kind], stride=stride)
    assert (index.n_rows, index.format, index.fingerprint) == (len(whole), whole.format, whole.fingerprint())
    assert index.n_unusable == sum(r.error is not None for r in whole.rows)
    assert list(index.video_ids()) == [r.video_id for r in whole.rows]
    n = len(whole)
    for start, stop in [(0, n), (0, stride), (stride, min(n, 3 * stride)), (n - 1, n), (2, 5), (n, n)]:
        assert index.rows(start, stop) == whole.rows[start:stop], (start, stop)
    with pytest.raises(IndexError):
        index.rows(0, n + 1)


def test_fingerprint_is_the_one_stores_were_made_with(manifests):
    """sha256 over json [video_id, path, caption] per row, as before the streaming scan."""
    import hashlib

    whole = read_manifest(manifests["generic"])
    h = hashlib.sha256()
    for row in whole.rows:
        h.update(json.dumps([row.video_id, row.path, row.caption]).encode())
    assert scan_manifest(manifests["generic"]).fingerprint == h.hexdigest()
    assert whole.rows[0].path == str(manifests["generic"].parent / "videos" / "v0.mp4")
    assert whole.rows[13].path == str(manifests["generic"].parent / "videos" / "v13.mp4")  # ./videos//v13.mp4


def test_duplicates_found_through_colliding_hashes(tmp_path, monkeypatch):
    m = tmp_path / "m.csv"
    m.write_text("video_id,path,caption\n" + "".join(f"v{i % 9},p{i},c\n" for i in range(12)))
    with pytest.raises(ManifestError, match=r"'v0' \(rows 0 and 9\), 'v1' \(rows 1 and 10\), 'v2' \(rows 2 and 11\);"):
        scan_manifest(m)
    m.write_text("video_id,path,caption\n" + "".join(f"a{i},p{i},c\n" for i in range(8)))
    # Every id hashed alike: the second pass must tell real duplicates from colliding hashes.
    monkeypatch.setattr(manifest_module, "_id_hash", lambda video_id: 7)
    assert scan_manifest(m).n_rows == 8
    m.write_text("video_id,path,caption\n" + "".join(f"a{i % 2},p{i},c\n" for i in range(9)))
    with pytest.raises(ManifestError, match=r"'a0' \(rows 0 and 2\), .* and 2 more; make the ids unique"):
        scan_manifest(m)


def test_a_shard_task_carries_only_its_rows(demo_corpus, tmp_path):
    """The pickled ShardJob of a shard is the same size whatever the manifest's length."""
    sizes = {}
    for n in (40, 400):
        m = write_webvid_csv(tmp_path / f"m{n}.csv", n)
        job = Job(job_config(m, tmp_path / f"out{n}", runner="local", shard_size=10))
        store = job._open_store(Dims(T=2, K=2, Df=4, Dr=4))
        todo = job._pending_shards(store, RunStats(str(tmp_path), "local", ""))
        jobs = list(job.shard_jobs(todo, store))
        assert len(jobs) == n // 10 and [j.spec.index for j in jobs] == list(range(n // 10))
        assert [r.video_id for r in jobs[1].rows] == [r.video_id for r in job.manifest.rows(10, 20)]
        assert [t.row for t in jobs[1].tasks] == list(range(10, 20))
        sizes[n] = len(pickle.dumps(jobs[1]))
    assert abs(sizes[400] - sizes[40]) < 64, sizes


@pytest.mark.slow  # heavy: `make test-slow`
def test_bench_scale_code_on_a_tiny_manifest(tmp_path):
    report = bench_run(rows=60, shard_size=20, work=tmp_path, baseline=True)
    new, old = report["runs"]["streaming"], report["runs"]["baseline 4cdfc47"]
    assert new["shards"] == old["shards"] == 3 and new["tasks_pickled"] == 3
    assert old["task_bytes_max"] > new["task_bytes_max"] > 0  # the baseline's tasks carry every id
    assert new["peak_rss_mb"] >= new["base_rss_mb"] > 0
    assert "streaming" in table(report)


@pytest.mark.parametrize("newline", ["\r", "\r\n"])
def test_csv_line_ends_bare_cr_and_crlf_give_the_rows_of_lf(tmp_path, newline):
    """Old Mac / Excel exports end lines with a bare CR. 1500 rows (60 kB): line ends fall across the
    reader's 8 kB blocks, so a CRLF split between two blocks is met too; every cursor must land on a row start."""
    lines = ["video_id,path,caption,split"] + [f'v{i},videos/v{i}.mp4,"caption, é {i}",train' for i in range(1500)]
    reference = tmp_path / "lf.csv"
    reference.write_bytes(("\n".join(lines) + "\n").encode())
    m = tmp_path / "m.csv"
    m.write_bytes((newline.join(lines) + newline).encode())
    whole = read_manifest(reference)
    index = scan_manifest(m, stride=7)
    assert (index.n_rows, index.fingerprint, index.n_unusable) == (1500, whole.fingerprint(), 0)
    assert whole.rows[5].caption == "caption, é 5" and whole.rows[5].meta == {"split": "train"}
    for start, stop in [(0, 1500), (1197, 1213), (1499, 1500)]:
        assert index.rows(start, stop) == whole.rows[start:stop], (start, stop)
    assert list(index.video_ids()) == [f"v{i}" for i in range(1500)]


def test_the_driver_plans_without_importing_torch(tmp_path):
    """The extract driver (manifest, store creation, provenance, shard jobs) must stay small: torch is
    for the workers and model actors. Run in a fresh interpreter, as the driver is."""
    import subprocess
    import sys
    from pathlib import Path

    m = write_webvid_csv(tmp_path / "m.csv", 30)
    code = f"""
import json, pickle, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _pipeline_helpers import job_config
from pipeline.job import Job, RunStats
from stores.schema import Dims
job = Job(job_config({str(m)!r}, {str(tmp_path / 'out')!r}, runner="local", shard_size=10))
store = job._open_store(Dims(T=2, K=2, Df=4, Dr=4))
jobs = [pickle.dumps(j) for j in job.shard_jobs(job._pending_shards(store, RunStats("", "", "")), store)]
print(json.dumps([len(jobs), job.provenance()["extractor"]["weights_sha256"],
                  sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "torchvision", "open_clip", "timm"))]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    n_jobs, weights, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert n_jobs == 3 and weights, weights
    assert heavy == [], f"the driver imported {heavy[:5]}: import them lazily, where a model is built"
