"""The extraction job with the in-process runner (no Ray): inputs, bad input, resume, retry-failed,
exit status, stats. Real videos, real models (tiny sizes), real Zarr/HDF5 stores."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline_helpers import TINY_EXTRACTOR, assert_same_store, cli, job_config, snapshot, tiny_sets
from pipeline.extract import main as extract_main
from pipeline.job import Job
from pipeline.work import ModelRunner
from stores import open_store


def write_manifest(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def bad_corpus(demo_corpus, tmp_path_factory):
    """6 good demo videos plus one of each bad kind, interleaved, with extra columns."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(demo_corpus["root"] / "videos", root / "videos")
    good = demo_corpus["rows"][:6]
    data = (root / "videos" / f"{good[0]['video_id']}.mp4").read_bytes()
    (root / "videos" / "garbage.mp4").write_bytes(b"this is not an mp4 file" * 100)
    (root / "videos" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    rows = [{"video_id": r["video_id"], "path": r["path"], "caption": r["caption"], "split": r["split"]} for r in good]
    bad = [
        {"video_id": "garbage", "path": "videos/garbage.mp4", "caption": "not a video", "split": "train"},
        {"video_id": "truncated", "path": "videos/truncated.mp4", "caption": "cut short", "split": "train"},
        {"video_id": "missing", "path": "videos/missing.mp4", "caption": "no file", "split": "train"},
        {"video_id": "nopath", "path": "", "caption": "no path", "split": "train"},
        {"video_id": "nocaption", "path": good[2]["path"], "caption": "", "split": "train"},
        {"video_id": "../escape", "path": good[3]["path"], "caption": "escapes", "split": "train"},
    ]
    merged = [x for pair in zip(rows, bad) for x in pair]
    return {"root": root, "manifest": write_manifest(root / "manifest.csv", merged), "rows": merged}


@pytest.fixture(scope="module")
def bad_run(bad_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_out") / "out"
    cfg = job_config(bad_corpus["manifest"], out, runner="local")
    return {"out": out, "stats": Job(cfg).run()}


def test_bad_videos_and_rows_are_recorded_and_the_job_goes_on(bad_run, bad_corpus):
    stats, reader = bad_run["stats"], open_store(bad_run["out"])
    assert stats.exit_reason == "" and stats.videos_ok == 6 and stats.videos_failed == 6
    assert reader.video_ids == [r["video_id"] for r in bad_corpus["rows"][:12:2]]
    errors = dict(reader.status.failures)
    assert set(errors) == {"garbage", "truncated", "missing", "nopath", "nocaption", "../escape"}
    assert "decode:" in errors["garbage"] and "decode:" in errors["truncated"]
    assert "video file not found" in errors["missing"]
    assert "empty path" in errors["nopath"]
    assert "empty caption" in errors["nocaption"] and "escape" in errors["../escape"]
    assert reader.status.pending == 0
    assert stats.failed_by_reason["decode"] == 3
    assert reader.meta(reader.video_ids[0]) == {"split": "train"}
    first = reader[reader.video_ids[0]]
    assert first["frame_features"].shape == (4, reader.dims.Df) and first["region_counts"].tolist() == [4] * 4
    run_files = list((bad_run["out"] / "runs").glob("*.json"))
    assert len(run_files) == 1 and json.loads(run_files[0].read_text())["videos_failed"] == 6
    assert (bad_run["out"] / "extract_config.yaml").exists()


def test_local_run_matches_direct_model_call(bad_run, bad_corpus):
    """The pipeline's arrays are the extractor's own outputs for that video, cast to the schema."""
    from extractors.decode import decode_clip
    from pipeline.work import Decoded

    runner = ModelRunner(TINY_EXTRACTOR)
    video_id = bad_corpus["rows"][0]["video_id"]
    clip = decode_clip(str(bad_corpus["root"] / bad_corpus["rows"][0]["path"]), runner.config.sampling)
    direct = runner([Decoded(0, clip)]).arrays[0]
    stored = open_store(bad_run["out"])[video_id]
    for name, value in direct.items():
        np.testing.assert_allclose(stored[name].astype(np.float32), value.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_retry_failed_redoes_only_failed_videos(bad_run, bad_corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(bad_run["out"], out)
    before = snapshot(out)
    # Repair the missing video; garbage stays garbage.
    shutil.copy(bad_corpus["root"] / bad_corpus["rows"][0]["path"], bad_corpus["root"] / "videos" / "missing.mp4")
    try:
        stats = Job(job_config(bad_corpus["manifest"], out, runner="local", retry_failed=True)).run()
    finally:
        (bad_corpus["root"] / "videos" / "missing.mp4").unlink()
    after = snapshot(out)
    assert stats.videos_kept == 6 and stats.videos_ok == 1 and stats.videos_failed == 5
    assert "missing" in after["videos"] and after["counts"] == (7, 5, 0)
    for vid, arrays in before["videos"].items():  # kept rows are bit-for-bit the old ones
        for name, value in arrays.items():
            assert np.array_equal(value, after["videos"][vid][name]) if isinstance(value, np.ndarray) else value == after["videos"][vid][name]


def test_resume_skips_committed_shards_and_redoes_the_rest(demo_corpus, tmp_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    Job(job_config(demo_corpus["manifest"], full, runner="local")).run()
    shutil.copytree(full, partial)
    # Forget shard 1 as a crash before its commit would: no ledger, a stale partial folder.
    (partial / "ledgers" / "shard-000001.json").unlink()
    (partial / ".partial" / "shard-000001-1-deadbeef").mkdir(parents=True)
    stats = Job(job_config(demo_corpus["manifest"], partial, runner="local")).run()
    assert stats.shards_skipped == 2 and stats.shards_done == 1 and stats.videos_ok == 4
    assert_same_store(full, partial)


def test_hdf5_store_and_given_boxes(demo_corpus, tmp_path):
    extractor = {**TINY_EXTRACTOR, "regions": {**TINY_EXTRACTOR["regions"], "kind": "given"}}
    rows = demo_corpus["rows"][:4]
    stats = Job(job_config(demo_corpus["manifest"], tmp_path / "out", extractor=extractor, runner="local", store="hdf5",
                           shard_size=6)).run()
    assert stats.exit_reason == "" and stats.videos_failed == 0
    reader = open_store(tmp_path / "out")
    assert (tmp_path / "out" / "features.h5").exists()
    for row in rows:
        sidecar = json.loads((demo_corpus["root"] / row["boxes"]).read_text())
        stored = reader[row["video_id"]]
        # classes = object index of the sidecar; a frame shows at most the sidecar's objects
        assert stored["region_counts"].max() <= len(sidecar["objects"])
        assert set(stored["region_classes"][stored["region_classes"] >= 0].tolist()) <= set(range(len(sidecar["objects"])))


def test_oom_halves_the_batch(demo_corpus, tmp_path):
    """A real stage behind a fault injector that runs out of memory above 4 frames."""
    runner = ModelRunner(TINY_EXTRACTOR)
    real = runner.stage

    def limited(frames, given=None):
        if len(frames) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(frames, given)

    from extractors.decode import decode_clip
    from pipeline.work import Decoded

    clips = [decode_clip(str(demo_corpus["root"] / r["path"]), runner.config.sampling) for r in demo_corpus["rows"][:3]]
    runner.stage = limited
    encoded = runner([Decoded(i, c) for i, c in enumerate(clips)])
    assert encoded.rows == [0, 1, 2] and encoded.batch_splits == 2  # 3 -> 1 + 2 -> 1 + 1 + 1
    runner.stage = real
    for i, clip in enumerate(clips):
        alone = runner([Decoded(i, clip)]).arrays[0]
        assert all(np.array_equal(alone[k], encoded.arrays[i][k]) for k in alone)


def test_cli_exit_status_and_failure_rate(bad_corpus, tmp_path, capsys):
    args = ["--manifest", str(bad_corpus["manifest"]), "--out", str(tmp_path / "out"), "--runner", "local",
            "--shard-size", "6", "--no-progress", *tiny_sets()]
    assert extract_main(args + ["--max-failure-rate", "0.4"]) == 1
    out = capsys.readouterr().out
    assert "failure rate 0.500 exceeds --max-failure-rate 0.4" in out and "3 x decode" in out
    assert extract_main(args + ["--max-failure-rate", "1"]) == 0  # all committed: nothing to do, the rate is allowed
    out = capsys.readouterr().out
    assert "store: 6 ok, 6 failed, 0 pending of 12" in out and "2 already committed" in out


def test_cli_refuses_what_it_cannot_run(demo_corpus, bad_run, tmp_path, capsys):
    assert extract_main(["--dataset", "nope"]) == 2
    assert "no dataset config" in capsys.readouterr().err
    assert extract_main(["--manifest", str(demo_corpus["manifest"]), "--out", str(tmp_path), "--set", "run.bogus=1"]) == 2
    assert "unknown key(s) ['run.bogus']" in capsys.readouterr().err
    # Another extractor config into an existing store: refused, the store is untouched.
    args = ["--manifest", str(demo_corpus["manifest"]), "--out", str(bad_run["out"]), "--runner", "local", *tiny_sets(),
            "--set", "extractor.sampling.num_frames=2"]
    assert extract_main(args) == 2
    assert "already holds a store" in capsys.readouterr().err
    args = ["--manifest", str(demo_corpus["manifest"]), "--out", str(tmp_path / "w"), "--runner", "local", *tiny_sets(),
            "--set", "extractor.frame_encoder.weights=/nonexistent/weights.pth"]
    assert extract_main(args) == 2
    assert "could not build the models" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_webvid_dataset_config_says_what_to_put_where(tmp_path):
    result = cli("extract", "--dataset", "webvid", "--out", tmp_path)
    assert result.returncode == 2
    assert "data/webvid/results_2M_val.csv does not exist. Put the manifest there" in result.stderr
    assert "{video_root}/{page_dir}/{videoid}.mp4" in result.stderr


def test_timeout_kills_the_decode(demo_corpus, tmp_path):
    stats = Job(job_config(demo_corpus["manifest"], tmp_path / "out", runner="local", timeout_s=0.001, shard_size=12)).run()
    reader = open_store(tmp_path / "out")
    assert stats.videos_failed == len(demo_corpus["rows"]) and reader.status.pending == 0
    assert all("did not finish within" in e for _, e in reader.status.failures)


def test_webvid_csv_extraction(demo_corpus, sample_videos, tmp_path):
    """A results_2M-style CSV, videos at {video_root}/{page_dir}/{videoid}.mp4, one of them absent."""
    root = tmp_path / "videos"
    ids = ["1066673279", "1045532581", "31336285"]
    for vid, src in zip(ids, [sample_videos[2], sample_videos[1]]):
        (root / "027701_027750").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "027701_027750" / f"{vid}.mp4")
    header = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]
    with open(tmp_path / "results_2M_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, vid in enumerate(ids):
            w.writerow([vid, f"clip number {i}", "5", "027701_027750", "PT00H00M10S", f"https://example.org/{vid}.mp4"])
    stats = Job(job_config(tmp_path / "results_2M_val.csv", tmp_path / "out", video_root=root, runner="local")).run()
    reader = open_store(tmp_path / "out")
    assert reader.video_ids == ids[:2] and stats.videos_failed == 1
    assert "video file not found" in dict(reader.status.failures)["31336285"]
    assert reader[ids[0]]["caption"] == "clip number 0"
    assert reader.meta(ids[0])["duration_s"] == "10.0" and reader.meta(ids[0])["page_dir"] == "027701_027750"
    times = reader[ids[1]]["frame_times"]
    assert np.all(np.diff(times) > 0) and times[-1] < 10.0  # 4 frames spread over the 10 s video


def test_jsonl_and_video2dataset_extraction(demo_corpus, sample_videos, tmp_path):
    rows = demo_corpus["rows"][:3]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"video_id": r["video_id"], "path": r["path"], "caption": r["caption"],
                                         "split": r["split"], "start": 0.5, "end": 2.5}) + "\n" for r in rows))
    Job(job_config(jsonl, tmp_path / "out_jsonl", video_root=demo_corpus["root"], runner="local")).run()
    reader = open_store(tmp_path / "out_jsonl")
    assert reader.video_ids == [r["video_id"] for r in rows]
    times = reader[rows[0]["video_id"]]["frame_times"]
    assert times.min() >= 0.5 and times.max() <= 2.5  # the start/end window was honoured

    v2d = tmp_path / "v2d"
    for i, src in enumerate(sample_videos[1:]):
        shard = v2d / f"{i // 2:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        key = f"{i // 2:05d}{i % 2:04d}"
        shutil.copy(src, shard / f"{key}.mp4")
        (shard / f"{key}.txt").write_text(f"sample {src.stem}")
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "url": f"http://x/{src.name}", "status": "success"}))
    stats = Job(job_config(v2d, tmp_path / "out_v2d", runner="local", shard_size=2)).run()
    reader = open_store(tmp_path / "out_v2d")
    assert stats.videos_ok == 3 and reader.video_ids == ["000000000", "000000001", "000010000"]
    assert reader["000000000"]["caption"] == f"sample {sample_videos[1].stem}"
    assert reader.meta("000000001")["url"] == f"http://x/{sample_videos[2].name}"


def test_a_video_the_models_fail_on_fails_alone(demo_corpus):
    """A real stage behind a fault injector that rejects one video's frames: only that video fails."""
    from extractors.decode import decode_clip
    from pipeline.work import Decoded

    runner = ModelRunner(TINY_EXTRACTOR)
    real = runner.stage
    clips = [decode_clip(str(demo_corpus["root"] / r["path"]), runner.config.sampling) for r in demo_corpus["rows"][:3]]
    poison = clips[1].frames[0]

    def picky(frames, given=None):
        if any(f is poison for f in frames):
            raise ValueError("unsupported frame (injected)")
        return real(frames, given)

    runner.stage = picky
    encoded = runner([Decoded(i, c) for i, c in enumerate(clips)])
    assert encoded.rows == [0, 2] and list(encoded.errors) == [1]
    assert encoded.errors[1] == "encode: ValueError: unsupported frame (injected)"
