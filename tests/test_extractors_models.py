"""Frame encoders and region sources: determinism, weight mapping, box/feature contracts, shared trunk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _extractors_helpers import made_videos, real_videos  # noqa: F401 (fixtures)

from extractors import build_extraction_stage, build_frame_encoder, build_region_source, extractor_provenance
from extractors.config import ExtractorConfig, FrameEncoderConfig, RegionConfig, SamplingConfig
from extractors.decode import decode_clip
from extractors.encoders import build_trunk, map_by_order, to_batch
from extractors.regions import DetectorRoIFeatures, given_boxes_for_clip
from extractors.weights import PKG_EFFICIENTNET_LITE0, read_weights, resolve_weights


@pytest.fixture(scope="module")
def frames(real_videos):
    """Frames of two videos of different sizes, as the pipeline batches them."""
    a = decode_clip(str(real_videos[1]), SamplingConfig(num_frames=2, short_side=96)).frames  # 226x96
    b = decode_clip(str(real_videos[3]), SamplingConfig(num_frames=2)).frames  # 176x144
    return a + b


@pytest.mark.parametrize(
    "model", ["efficientnet_lite0", pytest.param("resnet50", marks=pytest.mark.slow),
              pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_seeded_encoders_are_bitwise_deterministic(frames, model):
    cfg = FrameEncoderConfig(model=model, input_size=64, seed=7, batch_size=3)
    before = torch.get_rng_state()
    encoder = build_frame_encoder(cfg, allow_random=True)
    one = encoder(frames)
    assert torch.equal(before, torch.get_rng_state()), "building a model must not disturb the global RNG"
    two = build_frame_encoder(cfg, allow_random=True)(frames)
    other = build_frame_encoder(FrameEncoderConfig(model=model, input_size=64, seed=8), allow_random=True)(frames)
    assert one.shape == (4, {"efficientnet_lite0": 1280, "resnet50": 2048, "vit_b_16": 768}[model])
    assert one.dtype == np.float32 and np.isfinite(one).all()
    assert np.array_equal(one, two) and not np.allclose(one, other)
    # batching across videos does not change a frame's feature beyond float noise
    alone = encoder(frames[:1])
    assert np.allclose(alone[0], one[0], atol=1e-4 * np.abs(one).max())


def test_efficientnet_lite0_loads_the_shipped_imagenet_file(frames):
    path = resolve_weights(PKG_EFFICIENTNET_LITE0)
    cfg = FrameEncoderConfig(weights=PKG_EFFICIENTNET_LITE0, input_size=96)
    enc = build_frame_encoder(cfg)
    assert np.array_equal(enc(frames), build_frame_encoder(cfg)(frames))
    loaded = build_trunk("efficientnet_lite0", 96, PKG_EFFICIENTNET_LITE0, seed=0)[0].state_dict()  # before BN folding
    source = read_weights(path)
    assert torch.equal(loaded["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(loaded["conv_head.weight"], source["_conv_head.weight"])
    assert torch.equal(loaded["bn1.running_var"], source["_bn0.running_var"])
    seeded = build_trunk("efficientnet_lite0", 96, "", seed=0, allow_random=True)[0]
    assert not torch.equal(seeded.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])


def test_weight_mapping_checks_every_pair():
    import timm

    path = resolve_weights(PKG_EFFICIENTNET_LITE0)
    source = read_weights(path)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    keys = list(source)
    swapped = dict(source)
    swapped[keys[1]], swapped[keys[2]] = source[keys[2]], source[keys[1]]  # same shapes, wrong order
    reordered = {k: swapped[k] for k in [keys[0], keys[2], keys[1], *keys[3:]]}
    with pytest.raises(ValueError, match="does not match model key"):
        map_by_order(reordered, target, path)
    with pytest.raises(ValueError, match="tensors, the model has"):
        map_by_order(dict(list(source.items())[:-2]), target, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights("/nonexistent/weights.pth")


def check_regions(regions, n_frames, k, dim):
    assert regions.boxes.shape == (n_frames, k, 4) and regions.features.shape == (n_frames, k, dim)
    assert (regions.counts <= k).all() and (regions.counts >= 0).all()
    assert (regions.boxes >= 0).all() and (regions.boxes <= 1).all()
    for i, c in enumerate(regions.counts):
        real = regions.boxes[i, :c]
        assert (real[:, 2] >= real[:, 0]).all() and (real[:, 3] >= real[:, 1]).all()
        assert (regions.classes[i, :c] >= 0).all() and (regions.classes[i, c:] == -1).all()
        assert not regions.features[i, c:].any() and not regions.boxes[i, c:].any()
        assert c == 0 or np.abs(regions.features[i, :c]).sum(axis=1).min() > 0


def test_detector_boxes_counts_padding_and_final_box_features(frames):
    cfg = RegionConfig(max_boxes=12, min_boxes=5, batch_size=3)
    source = build_region_source(cfg, allow_random=True)
    regions = source(frames)
    check_regions(regions, len(frames), 12, 1024)
    assert (regions.counts >= 5).all()
    assert (np.diff(regions.scores[0, : regions.counts[0]]) <= 0).all(), "boxes come best first"
    # the features are the box head's for the FINAL boxes: pooling the returned boxes again gives them
    roi = DetectorRoIFeatures(source.backbone)
    pixel = [regions.boxes[i, : regions.counts[i]] * np.array([f.shape[1], f.shape[0]] * 2, np.float32)
             for i, f in enumerate(frames)]
    with torch.inference_mode():
        again = roi(frames, pixel)
    for i, c in enumerate(regions.counts):
        assert np.allclose(again[i], regions.features[i, :c], atol=1e-3, rtol=1e-3)
    fixed = build_region_source(RegionConfig(max_boxes=7, min_boxes=0, fixed_k=True), allow_random=True)(frames[:1])
    assert fixed.counts.tolist() == [7]


def test_detector_selection_is_bottom_up_style():
    """Per-class NMS, best surviving class per proposal, optionally NMS across classes, threshold clamped to
    min..max boxes."""
    from extractors.regions import DetectorRegions

    sel = DetectorRegions.__new__(DetectorRegions)
    sel.cfg = RegionConfig(max_boxes=3, min_boxes=1, score_threshold=0.5, nms_threshold=0.3)
    box = torch.tensor([10.0, 10, 50, 50])
    boxes = torch.stack([box, box + 1, box + 100, box + 200])[:, None, :].repeat(1, 3, 1)  # [P=4, C=3, 4]
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.75, 0.15, 0.1]])
    kept, scores, classes = sel._select(boxes, probs, (400, 400))
    # proposal 1 loses class 1 to proposal 0 (IoU > 0.3) but keeps class 2 at 0.2 < threshold;
    # only proposal 0 passes 0.5; min_boxes=1 -> 1 box
    assert scores.tolist() == pytest.approx([0.8]) and classes.tolist() == [1]
    sel.cfg = RegionConfig(max_boxes=3, min_boxes=3, score_threshold=0.5, nms_threshold=0.3)
    kept, scores, classes = sel._select(boxes, probs, (400, 400))
    # then proposal 2 (class 2: 0.4) and proposal 1 (its class 2 survived at 0.2; 3's best is 0.15)
    assert scores.tolist() == pytest.approx([0.8, 0.4, 0.2]) and classes.tolist() == [1, 2, 2]
    assert torch.equal(kept, torch.stack([box, box + 100, box + 1]))
    # NMS across classes: proposal 1 (class 2) sits on proposal 0's object and goes; proposal 3 fills its slot
    sel.cfg = RegionConfig(max_boxes=3, min_boxes=3, score_threshold=0.5, nms_threshold=0.3, agnostic_nms_threshold=0.5)
    kept, scores, classes = sel._select(boxes, probs, (400, 400))
    assert scores.tolist() == pytest.approx([0.8, 0.4, 0.15]) and classes.tolist() == [1, 2, 1]
    assert torch.equal(kept, torch.stack([box, box + 100, box + 200]))


@pytest.mark.parametrize("backbone, dim", [("detector", 1024), ("frame_encoder", 1432)])
def test_grid_regions(frames, backbone, dim):
    regions = build_region_source(RegionConfig(kind="grid", grid_size=2, max_boxes=6, backbone=backbone),
                                  allow_random=True)(frames)
    check_regions(regions, len(frames), 6, dim)
    assert regions.counts.tolist() == [4] * len(frames)
    assert np.allclose(regions.boxes[0, :4], [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])


def test_given_regions_mark_absent_objects(frames):
    source = build_region_source(RegionConfig(kind="given", max_boxes=3, backbone="frame_encoder"))
    boxes = [np.array([[0, 0, 40, 40], [np.nan] * 4, [20, 20, 60, 70]], np.float32)] * len(frames)
    regions = source(frames, boxes)
    check_regions(regions, len(frames), 3, 1432)
    assert regions.counts.tolist() == [2] * len(frames) and regions.classes[0].tolist() == [0, 2, -1]
    with pytest.raises(ValueError, match="one box array per frame"):
        source(frames, None)


def test_shared_trunk_stage_matches_separate_stages(frames):
    raw = {"frame_encoder": {"weights": PKG_EFFICIENTNET_LITE0},
           "regions": {"kind": "grid", "grid_size": 2, "max_boxes": 4, "backbone": "frame_encoder"}}
    stage = build_extraction_stage(ExtractorConfig.from_dict(raw))
    assert stage.shared
    out = stage(frames)
    alone = build_region_source(ExtractorConfig.from_dict(raw).regions)(frames)
    assert np.allclose(out.regions.features, alone.features, atol=1e-5)
    assert out.frame_features.shape == (len(frames), 1280) and out.regions.features.shape[-1] == 1432
    # the frame feature is the global average of the same head map the RoIs come from: the trunk ran once
    with torch.inference_mode():
        x = to_batch(frames, 320, crop=False, device=torch.device("cpu"))
        head = stage.trunk.forward_features(x).mean(dim=(2, 3)).numpy()
    assert np.allclose(out.frame_features, head, atol=1e-5)
    prov = extractor_provenance(ExtractorConfig.from_dict(raw))
    assert prov["shared_trunk"] and len(prov["weights_sha256"]["frame_encoder"]) == 64
    assert prov == extractor_provenance(ExtractorConfig.from_dict(raw))
    random = extractor_provenance(ExtractorConfig(allow_random_weights=True))
    assert random["weights_sha256"] == {"frame_encoder": "random:seed=0", "regions": "random:seed=0"}
    assert random["random_weights"] == ["frame_encoder.weights", "regions.weights"]


def test_given_on_demo_corpus_separates_objects(demo_corpus):
    """One object's features across frames are closer than different objects' (pretrained trunk RoIs)."""
    root = demo_corpus["root"]
    rows = [r for r in demo_corpus["rows"] if r.get("boxes")][:5]
    source = build_region_source(RegionConfig(kind="given", max_boxes=4, backbone="frame_encoder"))
    same, different = [], []
    for row in rows:
        clip = decode_clip(str(root / row["path"]), SamplingConfig(num_frames=4))
        boxes = given_boxes_for_clip(root / row["boxes"], clip)
        assert len(boxes) == 4 and all(b.shape[1] == 4 for b in boxes)
        regions = source(clip.frames, boxes)
        check_regions(regions, 4, 4, 1432)
        feats = {}
        for t in range(4):
            for s in range(regions.counts[t]):
                f = regions.features[t, s]
                feats.setdefault(int(regions.classes[t, s]), []).append(f / np.linalg.norm(f))
        objs = sorted(feats)
        for a in objs:
            fa = np.array(feats[a])
            same += list((fa @ fa.T)[np.triu_indices(len(fa), 1)])
            for b in objs:
                if b > a:
                    different += list((fa @ np.array(feats[b]).T).ravel())
    assert same and different, "the demo rows must hold several objects"
    assert np.mean(same) > np.mean(different) + 0.05, (np.mean(same), np.mean(different))
