"""The whole path through the real commands: demo corpus → extract (Ray) → status/verify → train → eval."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

VLPCACHE = [sys.executable, "-m", "pipeline"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*VLPCACHE, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"vlpcache {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def features(demo_corpus, tmp_path_factory):
    """The 12-clip demo corpus extracted with given boxes and the pretrained EfficientNet-Lite0."""
    out = tmp_path_factory.mktemp("e2e") / "features"
    config = out.parent / "extract.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"shard_size": 5, "batch_videos": 4},
        "extractor": {
            "sampling": {"num_frames": 8},
            "frame_encoder": {"model": "efficientnet_lite0", "weights": "pkg:efficientnet_lite0"},
            "regions": {"kind": "given", "backbone": "frame_encoder", "max_boxes": 4, "min_boxes": 0},
        },
    }))
    run("extract", "--config", str(config), "--manifest", str(demo_corpus["manifest"]),
        "--video-root", str(demo_corpus["root"]), "--out", str(out), "--num-cpus", "2", "--no-progress")
    return out


def test_extracted_store_is_complete_and_verifies(features, demo_corpus):
    status = json.loads(run("status", str(features), "--json").stdout)
    assert (status["ok"], status["failed"], status["pending"]) == (len(demo_corpus["rows"]), 0, 0)
    run("verify", str(features))

    import stores

    reader = stores.open_store(features)
    assert reader.video_ids == [r["video_id"] for r in demo_corpus["rows"]]
    item = reader[reader.video_ids[0]]
    assert item["caption"] == demo_corpus["rows"][0]["caption"]
    assert item["frame_features"].shape == (8, reader.dims.Df) and item["frame_features"].any()
    # Given boxes: one region per object in view at each sampled frame, as the sidecar says.
    sidecar = json.loads((demo_corpus["root"] / demo_corpus["rows"][0]["boxes"]).read_text())
    frames = [round(float(t) * sidecar["fps"]) for t in item["frame_times"]]
    in_view = [sum(o["boxes"][f] is not None for o in sidecar["objects"]) for f in frames]
    assert item["region_counts"].tolist() == in_view


def test_train_then_eval_learns_the_training_clips(features, tmp_path):
    run_dir = tmp_path / "run"
    run("train", "--features", str(features), "--out", str(run_dir), "--split", "train", "--eval-split", "val",
        "--steps", "40", "--batch-size", "8", "--eval-every", "40", "--ckpt-every", "40")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and (run_dir / "checkpoint.pt").exists()

    train_json, test_json = tmp_path / "train.json", tmp_path / "test.json"
    run("eval", "--checkpoint", str(run_dir), "--features", str(features), "--split", "train", "--json", str(train_json))
    run("eval", "--checkpoint", str(run_dir), "--features", str(features), "--split", "test", "--json", str(test_json))
    on_train, on_test = json.loads(train_json.read_text()), json.loads(test_json.read_text())
    assert on_train["videos"] == 8 and on_test["videos"] == 2
    # 8 training clips: chance t2v R@1 is 12.5%; 40 steps must have learnt them well above it.
    assert on_train["t2v_R@1"] >= 50, on_train
    for metrics in (on_train, on_test):
        for key in ("t2v_R@1", "t2v_R@5", "v2t_R@1", "v2t_R@10"):
            assert 0 <= metrics[key] <= 100
        assert metrics["t2v_MedR"] >= 1 and metrics["t2v_MeanR"] >= 1
