"""The CPU inference path (extractors.encoders.Runtime: channels_last + BatchNorm folded into the convs)
gives the features of the plain NCHW modules, up to float32 rounding, on real frames; run to run, bitwise."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _extractors_helpers import real_videos  # noqa: F401 (fixture)

from extractors import build_extraction_stage
from extractors.config import ExtractorConfig, RegionConfig, SamplingConfig
from extractors.decode import decode_clip
from extractors.encoders import Runtime, build_trunk
from extractors.regions import (BoxRegions, DetectorBackbone, DetectorRoIFeatures, TrunkRoIFeatures,
                                build_region_source, fasterrcnn_efficientnet_lite0_fpn)
from extractors.weights import PKG_EFFICIENTNET_LITE0
from timm.layers import FrozenBatchNormAct2d
from torchvision.ops import FrozenBatchNorm2d

CPU = torch.device("cpu")
NORMS = (torch.nn.BatchNorm2d, FrozenBatchNorm2d, FrozenBatchNormAct2d)  # what the fast path folds away


class PlainRuntime(Runtime):
    """The reference: the module as built, in eval mode, NCHW, nothing folded."""

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.eval()


@pytest.fixture(scope="module")
def frames(real_videos):
    """Two frames of a 226x96 clip and two of a 176x144 clip, as the decoder hands them over."""
    a = decode_clip(str(real_videos[1]), SamplingConfig(num_frames=2, short_side=96)).frames
    b = decode_clip(str(real_videos[3]), SamplingConfig(num_frames=2)).frames
    return a + b


def assert_close(fast: np.ndarray, plain: np.ndarray) -> None:
    """float32 rounding: max abs difference below 1e-4 of the largest magnitude."""
    scale = np.abs(plain).max()
    assert scale > 0 and np.abs(fast - plain).max() <= 1e-4 * scale, (np.abs(fast - plain).max(), scale)


def test_shared_trunk_stage_matches_the_plain_nchw_trunk(frames):
    """The ablation's extraction (given boxes, RoIAlign on the pretrained EfficientNet-Lite0)."""
    raw = {"frame_encoder": {"weights": PKG_EFFICIENTNET_LITE0},
           "regions": {"kind": "given", "max_boxes": 3, "backbone": "frame_encoder", "region_input_size": 128}}
    cfg = ExtractorConfig.from_dict(raw)
    stage = build_extraction_stage(cfg)
    assert stage.shared and not any(isinstance(m, NORMS) for m in stage.trunk.modules())
    assert stage.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    boxes = [np.array([[0, 0, 40, 40], [10, 20, 90, 70], [np.nan] * 4], np.float32)] * len(frames)
    out = stage(frames, boxes)

    net, dim = build_trunk("efficientnet_lite0", 128, PKG_EFFICIENTNET_LITE0, seed=0)
    plain = TrunkRoIFeatures(net.eval(), dim, cfg.regions, PlainRuntime(CPU, "none", channels_last=False))
    kept = stage.regions.propose(frames, boxes)[0]
    with torch.inference_mode():
        maps = plain.feature_maps(frames)
        assert maps[0].is_contiguous()  # NCHW
        frame_plain = maps[0].mean(dim=(2, 3)).numpy()  # [B, 1280]
        regions_plain = plain.pool(maps, frames, kept)  # B x [2, 1432]
    assert_close(out.frame_features, frame_plain)
    assert_close(out.regions.features[:, :2], np.stack(regions_plain))
    again = stage(frames, boxes)
    assert np.array_equal(again.frame_features, out.frame_features)
    assert np.array_equal(again.regions.features, out.regions.features)


def _perturbed_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Running statistics and affine parameters away from their init, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                  (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return model


def _efficientnet_detector() -> torch.nn.Module:
    """make demo's detector architecture on the ImageNet trunk (timm FrozenBatchNormAct2d, real statistics)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fasterrcnn_efficientnet_lite0_fpn(weights_backbone=PKG_EFFICIENTNET_LITE0, num_classes=5)


def _mobilenet_detector() -> torch.nn.Module:
    """torchvision's CPU detector (BatchNorm2d in Conv2dNormActivation blocks)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    return _perturbed_batchnorm(model.eval(), seed=1)


@pytest.mark.parametrize("build", [_efficientnet_detector, _mobilenet_detector], ids=["efficientnet_lite0", "mobilenet_v3"])
def test_detector_backbone_matches_the_plain_nchw_detector(frames, build):
    """Box-head features of given boxes through the FPN: the fast path vs the same weights run plainly."""
    model = build()
    cfg = RegionConfig(kind="given", backbone="detector", max_boxes=3)
    fast = build_region_source(cfg, detector=copy.deepcopy(model))
    assert not any(isinstance(m, NORMS) for m in fast.featurizer.backbone.model.backbone.modules())
    plain_rt = PlainRuntime(CPU, "none", channels_last=False)
    plain = BoxRegions(cfg, plain_rt, DetectorRoIFeatures(DetectorBackbone(cfg, plain_rt, model=model)))
    boxes = [np.array([[5, 5, 60, 50], [30, 10, 90, 80]], np.float32)] * len(frames)
    out, ref = fast(frames, boxes), plain(frames, boxes)
    assert np.array_equal(out.boxes, ref.boxes)
    assert_close(out.features, ref.features)
    with torch.inference_mode():  # the FPN maps themselves, every level
        fast_maps = fast.featurizer.backbone.features(frames)[1]
        plain_maps = plain.featurizer.backbone.features(frames)[1]
    assert fast_maps.keys() == plain_maps.keys()
    for level in plain_maps:
        assert_close(fast_maps[level].numpy(), plain_maps[level].numpy())
