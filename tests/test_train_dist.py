"""Real torchrun runs on CPU (gloo): the gathered global loss equals the one-process loss on the same
global batch, and the trainer runs under DDP with an evaluation that drops no item."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from train.losses import GlobalContrastiveLoss

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"),
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_global_loss_two_ranks_equals_one_process(tmp_path):
    proc = _torchrun([str(ROOT / "tests" / "_train_dist_worker.py"), str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
    ref = GlobalContrastiveLoss()(video, text, torch.tensor(10.0))
    ref.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(got["v_grad"], video.grad.chunk(2)[rank], atol=1e-6)
        assert torch.allclose(got["t_grad"], text.grad.chunk(2)[rank], atol=1e-6)


@pytest.mark.slow
def test_trainer_under_ddp_evaluates_every_item(tmp_path):
    from _train_helpers import make_synthetic_store

    store = make_synthetic_store(tmp_path / "store", n_train=32, n_test=10)  # 10 test videos: odd per rank
    run = tmp_path / "run"
    proc = _torchrun(["-m", "pipeline", "train", "--features", str(store), "--out", str(run), "--steps", "4",
                      "--batch-size", "8", "--eval-split", "test", "--eval-every", "4",
                      "--text-cache", str(tmp_path / "tc"), "--set", "model.dropout=0.0"], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert evals and evals[-1]["videos"] == 10 and evals[-1]["binding_pairs"] == 10
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
