"""Run by torchrun in tests/test_train_dist.py: the global loss with real gloo all_gather over 2 ranks."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.losses import GlobalContrastiveLoss


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(8, 16, generator=g), dim=-1)  # the same global batch on every rank
    text = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    v = video.chunk(world)[rank].clone().requires_grad_()
    t = text.chunk(world)[rank].clone().requires_grad_()
    loss = GlobalContrastiveLoss(rank, world)(v, t, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "v_grad": v.grad, "t_grad": t.grad}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
