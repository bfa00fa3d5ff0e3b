"""Extractor configuration: dataclasses with commented defaults and strict overrides.

`ExtractorConfig.from_dict(d)` rejects unknown keys and values of the wrong type with a ConfigError (a
ValueError) that names the key, so a typo in a YAML file fails at start-up instead of silently using a
default (the loader is vlpconfig's, shared with pipeline/ and train/).

Weights policy: a model without a weight file is randomly initialised only when the config says
`allow_random_weights: true` (demo and test configs); any other config is refused at start-up with the
published checkpoint to get.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlpconfig import ConfigError, from_dict

SAMPLING_PLANS = ("uniform", "clips", "fps")
DECODE_MODES = ("exact", "keyframe")
DECODE_BACKENDS = ("pyav", "torchcodec", "decord")
SHORT_POLICIES = ("repeat", "pad")
OPEN_CLIP_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")  # and their "-quickgelu" variants (OpenAI weights)
FRAME_MODELS = ("efficientnet_lite0", "resnet50", "vit_b_16",
                *(f"open_clip:{m}{q}" for m in OPEN_CLIP_MODELS for q in ("", "-quickgelu")))
REGION_KINDS = ("detector", "given", "grid")
# torchvision builders, and fasterrcnn_efficientnet_lite0_fpn (extractors/regions.py; `vlpcache finetune-detector`)
DETECTOR_MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_efficientnet_lite0_fpn")
REGION_BACKBONES = ("detector", "frame_encoder")
TRUNK_LEVELS = ("multi", "head")
AMP_DTYPES = ("none", "bf16", "fp16")


@dataclass
class SamplingConfig:
    """Which frames of a video to decode, and how."""

    plan: str = "uniform"  # "uniform": T segments, middle frame of each; "clips": K clips x F frames; "fps"
    num_frames: int = 8  # uniform: T
    num_clips: int = 4  # clips: K clips, centred in K equal segments
    frames_per_clip: int = 2  # clips: F consecutive frames per clip (T = K * F)
    fps: float = 1.0  # fps: frames per second of video time
    max_frames: int = 16  # fps: T; videos that yield fewer are padded (valid = False)
    mode: str = "exact"  # "exact": the planned frames; "keyframe": the keyframe nearest each planned time
    short_policy: str = "repeat"  # fewer frames than T: "repeat" frames or "pad" with black; valid marks them
    short_side: int = 0  # resize at decode time so the short side is this many pixels (0 = keep)
    max_side: int = 0  # then cap the long side at this many pixels (0 = no cap)
    threads: int = 1  # decoder threads per video (1: the pipeline parallelises across videos)
    buffer_mb: int = 256  # files up to this size keep their packets in memory; bigger ones are re-read by seeking
    backend: str = "pyav"  # frame decoder: "pyav", "torchcodec" or "decord" (same frames; never a silent fallback)
    allow_still_images: bool = False  # accept a still image (png, jpeg, ...) as a one-frame video

    def __post_init__(self) -> None:
        _choice("sampling.plan", self.plan, SAMPLING_PLANS)
        _choice("sampling.mode", self.mode, DECODE_MODES)
        _choice("sampling.short_policy", self.short_policy, SHORT_POLICIES)
        _choice("sampling.backend", self.backend, DECODE_BACKENDS)
        for name in ("num_frames", "num_clips", "frames_per_clip", "max_frames", "threads"):
            _positive(f"sampling.{name}", getattr(self, name))
        _positive("sampling.fps", self.fps)
        for name in ("short_side", "max_side", "buffer_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sampling.{name} must be >= 0 (0 = off), got {getattr(self, name)}")

    @property
    def T(self) -> int:
        """Frames per video implied by the plan."""
        if self.plan == "uniform":
            return self.num_frames
        if self.plan == "clips":
            return self.num_clips * self.frames_per_clip
        return self.max_frames


@dataclass
class FrameEncoderConfig:
    """One feature per frame from an ImageNet model."""

    model: str = "efficientnet_lite0"  # one of FRAME_MODELS; "open_clip:ViT-B-32" etc. = a CLIP image tower
    input_size: int = 224  # frames are resized (short side) and centre-cropped to input_size^2 (open_clip: must be its own size)
    weights: str = ""  # local weight file; "pkg:efficientnet_lite0" = the pip-shipped file; "" = random init
    #                    (refused unless extractor.allow_random_weights is true)
    seed: int = 0  # seed of the random init when no weights file is given
    batch_size: int = 64  # frames per forward pass (frames of many videos batch together)
    amp: str = "bf16"  # autocast dtype on CUDA ("none" = fp32); the CPU path always runs fp32
    channels_last: bool = True  # NHWC memory format for the convolutions (CPU and CUDA: ~1.9x cheaper on CPU)

    def __post_init__(self) -> None:
        _choice("frame_encoder.model", self.model, FRAME_MODELS)
        _choice("frame_encoder.amp", self.amp, AMP_DTYPES)
        _positive("frame_encoder.input_size", self.input_size)
        _positive("frame_encoder.batch_size", self.batch_size)


@dataclass
class RegionConfig:
    """Where region boxes come from and how their features are computed."""

    kind: str = "detector"  # "detector" (Faster R-CNN), "given" (sidecar boxes), "grid" (fixed grid)
    max_boxes: int = 36  # K slots per frame; frames with fewer real boxes are padded (class -1)
    min_boxes: int = 10  # detector: keep at least this many boxes even below score_threshold
    fixed_k: bool = False  # detector: always keep exactly max_boxes (bottom-up "fixed 36")
    score_threshold: float = 0.2  # detector: keep boxes whose best class score is >= this
    nms_threshold: float = 0.3  # detector: per-class NMS IoU threshold
    agnostic_nms_threshold: float = 1.0  # detector: then NMS across classes at this IoU (1.0 = off, bottom-up's
    #                                      selection): one object seen as two classes gives two boxes without it
    detector: str = "fasterrcnn_mobilenet_v3_large_320_fpn"  # or fasterrcnn_resnet50_fpn_v2 on clusters
    weights: str = ""  # detector checkpoint with torchvision key names (any class count); "" = random init
    #                    (refused unless extractor.allow_random_weights is true). The detector sees frames at
    #                    the decode scale (sampling.short_side / max_side): it does not resize them again
    proposals: int = 0  # detector: RPN proposals per frame that the box head scores, its main cost on small
    #                     frames (0 = the builder's: 150 for the mobilenet model, 1000 for resnet50)
    seed: int = 0  # seed of the random init when no weights file is given
    backbone: str = "detector"  # region features: "detector" (FPN + box head, 1024-d) or "frame_encoder" (RoIAlign;
    #                             grid with an open_clip frame encoder: its patch tokens, grid_size = patches per side)
    trunk_weights: str = "pkg:efficientnet_lite0"  # frame_encoder backbone, when not shared with the frame encoder
    grid_size: int = 3  # grid: grid_size^2 cells (must be <= max_boxes)
    levels: str = "multi"  # frame_encoder backbone: "multi" = stride 32+16+8 maps (1432-d), "head" = stride 32 (1280-d)
    roi_size: int = 3  # frame_encoder backbone: RoIAlign output size before average pooling
    region_input_size: int = 320  # frame_encoder backbone: frames are resized to this square before the trunk
    batch_size: int = 16  # frames per forward pass
    amp: str = "bf16"  # autocast dtype on CUDA ("none" = fp32)
    channels_last: bool = True  # NHWC memory format for the convolutions (CPU and CUDA: ~1.9x cheaper on CPU)
    plugin: str = ""  # "FILE.py:FACTORY" or "MODULE:FACTORY": FACTORY(cfg, device, allow_random=...) -> RegionSource wraps or
    # replaces the source `kind` names (tests inject faults this way); "" = the built-in source

    def __post_init__(self) -> None:
        _choice("regions.kind", self.kind, REGION_KINDS)
        if self.plugin and ":" not in self.plugin:
            raise ConfigError(f"regions.plugin must be 'FILE.py:FACTORY' or 'MODULE:FACTORY', got {self.plugin!r}")
        _choice("regions.detector", self.detector, DETECTOR_MODELS)
        _choice("regions.backbone", self.backbone, REGION_BACKBONES)
        _choice("regions.amp", self.amp, AMP_DTYPES)
        _choice("regions.levels", self.levels, TRUNK_LEVELS)
        for name in ("max_boxes", "grid_size", "roi_size", "region_input_size", "batch_size"):
            _positive(f"regions.{name}", getattr(self, name))
        if self.proposals < 0:
            raise ConfigError(f"regions.proposals must be >= 0 (0 = the builder's default), got {self.proposals}")
        if self.kind == "detector" and not 0 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(f"regions.min_boxes must be in [0, max_boxes={self.max_boxes}], got {self.min_boxes}")
        for name in ("score_threshold", "nms_threshold", "agnostic_nms_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"regions.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kind == "grid" and self.grid_size**2 > self.max_boxes:
            raise ConfigError(
                f"regions.grid_size={self.grid_size} gives {self.grid_size**2} cells > max_boxes={self.max_boxes}: "
                "raise max_boxes or lower grid_size"
            )


@dataclass
class ExtractorConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    frame_encoder: FrameEncoderConfig = field(default_factory=FrameEncoderConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    allow_random_weights: bool = False  # True: models without a weight file are seeded random (demo, tests only)

    def __post_init__(self) -> None:
        random = self.random_weights()
        if random and not self.allow_random_weights:
            from extractors.weights import published_file

            needs = "; ".join(f"{key} is empty: set it to a local {model} checkpoint, e.g. {published_file(model).hint()}"
                              for key, model in random.items())
            raise ConfigError(
                f"no weight file for {sorted(set(random.values()))}: refusing to extract with randomly initialised "
                f"models. {needs}. (For a smoke test only, set extractor.allow_random_weights: true.)"
            )

    def random_weights(self) -> dict[str, str]:
        """Config key -> model name, for every model of this config that would be randomly initialised."""
        f, r = self.frame_encoder, self.regions
        random = {"frame_encoder.weights": f.model} if not f.weights else {}
        if (r.kind == "detector" or r.backbone == "detector") and not r.weights:
            random["regions.weights"] = r.detector
        if (r.backbone == "frame_encoder" and not r.trunk_weights
              and not self.shared_trunk() and not self.clip_patch_regions()):
            random["regions.trunk_weights"] = "efficientnet_lite0"
        return random

    def shared_trunk(self) -> bool:
        """Regions RoI-pooled from the frame encoder's own EfficientNet-Lite0 (one trunk pass per frame)."""
        r, f = self.regions, self.frame_encoder
        return (r.backbone == "frame_encoder" and not r.plugin and f.model == "efficientnet_lite0"
                and f.weights == r.trunk_weights)

    def clip_patch_regions(self) -> bool:
        """Grid regions = the CLIP frame tower's patch tokens (one tower pass per frame for both)."""
        return (self.regions.kind == "grid" and self.regions.backbone == "frame_encoder" and not self.regions.plugin
                and self.frame_encoder.model.startswith("open_clip:"))

    @property
    def num_frames(self) -> int:
        """T implied by the sampling plan."""
        return self.sampling.T

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractorConfig:
        """Strict: an unknown key or a value of the wrong type raises ConfigError (a ValueError) naming it."""
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
