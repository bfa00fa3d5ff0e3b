"""The ablation's bookkeeping: the code version that keys its result cache, the table naming each row's
commit and val-selected steps, and model selection's score."""
import subprocess

from train.ablation import code_version, selection_score, table
from train.config import load_config


def test_code_version_names_the_commit_and_the_dirty_state():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    v = code_version()
    assert v["commit"] == head and isinstance(v["dirty"], bool)
    assert bool(v["diff"]) == v["dirty"]  # a dirty tree is keyed by its diff too


def _result(row, seed, binding, commit="abc1234567890", dirty=False, loc_weight=0.0, **moments):
    metrics = {"binding_acc": binding, "t2v_R@1": 50.0, "t2vavg_R@1": 49.0, "videos": 100.0, "binding_pairs": 100.0,
               **moments}
    return {"row": row, "seed": seed, "metrics": metrics, "selected_step": 100 * (seed + 1), "val": {"videos": 100.0},
            "train_videos": 400, "steps": 200, "batch_size": 64, "wall_s": 30.0,
            "config": load_config(None, [f"loss.loc_weight={loc_weight}"]).to_dict(),
            "code": {"commit": commit, "dirty": dirty, "diff": "d1f" if dirty else ""}}


def test_table_gives_mean_std_steps_and_the_commit_of_each_row():
    text = table({"global": [_result("global", 0, 50.0), _result("global", 1, 54.0)],
                  "align": [_result("align", 0, 90.0, dirty=True)]})
    lines = text.splitlines()
    assert "code" in lines[0] and "val-selected steps" in lines[0]
    glob = next(ln for ln in lines if ln.startswith("| global"))
    assert "52.0 ± 2.8" in glob and "100/200" in glob and "abc1234567" in glob and "dirty" not in glob
    assert "–" in glob  # no moment figures without moments
    assert "abc1234567+dirty(d1f)" in next(ln for ln in lines if ln.startswith("| + region-word"))


def test_table_gives_both_window_baselines_and_the_heads_gap_to_the_stronger():
    clip, fsum = "window_clip_R@1_IoU0.7", "moment_R@1_IoU0.7"
    text = table({"global": [_result("global", 0, 50.0, **{fsum: 48.0, clip: 30.0})],
                  "align": [_result("align", 0, 90.0, **{fsum: 45.0, clip: 62.0}), _result("align", 1, 90.0, **{fsum: 45.0, clip: 58.0})],
                  "loc": [_result("loc", 0, 50.0, loc_weight=1.0, **{fsum: 96.0})]})
    lines = text.splitlines()
    assert "window (clip-encoded) R@1@0.7" in lines[0]
    assert "| 60.0 ± 2.8 |" in next(ln for ln in lines if ln.startswith("| + region-word"))
    assert "window (clip-encoded) of the `align` row, 60.0): loc 96.0 (+36.0)" in text


def test_selection_score_counts_moments_only_with_the_head():
    m = {"t2v_R@1": 60.0, "binding_acc": 90.0, "moment_R@1_IoU0.7": 40.0}
    assert selection_score(m, load_config(None)) == 150.0
    assert selection_score(m, load_config(None, ["loss.loc_weight=1.0"])) == 190.0
