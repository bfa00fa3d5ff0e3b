"""One extraction stage: frame features and regions for a batch of frames from many videos.

When the region features come from the same EfficientNet-Lite0 trunk as the frame features, the trunk
runs once per frame for both: the frame feature is the global average of the feature map that the
RoIs are pooled from (its head map; frames squashed to regions.region_input_size^2, no crop).
With an open_clip frame tower and grid regions from the frame encoder, the tower also runs once per
frame: the frame feature is the projected embedding, the regions are the projected patch tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from extractors.api import Regions
from extractors.config import ExtractorConfig
from extractors.encoders import Runtime, build_frame_encoder, build_trunk
from extractors.regions import BoxRegions, DetectorRegions, TrunkRoIFeatures, build_region_source, grid_boxes, pad_regions


@dataclass
class StageOutput:
    frame_features: np.ndarray  # [B, Df] float32
    regions: Regions  # per frame, padded to K


class ExtractionStage:
    """B x [H, W, 3] uint8 frames (+ B x given boxes for the "given" source) -> StageOutput."""

    def __init__(self, cfg: ExtractorConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        allow_random = cfg.allow_random_weights
        self.shared = cfg.shared_trunk()
        self.patches = cfg.clip_patch_regions()
        if self.shared:
            runtime = Runtime(torch.device(device), cfg.frame_encoder.amp, cfg.frame_encoder.channels_last)
            net, dim = build_trunk("efficientnet_lite0", cfg.regions.region_input_size,
                                   cfg.frame_encoder.weights, cfg.frame_encoder.seed, allow_random)
            self.trunk = runtime.prepare(net)
            self.frame_dim = dim
            self.regions: BoxRegions | DetectorRegions = build_region_source(
                cfg.regions, device, trunk=(self.trunk, dim), allow_random=allow_random)
            self.runtime = runtime
            self.region_dim = self.regions.dim
            return
        self.encoder = build_frame_encoder(cfg.frame_encoder, device, allow_random)
        self.frame_dim = self.encoder.dim
        if self.patches:
            g, k = self.encoder.grid, cfg.regions.max_boxes
            if g[0] != g[1] or cfg.regions.grid_size != g[0] or g[0] * g[1] > k:
                raise ValueError(f"{cfg.frame_encoder.model} has a {g[0]}x{g[1]} patch grid: set regions.grid_size: "
                                 f"{g[0]} and regions.max_boxes >= {g[0] * g[1]} (got {cfg.regions.grid_size}, {k})")
            self.region_dim = self.encoder.dim
        else:
            self.regions = build_region_source(cfg.regions, device, allow_random=allow_random)
            self.region_dim = self.regions.dim

    def __call__(self, frames: list[np.ndarray], given_boxes: list[np.ndarray] | None = None) -> StageOutput:
        if self.patches:
            return self._clip_patches(frames)
        if not self.shared:
            return StageOutput(self.encoder(frames), self.regions(frames, given_boxes))
        source: BoxRegions | DetectorRegions = self.regions  # detector: its boxes, the trunk's features
        feat: TrunkRoIFeatures = source.featurizer
        boxes, scores, classes = source.propose(frames, given_boxes)
        frame_feats, region_feats = [], []
        with self.runtime.context():
            for start in range(0, len(frames), self.cfg.regions.batch_size):
                sl = slice(start, start + self.cfg.regions.batch_size)
                maps = feat.feature_maps(frames[sl])  # maps[0]: head [b, 1280, h, w]
                frame_feats.append(maps[0].float().mean(dim=(2, 3)).cpu().numpy())  # [b, 1280]
                region_feats += feat.pool(maps, frames[sl], boxes[sl])
        regions = pad_regions(boxes, scores, classes, region_feats, frames, source.max_boxes, source.dim)
        frame = np.concatenate(frame_feats) if frame_feats else np.zeros((0, self.frame_dim), np.float32)
        return StageOutput(frame, regions)

    def _clip_patches(self, frames: list[np.ndarray]) -> StageOutput:
        """Embeddings [B, D] and patch tokens as grid regions: cell boxes inside the centre crop the tower sees."""
        emb, tokens = self.encoder.tokens(frames)  # [B, D], [B, g*g, D]
        g = self.encoder.grid[0]
        boxes = []
        for frame in frames:
            x1, y1, x2, y2 = self.encoder.crop_box(frame.shape[1], frame.shape[0])
            boxes.append(grid_boxes(x2 - x1, y2 - y1, g) + np.array([x1, y1, x1, y1], np.float32))  # [g*g, 4]
        classes = [np.arange(g * g, dtype=np.int64)] * len(frames)
        scores = [np.ones(g * g, np.float32)] * len(frames)
        regions = pad_regions(boxes, scores, classes, list(tokens), frames, self.cfg.regions.max_boxes, self.region_dim)
        return StageOutput(emb, regions)


def build_extraction_stage(cfg: ExtractorConfig, device: str | torch.device = "cpu") -> ExtractionStage:
    return ExtractionStage(cfg, device)
