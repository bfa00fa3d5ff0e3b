"""Real torchrun runs on CPU (gloo): every parameter's gradient equals the one-process gradient on the same
global batch, and the trainer runs under DDP with an evaluation that drops no item."""
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


class ThreadAllGather:
    """all_gather between threads of one process (one thread per simulated rank): the swappable gather
    of train.distributed.RankGather, without a process group."""

    def __init__(self, world: int):
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank: int):
        def all_gather(x):
            self.slots[rank] = x.detach().clone()
            self.barrier.wait()
            out = [t.clone() for t in self.slots]
            self.barrier.wait()  # nobody overwrites a slot before every rank has read it
            return out
        return all_gather


def test_rank_gather_gives_the_union_loss_and_w_times_the_own_rows_gradient():
    """Two simulated ranks (threads): each gets the union batch, the union loss, and W x the union
    gradient on its own rows (DDP's mean then restores it); the word axis is padded across ranks."""
    from train.distributed import RankGather
    from train.losses import GlobalContrastiveLoss, RegionAlignmentLoss, alignment_similarity

    g = torch.Generator().manual_seed(0)
    video, text = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    words = F.normalize(torch.randn(6, 5, 8, generator=g), dim=-1)
    wmask = torch.arange(5)[None] < torch.tensor([5, 2, 3, 1, 2, 3])[:, None]  # rank 1 needs 3 slots only
    scale = torch.tensor(10.0)

    def loss(v, t, w, m):
        return GlobalContrastiveLoss()(v, t, scale) + RegionAlignmentLoss().from_similarity(alignment_similarity(w, m, w, m))

    leaves = [x.clone().requires_grad_() for x in (video, text, words)]
    ref = loss(*leaves, wmask)
    ref.backward()
    gather, results = ThreadAllGather(2), [None, None]

    def rank_run(rank):
        rows = torch.arange(6).chunk(2)[rank]
        v, t = video[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        L = int(wmask[rows].sum(1).max())  # each rank cuts the word axis to its own longest caption
        w = words[rows, :L].clone().requires_grad_()
        G = RankGather(rank, 2, gather.for_rank(rank))
        out = loss(G(v), G(t), G(w, pad_dims=(1,)), G(wmask[rows, :L], pad_dims=(1,)))
        out.backward()
        results[rank] = (out.detach(), v.grad, t.grad, w.grad)

    threads = [threading.Thread(target=rank_run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for rank, (value, gv, gt, gw) in enumerate(results):
        rows = torch.arange(6).chunk(2)[rank]
        assert value.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(gv, 2 * leaves[0].grad[rows], atol=1e-6)
        assert torch.allclose(gt, 2 * leaves[1].grad[rows], atol=1e-6)
        assert torch.allclose(gw, 2 * leaves[2].grad[rows, :gw.shape[1]], atol=1e-6)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        RankGather(2, 2)


def test_every_parameter_gradient_two_ranks_equals_one_process_over_the_union_batch(tmp_path):
    """2 gloo ranks under DDP (4 rows each) vs one process on the global batch of 8, for each objective
    alone and all together: every term gathers the union batch (train/distributed.py), so its value and
    every parameter's gradient equal the one-process run's. The localization groups are drawn from the
    union batch with the same seed on every rank."""
    from _train_dist_worker import OBJECTIVES, grads, model_for
    from train.objectives import Objectives

    proc = _torchrun([str(ROOT / "tests" / "_train_dist_worker.py"), str(tmp_path)], timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for objective in OBJECTIVES:
        cfg, model = model_for(objective)
        ref = grads(Objectives(model, cfg), model, torch.arange(8))
        assert any(v.abs().sum() > 0 for k, v in ref.items() if not k.startswith("term:")), objective
        assert {k for k in ref if k.startswith("term:")} == {k for k in got[0][objective] if k.startswith("term:")}
        for r in range(2):
            for name, g in ref.items():
                assert torch.allclose(got[r][objective][name], g, atol=1e-5, rtol=0), (objective, r, name)


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
