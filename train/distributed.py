"""The union batch of every rank for the in-batch-negative objectives; the losses know nothing of ranks.

Under W ranks each objective gathers the tensors its loss compares across the batch (embeddings, masks,
the raw inputs the localization head merges) from every rank and computes the loss of the union batch,
with gradients through this rank's own rows only (the other ranks' rows arrive detached). The gradient of
the union loss with respect to the own rows is then exact, and every rank computes the same loss value.
DDP averages parameter gradients over the ranks, so a parameter reached through the rows would get 1/W
of its union-batch gradient: the own rows' gradient is multiplied by W on the way back. A parameter that
acts on the gathered tensors themselves (the global temperature, the localization head on merged
sequences) already gets its whole gradient on every rank, and DDP's mean keeps it whole. Net: every
parameter gets the gradient of one process over the union batch (tests/test_train_dist.py, 2 gloo ranks).

Cost: the encoders run on the rank's rows only; the losses run on the union batch on every rank (as one
process over the union batch would), W times the loss work of per-rank negatives.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


def dist_all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """torch.distributed.all_gather without autograd: every rank's tensor (same shape), in rank order."""
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by `factor` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class RankGather:
    """x (this rank's rows) -> the rows of every rank concatenated in rank order along `dim`, gradients
    through the own rows only, scaled by W. `all_gather` can be swapped (a test runs it in one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, all_gather: AllGather | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.all_gather = all_gather or dist_all_gather

    def __call__(self, x: torch.Tensor, dim: int = 0, pad_dims: tuple[int, ...] = ()) -> torch.Tensor:
        """pad_dims: axes whose length differs between ranks (word units, track tokens); they are
        zero-padded (False for masks) to the longest over ranks, as one process pads its union batch."""
        if self.world_size == 1:
            return x
        if pad_dims:
            sizes = torch.stack(self.all_gather(torch.tensor(x.shape, dtype=torch.int64, device=x.device)))
            x = _pad_to(x, {d: int(sizes[:, d].max()) for d in pad_dims})
        is_bool = x.dtype == torch.bool  # all_gather backends differ on bool: travel as uint8
        parts = self.all_gather(x.detach().to(torch.uint8) if is_bool else x.detach())
        parts = [p.bool() for p in parts] if is_bool else parts
        if x.requires_grad:
            # the own rows back in with their graph; x W so that DDP's mean over ranks leaves the union gradient
            parts[self.rank] = _ScaleGrad.apply(x, float(self.world_size))
        return torch.cat(parts, dim=dim)


def _pad_to(x: torch.Tensor, lengths: dict[int, int]) -> torch.Tensor:
    pad = [0] * (2 * x.ndim)
    for d, n in lengths.items():
        pad[2 * (x.ndim - 1 - d) + 1] = n - x.shape[d]  # F.pad lists the last axis first
    if not any(pad):
        return x
    return F.pad(x.to(torch.uint8), pad).bool() if x.dtype == torch.bool else F.pad(x, pad)
