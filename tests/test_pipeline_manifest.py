"""Manifest readers, shard planning and job config: every input format and every kind of bad row."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_override, job_config_from_dict
from pipeline.manifest import ManifestError, iso8601_seconds, read_manifest
from pipeline.shard import plan_shards


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_generic_csv_keeps_extra_columns_and_resolves_paths(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["video_id", "path", "caption", "split", "start", "end"],
                  [["a", "v/a.mp4", "a cat", "train", "1.5", "3"], ["b", "/abs/b.mp4", "a dog", "val", "", ""]])
    manifest = read_manifest(m, video_root=tmp_path / "root")
    assert manifest.format == "generic"
    a, b = manifest.rows
    assert (a.video_id, a.path, a.caption) == ("a", str(tmp_path / "root" / "v/a.mp4"), "a cat")
    assert a.meta == {"split": "train", "start": "1.5", "end": "3"}
    assert a.window == (1.5, 3.0) and b.window is None
    assert b.path == "/abs/b.mp4" and a.error is None and b.error is None


def test_bad_rows_become_failures_in_place_never_dropped(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["video_id", "path", "caption"], [
        ["a", "a.mp4", "ok"],
        ["b", "b.mp4", "   "],
        ["../evil", "c.mp4", "escapes"],
        ["x/y", "d.mp4", "separator"],
        [".hidden", "e.mp4", "dot"],
        ["", "f.mp4", "no id"],
        ["g", "", "no path"],
    ])
    rows = read_manifest(m).rows
    assert len(rows) == 7
    assert rows[0].error is None
    assert "empty caption" in rows[1].error
    for row in rows[2:5]:
        assert "escape" in row.error or "hide" in row.error
    assert "empty video_id" in rows[5].error
    assert "empty path" in rows[6].error


def test_duplicate_ids_are_a_manifest_error(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["video_id", "path", "caption"],
                  [["a", "a.mp4", "x"], ["b", "b.mp4", "y"], ["a", "c.mp4", "z"]])
    with pytest.raises(ManifestError, match=r"duplicate video_id\(s\): 'a' \(rows 0 and 2\); make the ids unique"):
        read_manifest(m)


def test_missing_columns_and_missing_file_are_job_errors(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["id", "file", "text"], [["a", "a.mp4", "x"]])
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['video_id', 'path', 'caption'\]"):
        read_manifest(m)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_jsonl_rows_and_broken_lines(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"video_id": "a", "path": "a.mp4", "caption": "a cat", "split": "train", "boxes": [[1, 2, 3, 4]]}),
        "{not json",
        json.dumps({"video_id": "b", "path": "b.mp4", "caption": ""}),
        "",
    ]))
    rows = read_manifest(m).rows
    assert [r.video_id for r in rows] == ["a", "line2", "b"]
    assert rows[0].meta == {"split": "train", "boxes": "[[1, 2, 3, 4]]"} and rows[0].error is None
    assert "not a JSON object" in rows[1].error
    assert "empty caption" in rows[2].error


@pytest.mark.parametrize("header", [
    ["videoid", "contentUrl", "duration", "page_dir", "name"],  # WebVid-10M partitions
    ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"],  # results_2M_*.csv
])
def test_webvid_layouts_read_by_header(tmp_path, header):
    values = {"videoid": "1234", "contentUrl": "https://x/1234.mp4", "duration": "PT00H00M17S",
              "page_dir": "027701_027750", "name": "Aerial view of a beach", "page_idx": "5"}
    bad = {**values, "videoid": "99", "duration": "17 seconds"}
    m = write_csv(tmp_path / "results.csv", header, [[values[c] for c in header], [bad[c] for c in header]])
    manifest = read_manifest(m, video_root="/data/wv")
    assert manifest.format == "webvid"
    row = manifest.rows[0]
    assert (row.video_id, row.caption, row.path) == ("1234", "Aerial view of a beach", "/data/wv/027701_027750/1234.mp4")
    assert row.meta["duration_s"] == "17.0" and row.meta["contentUrl"] == "https://x/1234.mp4"
    assert "not an ISO 8601 duration" in manifest.rows[1].error
    custom = read_manifest(m, video_root="/v", path_template="{video_root}/{videoid}.mp4")
    assert custom.rows[0].path == "/v/1234.mp4"
    with pytest.raises(ManifestError, match="path template"):
        read_manifest(m, video_root="/v", path_template="{video_root}/{nope}.mp4")


def test_iso8601_durations():
    assert iso8601_seconds("PT00H00M17S") == 17.0
    assert iso8601_seconds("PT1H2M3.5S") == 3723.5
    assert iso8601_seconds("PT45S") == 45.0
    for bad in ("", "PT", "17", "P1Y"):
        with pytest.raises(ValueError):
            iso8601_seconds(bad)


def test_video2dataset_folder(tmp_path):
    for shard, key, caption, has_mp4 in [("00000", "000000000", "first", True), ("00000", "000000001", "second", False),
                                         ("00001", "000010000", "third", True)]:
        d = tmp_path / shard
        d.mkdir(exist_ok=True)
        (d / f"{key}.json").write_text(json.dumps({"key": key, "url": f"http://x/{key}", "status": "success", "caption": caption}))
        (d / f"{key}.txt").write_text(caption)
        if has_mp4:
            (d / f"{key}.mp4").write_bytes(b"\x00")
    (tmp_path / "00000_stats.json").write_text("{}")
    manifest = read_manifest(tmp_path)
    assert manifest.format == "video2dataset"
    assert [r.video_id for r in manifest.rows] == ["000000000", "000000001", "000010000"]
    assert manifest.rows[0].meta["url"] == "http://x/000000000" and manifest.rows[0].caption == "first"
    assert "video file not found" in manifest.rows[1].error
    assert manifest.rows[2].path == str(tmp_path / "00001" / "000010000.mp4")
    with pytest.raises(ManifestError, match="no NNNNN/ shard folders"):
        read_manifest(tmp_path / "00000")


def test_plan_shards_is_fixed_by_order():
    shards = plan_shards(10, 4)
    assert [(s.index, s.start, s.stop) for s in shards] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert sum(len(s) for s in shards) == 10
    with pytest.raises(ValueError):
        plan_shards(10, 0)


def test_config_is_strict():
    data = {"input": {"manifest": "m.csv"}, "run": {"out": "o"}}
    apply_override(data, "run.batch_videos=4")
    apply_override(data, "run.timeout_s=5")
    apply_override(data, "extractor.sampling.num_frames=4")
    cfg = job_config_from_dict(data)
    cfg.validate()
    assert cfg.run.batch_videos == 4 and cfg.run.timeout_s == 5.0 and cfg.extractor == {"sampling": {"num_frames": 4}}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['run.batch_size'\]"):
        job_config_from_dict({"run": {"batch_size": 4}})
    with pytest.raises(ConfigError, match="run.shard_size must be int, got str"):
        job_config_from_dict({"run": {"shard_size": "big"}})
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "batch_videos")
    with pytest.raises(ConfigError, match="run.out is empty"):
        job_config_from_dict({"input": {"manifest": "m.csv"}}).validate()
    with pytest.raises(ConfigError, match="max_inflight_videos"):
        job_config_from_dict({"input": {"manifest": "m"}, "run": {"out": "o", "batch_videos": 8, "max_inflight_videos": 4}}).validate()


def test_config_files_merge_deeply():
    from pipeline.config import deep_merge

    base = {"run": {"out": "o", "shard_size": 8}, "extractor": {"regions": {"kind": "detector", "max_boxes": 10}}}
    over = {"run": {"shard_size": 4}, "extractor": {"regions": {"kind": "grid"}, "sampling": {"num_frames": 4}}}
    assert deep_merge(base, over) == {"run": {"out": "o", "shard_size": 4},
                                      "extractor": {"regions": {"kind": "grid", "max_boxes": 10}, "sampling": {"num_frames": 4}}}
