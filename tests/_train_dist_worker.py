"""Run by torchrun in tests/test_train_dist.py (2 gloo ranks), and imported there for the one-process
reference: every parameter's gradient of each objective, from the same global batch."""
import os
import sys

import torch
import torch.distributed as dist

from train.config import TrainConfig, apply_overrides
from train.distributed import RankGather
from train.model import VideoBatch, VideoTextModel
from train.objectives import Objectives, TextBatch

B, T, R, DF, DR, L = 8, 4, 3, 16, 24, 7  # global batch of 8 videos: 4 per rank
OBJECTIVES = {
    "global": ["loss.global_weight=1.0"],
    "align": ["loss.global_weight=0.0", "loss.align_weight=1.0"],
    "clip_word": ["loss.global_weight=0.0", "loss.clip_word_weight=1.0"],
    "loc": ["loss.global_weight=0.0", "loss.loc_weight=1.0"],
    "all": ["loss.align_weight=1.0", "loss.clip_word_weight=0.5", "loss.loc_weight=0.5"],
}


def config(objective: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["model.dropout=0.0", "model.dim=32", "model.embed_dim=16",
                                           "text.head_layers=1", *OBJECTIVES[objective]])


def global_batch() -> tuple[VideoBatch, TextBatch]:
    g = torch.Generator().manual_seed(0)
    video = VideoBatch(torch.randn(B, T, DF, generator=g), torch.ones(B, T, dtype=torch.bool),
                       torch.randn(B, R, DR, generator=g), torch.randn(B, R, 7 * T, generator=g),
                       torch.full((B, R), T), torch.rand(B, R, generator=g) < 0.8)
    video.unit_mask[:, 0] = True
    lengths = torch.randint(4, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    phrase = torch.where(mask, torch.arange(L)[None] // 3, -1)
    phrase[:, 0] = -1
    content = mask & (torch.arange(L)[None] % 2 == 1)  # every other token a content word
    return video, TextBatch(torch.randn(B, L, 384, generator=g), mask, phrase, content)


def model_for(objective: str) -> tuple[TrainConfig, VideoTextModel]:
    cfg = config(objective)
    torch.manual_seed(0)
    return cfg, VideoTextModel(cfg, DF, DR, 7 * T, T)


def grads(module: torch.nn.Module, model: VideoTextModel, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backward of the summed terms on the batch rows; -> every parameter's gradient (zeros if unused) and
    each term's value under "term:NAME"."""
    video, text = global_batch()
    terms = module(video.index(rows), text.rows(rows), torch.Generator().manual_seed(0))
    sum(terms.values()).backward()
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return {**out, **{f"term:{k}": v.detach() for k, v in terms.items()}}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(B).chunk(world)[rank]
    result = {}
    for objective in OBJECTIVES:
        cfg, model = model_for(objective)
        ddp = torch.nn.parallel.DistributedDataParallel(Objectives(model, cfg, RankGather(rank, world)),
                                                        find_unused_parameters=True)
        result[objective] = grads(ddp, model, rows)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
