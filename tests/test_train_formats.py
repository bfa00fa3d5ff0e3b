"""Zero-shot manifest converters on small hand-written files in each benchmark's format."""
import csv
import json


from train.evaluate import split_captions
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
    assert split_captions([r["caption"] for r in rows]) == (["a man talks", "a person speaks"], 2)


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
