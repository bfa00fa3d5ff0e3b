"""The demo corpus: real H.264 files, boxes for every frame, twins, determinism."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

from pipeline import demo


def test_corpus_files_are_real_h264_with_a_box_per_frame(demo_corpus):
    for row in demo_corpus["rows"]:
        with av.open(str(demo_corpus["root"] / row["path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        sidecar = json.loads((demo_corpus["root"] / row["boxes"]).read_text())
        assert len(frames) == sidecar["num_frames"] == demo.NUM_FRAMES
        assert frames[0].shape == (demo.HEIGHT, demo.WIDTH, 3)
        for obj in sidecar["objects"]:
            assert len(obj["boxes"]) == demo.NUM_FRAMES
            assert obj["color"] in row["caption"] and obj["shape"] in row["caption"]
            seen = []
            for t, box in enumerate(obj["boxes"]):
                if box is None:
                    continue
                x1, y1, x2, y2 = box
                assert 0 <= x1 < x2 <= demo.WIDTH and 0 <= y1 < y2 <= demo.HEIGHT
                patch = frames[t][int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].astype(int)  # [h, w, 3]
                # H.264 is lossy and objects may overlap: the colour must show in the box, loosely.
                seen.append((np.abs(patch - demo.COLORS[obj["color"]]).max(-1) < 50).any())
            assert np.mean(seen) >= 0.8, (row["video_id"], obj["color"], obj["shape"])


def test_twins_swap_colours_and_keep_the_words(demo_corpus):
    rows = {r["video_id"]: r for r in demo_corpus["rows"]}
    held_out = [r for r in rows.values() if r["split"] in ("val", "test")]
    assert held_out and all(r["twin"] in rows for r in held_out)
    for row in held_out:
        twin = rows[row["twin"]]
        assert twin["twin"] == row["video_id"] and twin["split"] == row["split"]
        assert row["caption"] != twin["caption"]
        assert sorted(row["caption"].split()) == sorted(twin["caption"].split())
    assert all(r["twin"] == "" for r in rows.values() if r["split"] == "train")


def test_corpus_is_deterministic_and_regenerated_only_when_asked(tmp_path, demo_corpus):
    manifest = demo.make_demo_corpus(tmp_path, videos=12, seed=0, workers=1)
    assert manifest.read_text() == demo_corpus["manifest"].read_text()
    for row in demo_corpus["rows"]:
        assert (tmp_path / row["path"]).read_bytes() == (demo_corpus["root"] / row["path"]).read_bytes()
    mtime = manifest.stat().st_mtime_ns
    demo.make_demo_corpus(tmp_path, videos=12, seed=0)
    assert manifest.stat().st_mtime_ns == mtime
    other = demo.make_demo_corpus(tmp_path / "other", videos=12, seed=1)
    assert other.read_text() != manifest.read_text()


def test_entering_and_leaving_objects_are_out_of_view_part_of_the_clip():
    planned = demo.plan_corpus(400, seed=3, val_videos=0, test_videos=0)
    objects = [o for v in planned for o in v.objects]
    enters = [o for o in objects if o.event == "enters"]
    leaves = [o for o in objects if o.event == "leaves"]
    assert enters and leaves
    for o in enters:
        assert o.box(0) is None and o.box(demo.NUM_FRAMES - 1) is not None, o
    for o in leaves:
        assert o.box(0) is not None and o.box(demo.NUM_FRAMES - 1) is None, o
    for o in objects:
        if o.event == "stays":
            assert all(o.box(t) is not None for t in range(demo.NUM_FRAMES)), o


@pytest.mark.parametrize("videos,val,test", [(0, 0, 0), (10, 3, 2), (4, 2, 4)])
def test_bad_corpus_sizes_are_refused(tmp_path, videos, val, test):
    with pytest.raises(ValueError):
        demo.make_demo_corpus(tmp_path, videos=videos, val_videos=val, test_videos=test)


def test_dataset_demo_section_is_read_strictly():
    assert demo.corpus_kwargs({"videos": 400, "val_videos": 100, "test_videos": 100}) == {
        "videos": 400, "seed": 0, "val_videos": 100, "test_videos": 100}
    with pytest.raises(ValueError, match="vidoes"):
        demo.corpus_kwargs({"vidoes": 400})
    with pytest.raises(ValueError, match="integers"):
        demo.corpus_kwargs({"videos": "400"})
