"""Zero-shot manifest converters on small hand-written files in each benchmark's format."""
import csv
import json


import numpy as np

from train.formats import main


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_msrvtt_1ka_csv(tmp_path):
    src = tmp_path / "MSRVTT_JSFUSION_test.csv"
    src.write_text("key,vid_key,video_id,sentence\n"
                   "ret0,msr7579,video7579,a girl wearing red top and black trousers is putting a sweater on a dog\n"
                   "ret1,msr7725,video7725,young people sit around the edges of a room clapping \n")
    assert main(["msrvtt", str(src), "--out", str(tmp_path / "m.csv")]) == 0
    rows = _read(tmp_path / "m.csv")
    assert [r["video_id"] for r in rows] == ["video7579", "video7725"]
    assert rows[0]["path"] == "video7579.mp4" and rows[1]["caption"].endswith("clapping")
    assert list(rows[0]) == ["video_id", "path", "caption"]


def test_msrvtt_json_one_row_per_1ka_video_with_all_its_captions(tmp_path):
    src = tmp_path / "MSRVTT_data.json"
    src.write_text(json.dumps({"sentences": [{"video_id": "video1", "caption": "a man talks", "sen_id": 0},
                                             {"video_id": "video9", "caption": "a train split clip", "sen_id": 1},
                                             {"video_id": "video1", "caption": "a person  speaks", "sen_id": 2}]}))
    assert main(["msrvtt", str(src), "--out", str(tmp_path / "m.csv")]) == 2  # every split: refused
    jsfusion = tmp_path / "MSRVTT_JSFUSION_test.csv"
    jsfusion.write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,a man talks\n")
    assert main(["msrvtt", str(src), "--test-csv", str(jsfusion), "--out", str(tmp_path / "m.csv")]) == 0
    rows = _read(tmp_path / "m.csv")
    assert [(r["video_id"], r["path"]) for r in rows] == [("video1", "video1.mp4")]  # 1k-A only, one row
    assert rows[0]["caption"] == "a man talks"
    assert json.loads(rows[0]["captions"]) == ["a man talks", "a person speaks"]


def _msrvtt_store(tmp_path, rows_of_manifest, old_form=False):
    """A real zarr store whose videos are the manifest's rows (read by the pipeline's manifest reader,
    captions and extra columns kept as the extractor keeps them), with synthetic features."""
    from _train_helpers import _arrays, _scene
    from pipeline.manifest import read_manifest
    from stores import create_store
    from stores.schema import Dims

    rows = read_manifest(str(rows_of_manifest), tmp_path).rows
    dims, rng = Dims(T=4, K=3, Df=16, Dr=24), np.random.default_rng(0)
    basis = {k: rng.standard_normal((4, d)) for k, d in
             (("color", 24), ("shape", 24), ("frame_color", 16), ("frame_shape", 16))}
    out = tmp_path / ("old" if old_form else "store")
    w = create_store(out, "zarr", dims=dims, n_videos=len(rows), shard_size=8, provenance={"t": "msrvtt"},
                     video_ids=[r.video_id for r in rows])
    sw = w.shard_writer(0)
    for i, r in enumerate(rows):
        caption = "\n".join(json.loads(r.meta["captions"])) if old_form else r.caption
        meta = {} if old_form else r.meta
        sw.put(i, r.video_id, caption, _arrays(_scene(rng, 2), rng, dims, basis), meta=meta)
    sw.commit()
    return out


def test_msrvtt_multi_caption_end_to_end(tmp_path, capsys):
    """MSRVTT_data.json -> manifest (`captions` column) -> store -> train (one caption sampled per epoch)
    -> eval with q = 2 captions per video; the old one-caption-per-line form is a clear error."""
    from train.cli import eval_main, train_main

    ids = [f"video{i}" for i in range(8)]
    sentences = [{"video_id": v, "caption": f"a {c} thing number {i}", "sen_id": 2 * i + k}
                 for i, v in enumerate(ids) for k, c in enumerate(("red", "blue"))]
    src = tmp_path / "MSRVTT_data.json"
    src.write_text(json.dumps({"sentences": sentences}))
    jsfusion = tmp_path / "MSRVTT_JSFUSION_test.csv"
    jsfusion.write_text("key,vid_key,video_id,sentence\n" + "".join(f"r{i},m{i},{v},x\n" for i, v in enumerate(ids)))
    manifest = tmp_path / "m.csv"
    assert main(["msrvtt", str(src), "--test-csv", str(jsfusion), "--out", str(manifest)]) == 0
    for v in ids:
        (tmp_path / f"{v}.mp4").write_bytes(b"")  # the manifest reader checks nothing more here
    store = _msrvtt_store(tmp_path, manifest)
    run = tmp_path / "run"
    assert train_main(["--features", str(store), "--out", str(run), "--split", "", "--eval-split", "",
                       "--steps", "1", "--batch-size", "4", "--workers", "0"]) == 0
    assert eval_main(["--checkpoint", str(run), "--features", str(store), "--split", ""]) == 0
    m = json.loads((run / "eval_all.json").read_text())
    assert m["captions_per_video"] == 2 and m["videos"] == 8 and "t2v_R@1" in m
    old = _msrvtt_store(tmp_path, manifest, old_form=True)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(run), "--features", str(old), "--split", ""]) == 2
    assert "no longer given one per line" in capsys.readouterr().err


DIDEMO = [
    {"video": "v_a.mp4", "description": "the dog runs.", "times": [[1, 1], [1, 1], [1, 2], [0, 1]],
     "annotation_id": 1},
    {"video": "v_a.mp4", "description": "a man waves.", "times": [[0, 0], [0, 0], [0, 1], [0, 0]],
     "annotation_id": 2},
    {"video": "v_b.mp4", "description": "a car passes.", "times": [[2, 3], [3, 3], [2, 3], [2, 3]],
     "annotation_id": 3},
]


def test_didemo_paragraphs_and_moments(tmp_path):
    src = tmp_path / "test_data.json"
    src.write_text(json.dumps(DIDEMO))
    assert main(["didemo", str(src), "--out", str(tmp_path / "p.csv")]) == 0
    rows = _read(tmp_path / "p.csv")
    # paragraph protocol: one row per video, descriptions in time order (segment 0 before segment 1)
    assert rows[0] == {"video_id": "v_a", "path": "v_a.mp4", "caption": "a man waves. the dog runs."}
    assert main(["didemo", str(src), "--out", str(tmp_path / "m.csv"), "--moments"]) == 0
    moments = _read(tmp_path / "m.csv")
    # most annotators: [1,1] -> 5..10 s; [0,0] -> 0..5 s; [2,3] -> 10..20 s
    assert [(m["start"], m["end"]) for m in moments] == [("5", "10"), ("0", "5"), ("10", "20")]


def test_charades_sta(tmp_path):
    src = tmp_path / "charades_sta_test.txt"
    src.write_text("3MSZA 24.3 30.4##person turn a light on.\n3MSZA 0 6.1##a person is sitting.\n")
    assert main(["charades", str(src), "--out", str(tmp_path / "c.csv")]) == 0
    rows = _read(tmp_path / "c.csv")
    assert rows[0] == {"video_id": "3MSZA_m0", "path": "3MSZA.mp4", "caption": "person turn a light on.",
                       "start": "24.3", "end": "30.4"}
    assert rows[1]["start"] == "0" and rows[1]["end"] == "6.1"


def test_malformed_inputs_name_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("3MSZA 24.3##no end time\n")
    assert main(["charades", str(bad), "--out", str(tmp_path / "c.csv")]) == 2
    assert "bad.txt:1" in capsys.readouterr().err
    csvf = tmp_path / "bad.csv"
    csvf.write_text("vid,text\nx,y\n")
    assert main(["msrvtt", str(csvf), "--out", str(tmp_path / "m.csv")]) == 2
    assert "missing ['sentence', 'video_id']" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()
