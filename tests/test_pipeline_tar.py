"""video2dataset's default output (webdataset tar shards) as input: read in place, the same rows and the
same stored features as the `files` layout of the same corpus, and every kind of bad tar."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from _pipeline_helpers import cli, job_config, snapshot, tiny_sets
from _tar_helpers import add_member, v2d_samples, write_files_layout, write_tars
from pipeline.job import Job
from pipeline.manifest import ManifestError, read_manifest
from stores import open_store

@pytest.fixture(scope="module")
def both_layouts(demo_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2d")
    samples = v2d_samples(demo_corpus, 6)
    return {"files": write_files_layout(root / "files", samples), "tars": write_tars(root / "tars", samples),
            "samples": samples}


def test_tar_rows_equal_files_rows(both_layouts):
    files, tars = read_manifest(both_layouts["files"]), read_manifest(both_layouts["tars"])
    assert tars.format == files.format == "video2dataset"
    assert [r.video_id for r in tars.rows] == [s["key"] for s in both_layouts["samples"]]
    for a, b in zip(files.rows, tars.rows):
        assert (a.video_id, a.caption, a.meta, a.error) == (b.video_id, b.caption, b.meta, b.error)
        assert a.span is None and b.path == str(both_layouts["tars"] / f"{b.meta['v2d_shard']}.tar")
        with open(b.path, "rb") as f:  # the span is exactly the mp4's bytes, in place in the tar
            f.seek(b.span[0])
            assert f.read(b.span[1]) == Path(a.path).read_bytes()
    # A list of tars and a glob name the same rows.
    listed = read_manifest(sorted(both_layouts["tars"].glob("*.tar")))
    globbed = read_manifest(str(both_layouts["tars"] / "*.tar"))
    assert [r.span for r in listed.rows] == [r.span for r in globbed.rows] == [r.span for r in tars.rows]


def test_tar_and_files_layouts_store_identical_features(both_layouts, tmp_path):
    stores = {}
    for layout in ("files", "tars"):
        out = tmp_path / layout
        stats = Job(job_config(both_layouts[layout], out, runner="local", shard_size=4)).run()
        assert stats.videos_ok == 6 and stats.videos_failed == 0, stats
        stores[layout] = out
    a, b = snapshot(stores["files"]), snapshot(stores["tars"])
    assert a["counts"] == b["counts"] == (6, 0, 0)
    assert list(a["videos"]) == list(b["videos"])
    for vid, arrays in a["videos"].items():
        for name, value in arrays.items():
            other = b["videos"][vid][name]
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and np.array_equal(value, other), f"{vid}/{name} differs"
            else:
                assert value == other, f"{vid}/{name} differs"
    ra, rb = open_store(stores["files"]), open_store(stores["tars"])
    assert all(ra.meta(v) == rb.meta(v) for v in ra.video_ids)


def test_bad_tars_give_per_video_failures(demo_corpus, tmp_path):
    samples = v2d_samples(demo_corpus, 8)  # shards 00000 and 00001
    samples[1]["txt"] = b""  # a member without a caption: empty KEY.txt, and the JSON has none either
    samples[1]["json"] = json.dumps({"key": samples[1]["key"], "status": "success"}).encode()
    folder = write_tars(tmp_path / "tars", samples)
    # Truncated download: shard 00001 cut inside its last video.
    last = folder / "00001.tar"
    data = last.read_bytes()
    rows = {r.video_id: r for r in read_manifest(folder).rows}
    cut_at = rows[samples[7]["key"]].span[0] + 100
    last.write_bytes(data[:cut_at])
    rows = read_manifest(folder).rows
    keys = [s["key"] for s in samples]
    assert [r.video_id for r in rows] == keys
    errors = {r.video_id: r.error for r in rows if r.error}
    assert set(errors) == {keys[1], keys[7]}
    assert "empty caption" in errors[keys[1]]
    assert "is truncated" in errors[keys[7]] and "re-download" in errors[keys[7]]
    out = tmp_path / "out"
    stats = Job(job_config(folder, out, runner="local", shard_size=4)).run()
    status = open_store(out).status
    assert (status.ok, status.failed, status.pending) == (6, 2, 0), stats
    assert {vid for vid, _ in status.failures} == {keys[1], keys[7]}


def test_a_sample_without_video_is_a_per_video_failure(demo_corpus, tmp_path):
    samples = v2d_samples(demo_corpus, 2)
    folder = tmp_path / "tars"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for ext in ("json", "mp4", "txt"):
            add_member(tar, f"{samples[0]['key']}.{ext}", samples[0][ext])
        for ext in ("json", "txt"):
            add_member(tar, f"{samples[1]['key']}.{ext}", samples[1][ext])
    rows = read_manifest(folder).rows
    assert rows[0].error is None and "has no 000000001.mp4 member" in rows[1].error


def test_duplicate_key_and_corrupt_tars_are_job_errors(demo_corpus, tmp_path):
    samples = v2d_samples(demo_corpus, 2)
    dup = write_tars(tmp_path / "dup", samples)
    write_tars(tmp_path / "other", samples)
    (tmp_path / "other" / "00000.tar").rename(dup / "00001.tar")  # the same keys in a second shard
    with pytest.raises(ManifestError, match=r"duplicate video_id\(s\): '000000000' \(rows 0 and 2\)"):
        read_manifest(dup)
    corrupt = write_tars(tmp_path / "corrupt", samples)
    tar = corrupt / "00000.tar"
    data = bytearray(tar.read_bytes())
    # Overwrite the header of the second sample's first member with garbage.
    with tarfile.open(tar) as t:
        offset = [m.offset for m in t.getmembers() if m.name.startswith(samples[1]["key"])][0]
    data[offset:offset + 512] = b"x" * 512
    tar.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"unreadable tar header at byte \d+"):
        read_manifest(corrupt)
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"this is not a tar" * 100)
    with pytest.raises(ManifestError, match="is not a readable tar file"):
        read_manifest(not_tar)
    with pytest.raises(ManifestError, match="do not exist"):
        read_manifest(tmp_path / "missing.tar")


def test_cli_reads_a_glob_of_tars_and_refuses_a_bad_one(both_layouts, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for tar in both_layouts["tars"].glob("*.tar"):
        (folder / tar.name).write_bytes(tar.read_bytes())
    (folder / "00009.tar").write_bytes(b"not a tar at all" * 64)
    result = cli("extract", "--manifest", folder / "*.tar", "--out", tmp_path / "out", "--runner", "local", *tiny_sets())
    assert result.returncode == 2, result.stderr
    assert "00009.tar is not a readable tar file" in result.stderr and "re-download it or leave it out" in result.stderr
    assert not (tmp_path / "out").exists()


def test_tar_input_with_a_whole_file_backend_stops_the_job(both_layouts, tmp_path):
    """A tar member under a backend that reads whole files only: no video of the job can decode, so the
    job stops (JobStopped, exit 2) naming the fix, instead of a 'bug' traceback or a ledger of failures."""
    import copy

    from _pipeline_helpers import TINY_EXTRACTOR
    from pipeline.runners import JobStopped, WorkerBug

    extractor = copy.deepcopy(TINY_EXTRACTOR)
    extractor["sampling"]["backend"] = "decord"
    out = tmp_path / "out"
    with pytest.raises(JobStopped, match="pyav backend only.*set sampling.backend: pyav") as stopped:
        Job(job_config(both_layouts["tars"], out, extractor=extractor, runner="local", shard_size=4)).run()
    assert not isinstance(stopped.value, WorkerBug) and stopped.value.exit_code == 2
    assert open_store(out).status.failed == 0 and not list((out / "ledgers").glob("*.json"))
