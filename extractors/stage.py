"""One extraction stage: frame features and regions for a batch of frames from many videos.

When the region features come from the same EfficientNet-Lite0 trunk as the frame features, the trunk
runs once per frame for both: the frame feature is the global average of the feature map that the
RoIs are pooled from (its head map; frames squashed to regions.region_input_size^2, no crop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from extractors.api import Regions
from extractors.config import ExtractorConfig
from extractors.encoders import Runtime, TorchFrameEncoder, build_trunk
from extractors.regions import BoxRegions, TrunkRoIFeatures, build_region_source, pad_regions


@dataclass
class StageOutput:
    frame_features: np.ndarray  # [B, Df] float32
    regions: Regions  # per frame, padded to K


class ExtractionStage:
    """B x [H, W, 3] uint8 frames (+ B x given boxes for the "given" source) -> StageOutput."""

    def __init__(self, cfg: ExtractorConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.shared = shares_trunk(cfg)
        if self.shared:
            runtime = Runtime(torch.device(device), cfg.frame_encoder.amp)
            net, dim = build_trunk("efficientnet_lite0", cfg.regions.region_input_size,
                                   cfg.frame_encoder.weights, cfg.frame_encoder.seed)
            self.trunk = runtime.prepare(net)
            self.frame_dim = dim
            self.regions: BoxRegions = build_region_source(cfg.regions, device, trunk=(self.trunk, dim))
            self.runtime = runtime
        else:
            self.encoder = TorchFrameEncoder(cfg.frame_encoder, device)
            self.frame_dim = self.encoder.dim
            self.regions = build_region_source(cfg.regions, device)
        self.region_dim = self.regions.dim

    def __call__(self, frames: list[np.ndarray], given_boxes: list[np.ndarray] | None = None) -> StageOutput:
        if not self.shared:
            return StageOutput(self.encoder(frames), self.regions(frames, given_boxes))
        source: BoxRegions = self.regions
        feat: TrunkRoIFeatures = source.featurizer
        boxes, classes = source.boxes_for(frames, given_boxes)
        frame_feats, region_feats = [], []
        with self.runtime.context():
            for start in range(0, len(frames), self.cfg.regions.batch_size):
                sl = slice(start, start + self.cfg.regions.batch_size)
                maps = feat.feature_maps(frames[sl])  # maps[0]: head [b, 1280, h, w]
                frame_feats.append(maps[0].float().mean(dim=(2, 3)).cpu().numpy())  # [b, 1280]
                region_feats += feat.pool(maps, frames[sl], boxes[sl])
        scores = [np.ones(len(b), np.float32) for b in boxes]
        regions = pad_regions(boxes, scores, classes, region_feats, frames, source.max_boxes, source.dim)
        frame = np.concatenate(frame_feats) if frame_feats else np.zeros((0, self.frame_dim), np.float32)
        return StageOutput(frame, regions)


def shares_trunk(cfg: ExtractorConfig) -> bool:
    r, f = cfg.regions, cfg.frame_encoder
    return (r.kind in ("given", "grid") and r.backbone == "frame_encoder" and not r.plugin
            and f.model == "efficientnet_lite0" and f.weights == r.trunk_weights)


def build_extraction_stage(cfg: ExtractorConfig, device: str | torch.device = "cpu") -> ExtractionStage:
    return ExtractionStage(cfg, device)
