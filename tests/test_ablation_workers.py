"""`make ablation` trains its runs in spawned worker processes: every run's result comes back and is
cached, the workers' CPU time is counted in the parent's RUSAGE_CHILDREN, and a second call finds every
run cached and spawns nothing. Real store (zarr), real training, real processes."""
import resource

import numpy as np
import pytest

from stores import create_store
from stores.schema import Dims
from tests._train_helpers import _arrays, _caption, _scene
from train.ablation import parse_args, run_all


def _store(out, dims=Dims(T=4, K=3, Df=16, Dr=24)):
    """train / val / test videos (val and test in colour-swapped twins), synthetic features."""
    rng = np.random.default_rng(0)
    basis = {"color": rng.standard_normal((4, dims.Dr)), "shape": rng.standard_normal((4, dims.Dr)),
             "frame_color": rng.standard_normal((4, dims.Df)), "frame_shape": rng.standard_normal((4, dims.Df))}
    rows = [(f"tr{i:03d}", _scene(rng, 2), "train", "") for i in range(24)]
    for split in ("val", "test"):
        for i in range(0, 8, 2):
            objs = _scene(rng, 2)
            twin = [(objs[1][0], objs[0][1], objs[0][2]), (objs[0][0], objs[1][1], objs[1][2])]
            rows += [(f"{split}{i:03d}", objs, split, f"{split}{i + 1:03d}"),
                     (f"{split}{i + 1:03d}", twin, split, f"{split}{i:03d}")]
    w = create_store(out, "zarr", dims=dims, n_videos=len(rows), shard_size=len(rows),
                     provenance={"synthetic": "ablation-workers"}, video_ids=[r[0] for r in rows])
    sw = w.shard_writer(0)
    for row, (vid, objs, split, twin) in enumerate(rows):
        sw.put(row, vid, _caption(objs), _arrays(objs, rng, dims, basis), meta={"split": split, "twin": twin})
    sw.commit()
    return out


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


@pytest.mark.slow  # two spawned processes each import torch and train: ~20 CPU s
def test_runs_train_in_workers_whose_cpu_is_counted_and_are_cached(tmp_path):
    features = _store(tmp_path / "store")
    args = parse_args(["--out", str(tmp_path / "runs"), "--select-every", "2", "--workers", "2",
                       "--set", "optim.steps=4", "--set", "optim.batch_size=8", "--set", "optim.warmup_steps=1",
                       "--set", "model.dim=16", "--set", "model.embed_dim=16", "--set", "model.layers=1",
                       "--set", "loss.loc_videos=2"])
    code = {"commit": "test", "dirty": False, "diff": ""}
    jobs = [("global", 0), ("align", 0), ("global", 1)]
    before = _children_cpu()
    done = run_all(args, {"given": features}, jobs, code)
    spent = _children_cpu() - before
    assert set(done) == set(jobs)
    for (row, seed), r in done.items():
        assert (r["row"], r["seed"], r["split"]) == (row, seed, "test")
        assert r["selected_step"] in (2, 4) and r["metrics"]["videos"] == 8.0
        assert (tmp_path / "runs" / f"{row}_seed{seed}" / "result.json").is_file()
        # per-step means of the weighted terms and the pre-clip grad norm (how the objectives share a step)
        terms = {"loss_global"} | ({"loss_align"} if row == "align" else set())
        assert terms | {"grad_norm", "clipped"} <= set(r["train_means"]) and r["train_means"]["grad_norm"] > 0
    # the workers exited inside run_all: their CPU (torch imports + training) is the parent's children time
    assert spent >= sum(r["cpu_s"] for r in done.values())
    again_before = _children_cpu()
    again = run_all(args, {"given": features}, jobs, code)
    assert again == done and _children_cpu() == again_before  # all cached: no worker started
