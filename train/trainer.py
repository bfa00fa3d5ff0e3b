"""The training loop: AdamW, warmup + cosine, clipping, bf16 autocast on CUDA, accumulation, DDP
(torchrun; gloo on CPU, nccl on GPU), checkpoints every N steps and on exit, exact resume."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from stores import open_store
from train.config import TrainConfig
from train.data import DataError, SplitData, check_signature, geom_dim, load_split, store_signature
from train.evaluate import evaluate, split_captions
from train.distributed import RankGather
from train.model import VideoTextModel
from train.objectives import Objectives, TextBatch
from train.queue import FeatureQueue
from train.stream import FeatureStream, StreamSpec, StreamState, batch_video
from train.text import CaptionTokenizer, FrozenTextFeatures, load_minilm, resolve_model_dir
from train.words import ContentWords, content_mask

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """The run folder cannot be used as asked (existing run without --resume, missing checkpoint...)."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def text_batch(cfg: TrainConfig, captions: list[str], features: FrozenTextFeatures | None = None) -> TextBatch:
    """Captions -> model inputs: frozen MiniLM features (computed here) or token ids (live MiniLM)."""
    model_dir = resolve_model_dir(cfg.text.model_dir)
    tokenizer = CaptionTokenizer(model_dir, cfg.text.max_tokens, cfg.text.long_captions)
    tokens = tokenizer(captions)
    content = content_mask(tokenizer.tokenizer, captions, tokens.ids.shape[1], cfg.loss.content_max_df)
    if not cfg.text.frozen:
        return TextBatch(tokens.ids, tokens.mask, tokens.phrase, content)
    features = features or FrozenTextFeatures(model_dir, cache_size=cfg.text.cache_size)
    return TextBatch(features(tokens.ids, tokens.mask), tokens.mask, tokens.phrase, content)


def build_model(cfg: TrainConfig, signature: dict) -> VideoTextModel:
    torch.manual_seed(cfg.run.seed)  # seeded init: the same config gives the same weights
    minilm = None if cfg.text.frozen else load_minilm(resolve_model_dir(cfg.text.model_dir))
    return VideoTextModel(cfg, signature["Df"], signature["Dr"], geom_dim(cfg.model.units, signature["T"]),
                          signature["T"], minilm)


def _optimizer(model: VideoTextModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, text = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("text.minilm."):
            text.append(p)
        elif p.ndim < 2 or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if text:
        groups.append({"params": text, "weight_decay": cfg.optim.weight_decay, "lr": cfg.optim.text_lr})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array as a tensor, so checkpoints load with torch.load(weights_only=True)
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load_checkpoint(run: str | Path) -> dict:
    path = Path(run)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise RunError(f"no checkpoint at {str(path)!r}; give a run folder written by `vlpcache train` "
                       f"(it holds {CHECKPOINT}) or a checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The checkpoint's parameters (names, shapes, optimizer groups) must be this code's model's, or its
    optimizer state cannot be restored. A config that matches can still name other parameters: code that
    changed between save and resume (e.g. a live-MiniLM run saved while the text tower was transformers'
    BertModel, whose q/k/v are three tensors where train.text.MiniLM packs one)."""
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    only_saved, only_here = sorted(saved.keys() - here.keys()), sorted(here.keys() - saved.keys())
    shapes = [f"{k} {saved[k]} -> {here[k]}" for k in sorted(saved.keys() & here.keys()) if saved[k] != here[k]]
    groups_saved = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    groups_here = [len(g["params"]) for g in optimizer.param_groups]
    if not (only_saved or only_here or shapes) and groups_saved == groups_here:
        return
    what = [f"{len(only_saved)} only in the checkpoint (e.g. {only_saved[:3]})" if only_saved else "",
            f"{len(only_here)} only in this code's model (e.g. {only_here[:3]})" if only_here else "",
            f"{len(shapes)} of another shape ({shapes[:3]})" if shapes else "",
            f"optimizer groups of {groups_saved} parameters, this code's {groups_here}"
            if groups_saved != groups_here else ""]
    raise RunError(f"cannot resume {str(path)!r}: it was written by code whose model has other parameters "
                   f"than this code's with the same config: {'; '.join(w for w in what if w)}. Its optimizer "
                   "state cannot be restored. Start a new run (another --out); `vlpcache eval --checkpoint` "
                   "still reads its weights")


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def plot_curves(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({k for r in train for k in r if k.startswith("loss")}):
        axes[0].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    for key in ("t2v_R@1", "v2t_R@1", "binding_acc", "moment_R@1_IoU0.5"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set(xlabel="step", ylabel="%", title="validation")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


class Trainer:
    def __init__(self, cfg: TrainConfig, features: str, out: str | Path, resume: bool = False,
                 text_features: FrozenTextFeatures | None = None):
        """text_features: a frozen-MiniLM feature cache to share (train.ablation keeps one per process for
        its runs: a caption's features never depend on the run); None = a new one."""
        self.cfg, self.features, self.out = cfg.validate(), features, Path(out)
        self.dist = setup_distributed(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        ckpt_path = self.out / CHECKPOINT
        if ckpt_path.exists() and not resume:
            raise RunError(f"{str(self.out)!r} already holds a run ({CHECKPOINT}); pass --resume to continue it "
                           "or choose a new --out")
        self.ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.ckpt is not None and self.ckpt["config"] != cfg.to_dict():
            raise RunError(f"--resume with a config that differs from the run's ({ckpt_path}); "
                           "resume with the same config (it is saved in config.json)")
        if self.ckpt is not None:  # before the stream, whose check of the run's shards would hide other dims
            reader = open_store(features)
            check_signature(store_signature(reader.store_meta), self.ckpt["store"], repr(features))
            reader.close()
        self.stream = self._make_stream(cfg, features)
        self.signature = store_signature(self.stream.meta)
        model_dir = resolve_model_dir(cfg.text.model_dir)
        self.text_features = (text_features or FrozenTextFeatures(model_dir, self.dist.device, cfg.text.cache_size)) \
            if cfg.text.frozen else None
        self.content = ContentWords(CaptionTokenizer(model_dir, cfg.text.max_tokens).tokenizer,
                                    cfg.loss.content_max_df)  # content words of batches
        self.eval_split: SplitData | None = None
        if cfg.data.eval_split:
            self.eval_split, _ = load_split(features, cfg.data.eval_split, cfg.model.units, cfg.model.max_units,
                                            expected=self.signature)
            self.eval_text = text_batch(cfg, split_captions(self.eval_split.captions)[0], self.text_features)
        self.model = build_model(cfg, self.signature).to(self.dist.device)
        self.queue = FeatureQueue(cfg.loss.queue_size, cfg.model.embed_dim, self.dist.device) \
            if cfg.loss.queue_size > 0 else None
        self.objectives = Objectives(self.model, cfg, RankGather(self.dist.rank, self.dist.world_size), self.queue)
        self.wrapped: nn.Module = self.objectives
        if self.dist.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.objectives, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = _optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self._batches = None  # the DataLoader iterator, started at the first step (after a restore)
        self.skipped: dict[int, dict[str, int]] = {}  # worker -> videos skipped so far (NaN/Inf, empty caption)
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self._mark_resume_point()

    def _make_stream(self, cfg: TrainConfig, features: str) -> FeatureStream:
        if cfg.optim.batch_size % self.dist.world_size:
            raise DataError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the world size "
                            f"{self.dist.world_size}")
        shards = tuple(self.ckpt["stream_shards"].tolist()) if self.ckpt is not None else ()
        spec = StreamSpec(features, cfg.data.split, cfg.optim.batch_size // self.dist.world_size, cfg.run.seed,
                          self.dist.rank, self.dist.world_size, cfg.data.workers, cfg.data.shuffle_buffer,
                          cfg.model.units, cfg.model.max_units, cfg.text.model_dir, cfg.text.max_tokens,
                          cfg.text.long_captions, shards)
        state = StreamState.from_dict(self.ckpt["stream"][self.dist.rank]) if self.ckpt is not None else None
        return FeatureStream(spec, state)

    def _next_batch(self) -> dict:
        if self._batches is None:
            cuda = self.dist.device.type == "cuda"
            workers = self.cfg.data.workers
            # its own generator: starting the loader must not draw from the global RNG (dropout's), or a
            # resumed run, which starts it at another step, would diverge
            loader = DataLoader(self.stream, batch_size=None, num_workers=workers, pin_memory=cuda,
                                prefetch_factor=self.cfg.data.prefetch if workers else None,
                                generator=torch.Generator().manual_seed(self.cfg.run.seed))
            self._batches = iter(loader)
        batch = next(self._batches)
        self.stream.state.advance(batch["cursor"])
        self.skipped[batch["worker"]] = batch["skipped"]
        return batch

    def _text(self, batch: dict) -> TextBatch:
        content = self.content(batch["captions"], batch["ids"].shape[1])
        tb = TextBatch(batch["ids"], batch["mask"], batch["phrase"], content)
        if self.text_features is not None:
            tb.inputs = self.text_features(batch["ids"], batch["mask"])
        return tb.rows(torch.arange(len(batch["ids"])))

    def _mark_resume_point(self) -> None:
        """What a checkpoint records as "the next step starts here" (taken between steps only, so a
        checkpoint written after an interrupted step replays that step exactly)."""
        self._resume_point = (self.step, self.stream.state.to_dict(), _rng_state())

    def _restore(self, ckpt: dict) -> None:
        check_resumable(ckpt, self.model, self.optimizer, self.out / CHECKPOINT)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"][self.dist.rank])
        if self.queue is not None:
            self.queue.load_state_dict(ckpt["queue"])
        self.step = ckpt["step"]
        log.info("resumed %s at step %d", self.out, self.step)

    def checkpoint(self) -> None:
        step, stream, rng_state = self._resume_point
        per_rank = [(stream, rng_state)]
        if self.dist.world_size > 1:
            import torch.distributed as dist

            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, (stream, rng_state))
        if not self.dist.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "stream": [s for s, _ in per_rank],
                 "stream_shards": torch.tensor(self.stream.shards), "rng": [r for _, r in per_rank],
                 "step": step, "config": self.cfg.to_dict(), "store": self.signature,
                 "world_size": self.dist.world_size}
        if self.queue is not None:  # committed entries only: what the next step starts from
            state["queue"] = self.queue.state_dict()
        save_atomic(state, self.out / CHECKPOINT)
        log.info("checkpoint at step %d -> %s", self.step, self.out / CHECKPOINT)

    def train_step(self) -> dict[str, float]:
        self.wrapped.train()
        batch = self._next_batch()
        video, text = batch_video(batch), self._text(batch)
        parts = [p for p in torch.arange(len(batch["ids"])).chunk(self.cfg.optim.accum_steps) if len(p)]
        device, use_amp = self.dist.device, self.cfg.optim.amp and self.dist.device.type == "cuda"
        # the same on every rank: the localization groups are drawn from the union batch
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + self.step)
        if self.queue is not None:
            self.queue.discard()  # rows staged by a step that raised never reach the queue
        totals: dict[str, float] = {}
        for i, part in enumerate(parts):
            sync = nullcontext() if i == len(parts) - 1 or self.dist.world_size == 1 else self.wrapped.no_sync()
            vb = video.index(part).to(device).float()
            tb = text.rows(part).to(device)
            with sync, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                terms = self.wrapped(vb, tb, gen)
                loss = sum(terms.values()) / len(parts)
                loss.backward()
            for k, v in terms.items():
                totals[f"loss_{k}"] = totals.get(f"loss_{k}", 0.0) + float(v.detach()) / len(parts)
        if self.cfg.optim.grad_clip > 0:
            totals["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.queue is not None:
            self.queue.commit()
        self.scheduler.step()
        self.step += 1
        self._mark_resume_point()
        totals["loss"] = sum(v for k, v in totals.items() if k.startswith("loss_"))
        for kind in ("nonfinite", "empty_caption"):
            totals[f"skipped_{kind}"] = float(sum(counts[kind] for counts in self.skipped.values()))
        return totals

    def run_eval(self) -> dict[str, float]:
        return evaluate(self.model, self.cfg, self.eval_split, self.eval_text, self.dist.device,
                        self.dist.rank, self.dist.world_size)

    def fit(self) -> dict[str, float]:
        cfg, r = self.cfg, self.cfg.run
        if self.dist.main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        metrics = MetricsLog(self.out / "metrics.jsonl", self.step if self.ckpt else None) if self.dist.main else None
        last_eval: dict[str, float] = {}
        start, failed = time.time(), True
        try:
            while self.step < cfg.optim.steps:
                record = self.train_step()
                if metrics and ((r.log_every and self.step % r.log_every == 0) or self.step == cfg.optim.steps):
                    metrics.write({"kind": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                                   "scale": float(self.model.scale().detach()), "elapsed_s": time.time() - start, **record})
                    log.info("step %d/%d loss %.4f", self.step, cfg.optim.steps, record["loss"])
                due = (r.eval_every and self.step % r.eval_every == 0) or self.step == cfg.optim.steps
                if self.eval_split is not None and due:
                    last_eval = self.run_eval()
                    if metrics:
                        metrics.write({"kind": "eval", "step": self.step, "split": cfg.data.eval_split, **last_eval})
                        log.info("eval step %d: %s", self.step, _brief(last_eval))
                if r.ckpt_every and self.step % r.ckpt_every == 0 and self.step < cfg.optim.steps:
                    self.checkpoint()
            failed = False
        finally:
            if failed and self.dist.world_size > 1:
                log.warning("not checkpointing after an error in a %d-process run (the other ranks may be gone); "
                            "resume from the last periodic checkpoint", self.dist.world_size)
            else:
                self.checkpoint()  # on exit, Ctrl-C included: completed steps are never lost
            self._batches = None  # stops the DataLoader workers
            if metrics and metrics.path.exists():
                plot_curves(metrics.path, self.out / "curves.png")
        return last_eval


def _brief(m: dict[str, float]) -> str:
    keys = ("t2v_R@1", "v2t_R@1", "binding_acc", "moment_R@1_IoU0.5")
    return " ".join(f"{k}={m[k]:.1f}" for k in keys if k in m)
