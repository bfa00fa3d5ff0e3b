"""Real torchrun runs on CPU (gloo): every parameter's gradient equals the one-process gradient on the same
global batch, and the trainer runs under DDP with an evaluation that drops no item."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_parameter_gradient_two_ranks_equals_one_process(tmp_path):
    """2 gloo ranks under DDP vs one process on the same global batch of 8, for each objective alone and
    all together. The global InfoNCE gathers negatives from every rank, so its reference is one process
    over the union batch; the other objectives take their negatives within a rank's batch, so theirs is
    the mean of one-process gradients over each rank's rows (what DDP's mean computes)."""
    from _train_dist_worker import OBJECTIVES, grads, model_for
    from train.objectives import Objectives

    proc = _torchrun([str(ROOT / "tests" / "_train_dist_worker.py"), str(tmp_path)], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    halves = torch.arange(8).chunk(2)

    def one_process(objective, rows, seed):
        cfg, model = model_for(objective)
        return grads(Objectives(model, cfg), model, rows, seed)

    def reference(objective):
        if objective == "global":
            return one_process("global", torch.arange(8), 0)
        if objective == "all":  # gradients add up over the terms
            parts = [reference(o) for o in ("global", "align", "clip_word", "loc")]
            scaled = {"align": 1.0, "clip_word": 0.5, "loc": 0.5}
            out = dict(parts[0])
            for o, part in zip(("align", "clip_word", "loc"), parts[1:]):
                out = {k: out[k] + scaled[o] * part[k] for k in out}
            return out
        per_rank = [one_process(objective, rows, seed) for seed, rows in enumerate(halves)]
        return {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in per_rank[0]}

    for objective in OBJECTIVES:
        ref = reference(objective)
        assert any(v.abs().sum() > 0 for v in ref.values()), objective
        for r in range(2):
            for name, g in ref.items():
                assert torch.allclose(got[r][objective][name], g, atol=1e-5, rtol=1e-4), (objective, r, name)


@pytest.mark.slow
def test_trainer_under_ddp_evaluates_every_item_with_word_units(tmp_path):
    from _train_helpers import make_synthetic_store

    store = make_synthetic_store(tmp_path / "store", n_train=32, n_test=10, longer_odd_test=True)
    # 10 test videos: odd per rank; rank 1's captions are longer (word units of another width)
    run = tmp_path / "run"
    proc = _torchrun(["-m", "pipeline", "train", "--features", str(store), "--out", str(run), "--steps", "4",
                      "--batch-size", "8", "--eval-split", "test", "--eval-every", "4",
                      "--align-weight", "1", "--align-unit", "word", "--workers", "1",
                      "--set", "model.dropout=0.0"], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert evals and evals[-1]["videos"] == 10 and evals[-1]["binding_pairs"] == 10
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
