"""Extractor configuration: dataclasses with commented defaults and strict overrides.

`ExtractorConfig.from_dict(d)` rejects unknown keys and values of the wrong type with a ValueError that
names the key, so a typo in a YAML file fails at start-up instead of silently using a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T_ = TypeVar("T_")

SAMPLING_PLANS = ("uniform", "clips", "fps")
DECODE_MODES = ("exact", "keyframe")
SHORT_POLICIES = ("repeat", "pad")
FRAME_MODELS = ("efficientnet_lite0", "resnet50", "vit_b_16")
REGION_KINDS = ("detector", "given", "grid")
DETECTOR_MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2")
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

    def __post_init__(self) -> None:
        _choice("sampling.plan", self.plan, SAMPLING_PLANS)
        _choice("sampling.mode", self.mode, DECODE_MODES)
        _choice("sampling.short_policy", self.short_policy, SHORT_POLICIES)
        for name in ("num_frames", "num_clips", "frames_per_clip", "max_frames", "threads"):
            _positive(f"sampling.{name}", getattr(self, name))
        _positive("sampling.fps", self.fps)
        for name in ("short_side", "max_side", "buffer_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"sampling.{name} must be >= 0 (0 = off), got {getattr(self, name)}")

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

    model: str = "efficientnet_lite0"  # one of FRAME_MODELS
    input_size: int = 224  # frames are resized (short side) and centre-cropped to input_size^2
    weights: str = ""  # local weight file; "" = seeded random init; "pkg:efficientnet_lite0" = the pip-shipped file
    seed: int = 0  # seed of the random init when no weights file is given
    batch_size: int = 64  # frames per forward pass (frames of many videos batch together)
    amp: str = "bf16"  # autocast dtype on CUDA ("none" = fp32); the CPU path always runs fp32

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
    detector: str = "fasterrcnn_mobilenet_v3_large_320_fpn"  # or fasterrcnn_resnet50_fpn_v2 on clusters
    weights: str = ""  # detector weight file; "" = seeded random init
    seed: int = 0  # seed of the random init when no weights file is given
    backbone: str = "detector"  # given/grid: "detector" (FPN + box head, 1024-d) or "frame_encoder" (RoIAlign)
    trunk_weights: str = "pkg:efficientnet_lite0"  # frame_encoder backbone, when not shared with the frame encoder
    grid_size: int = 3  # grid: grid_size^2 cells (must be <= max_boxes)
    levels: str = "multi"  # frame_encoder backbone: "multi" = stride 32+16+8 maps (1432-d), "head" = stride 32 (1280-d)
    roi_size: int = 3  # frame_encoder backbone: RoIAlign output size before average pooling
    region_input_size: int = 320  # frame_encoder backbone: frames are resized to this square before the trunk
    batch_size: int = 16  # frames per forward pass
    amp: str = "bf16"  # autocast dtype on CUDA ("none" = fp32)
    plugin: str = ""  # "FILE.py:FACTORY" or "MODULE:FACTORY": FACTORY(cfg, device) -> RegionSource wraps or
    # replaces the source `kind` names (tests inject faults this way); "" = the built-in source

    def __post_init__(self) -> None:
        _choice("regions.kind", self.kind, REGION_KINDS)
        if self.plugin and ":" not in self.plugin:
            raise ValueError(f"regions.plugin must be 'FILE.py:FACTORY' or 'MODULE:FACTORY', got {self.plugin!r}")
        _choice("regions.detector", self.detector, DETECTOR_MODELS)
        _choice("regions.backbone", self.backbone, REGION_BACKBONES)
        _choice("regions.amp", self.amp, AMP_DTYPES)
        _choice("regions.levels", self.levels, TRUNK_LEVELS)
        for name in ("max_boxes", "grid_size", "roi_size", "region_input_size", "batch_size"):
            _positive(f"regions.{name}", getattr(self, name))
        if self.kind == "detector" and not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"regions.min_boxes must be in [0, max_boxes={self.max_boxes}], got {self.min_boxes}")
        for name in ("score_threshold", "nms_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"regions.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kind == "grid" and self.grid_size**2 > self.max_boxes:
            raise ValueError(
                f"regions.grid_size={self.grid_size} gives {self.grid_size**2} cells > max_boxes={self.max_boxes}: "
                "raise max_boxes or lower grid_size"
            )


@dataclass
class ExtractorConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    frame_encoder: FrameEncoderConfig = field(default_factory=FrameEncoderConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)

    @property
    def num_frames(self) -> int:
        """T implied by the sampling plan."""
        return self.sampling.T

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractorConfig:
        """Strict: an unknown key or a value of the wrong type raises ValueError naming it."""
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type[T_], d: dict[str, Any], prefix: str = "") -> T_:
    """Build dataclass `cls` from `d`, recursing into nested dataclasses; strict about keys and types."""
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {type(d).__name__}: {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + k for k in unknown]}; known keys: {sorted(fields)}")
    kwargs = {}
    for key, value in d.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, _runtime_types(hint)):
        raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {type(value).__name__}: {value!r}")
    return value


def _runtime_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(a for a in typing.get_args(hint))
    return (hint,)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
