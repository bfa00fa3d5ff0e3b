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


def _result(row, seed, binding, commit="abc1234567890", dirty=False):
    metrics = {"binding_acc": binding, "t2v_R@1": 50.0, "t2vavg_R@1": 49.0, "videos": 100.0, "binding_pairs": 100.0}
    return {"row": row, "seed": seed, "metrics": metrics, "selected_step": 100 * (seed + 1), "val": {"videos": 100.0},
            "train_videos": 400, "steps": 200, "batch_size": 64, "wall_s": 30.0,
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


def test_selection_score_counts_moments_only_with_the_head():
    m = {"t2v_R@1": 60.0, "binding_acc": 90.0, "moment_R@1_IoU0.7": 40.0}
    assert selection_score(m, load_config(None)) == 150.0
    assert selection_score(m, load_config(None, ["loss.loc_weight=1.0"])) == 190.0
