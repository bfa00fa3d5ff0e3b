"""Real path: the demo corpus extracted with the ablation's config (given boxes, pretrained trunk), a
short training run on it, and `vlpcache show` with the phrase attention of the checkpoint."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.show import main as show_main
from train.cli import train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_features(demo_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_demo") / "features"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--config",
                           str(ROOT / "configs/train/ablation_extract.yaml"), "--manifest", str(demo_corpus["manifest"]),
                           "--video-root", str(demo_corpus["root"]), "--out", str(out), "--runner", "local",
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert (out / "store.json").is_file(), proc.stderr[-3000:]
    return out


def test_train_and_show_attention(demo_features, demo_corpus, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--features", str(demo_features), "--out", str(run), "--steps", "3", "--batch-size", "4",
                       "--eval-split", "test", "--align-weight", "1"]) == 0
    video_id = demo_corpus["rows"][0]["video_id"]
    png = tmp_path / "show.png"
    assert show_main([str(demo_features), video_id, "--png", str(png), "--checkpoint", str(run)]) == 0
    import matplotlib.image

    img = matplotlib.image.imread(png)
    n_phrases = demo_corpus["rows"][0]["caption"].count(" a ") + 1  # one attention row per clause
    assert img.shape[0] > 100 * (1 + n_phrases) and np.std(img) > 0.05  # frames drawn, not blank


def test_show_bad_input(demo_features, tmp_path, capsys):
    assert show_main([str(demo_features), "no-such-video", "--png", str(tmp_path / "x.png")]) == 2
    assert "no-such-video" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
