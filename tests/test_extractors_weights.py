"""Weights policy and detector checkpoints: published files named, published key names loaded, any class
count, bad checkpoints refused before any video is read, one detector scale."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torchvision
from _extractors_helpers import real_videos  # noqa: F401 (fixture)
from _pipeline_helpers import job_config

from extractors import build_extraction_stage, build_region_source, extractor_provenance
from extractors.config import ExtractorConfig, RegionConfig, SamplingConfig
from extractors.decode import decode_clip
from extractors.regions import CLS_SCORE_KEY, build_detector
from extractors.weights import WeightsError, published_file
from pipeline.config import ConfigError
from pipeline.job import Job

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


def official_name(model: str) -> tuple[str, str]:
    """(file name, sha256 prefix) of torchvision's published checkpoint, read from its Weights enum."""
    name = torchvision.models.get_model_weights(model).DEFAULT.url.rsplit("/", 1)[-1]
    return name, re.search(r"-([0-9a-f]{8,})\.pth$", name).group(1)


def seeded_detector(seed: int, num_classes: int = 91) -> torch.nn.Module:
    builder = getattr(torchvision.models.detection, DETECTOR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(weights=None, weights_backbone=None, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def frames(real_videos):
    """Two frames of a 226x96 clip and two of a 176x144 clip, as the decoder hands them over."""
    a = decode_clip(str(real_videos[1]), SamplingConfig(num_frames=2, short_side=96)).frames
    b = decode_clip(str(real_videos[3]), SamplingConfig(num_frames=2)).frames
    return a + b


def detector_config(weights: str, **regions) -> dict:
    return {"frame_encoder": {"weights": "pkg:efficientnet_lite0", "input_size": 64},
            "regions": {"kind": "detector", "detector": DETECTOR, "weights": weights, "max_boxes": 6,
                        "min_boxes": 2, **regions}}


# ---------------------------------------------------------------- the policy


@pytest.mark.parametrize("model", ["fasterrcnn_resnet50_fpn_v2", DETECTOR, "resnet50", "vit_b_16"])
def test_random_weights_are_refused_naming_the_published_file(model):
    name, sha = official_name(model)
    assert published_file(model).name == name and published_file(model).sha256_prefix == sha
    raw = {"regions": {"kind": "detector", "detector": model}} if "rcnn" in model else \
        {"frame_encoder": {"model": model}, "regions": {"kind": "grid", "backbone": "frame_encoder"}}
    with pytest.raises(ConfigError) as e:
        ExtractorConfig.from_dict(raw)
    msg = str(e.value)
    assert name in msg and f"sha256 starts with {sha}" in msg and "allow_random_weights" in msg
    cfg = ExtractorConfig.from_dict({**raw, "allow_random_weights": True})
    prov = extractor_provenance(cfg)
    assert prov["weights_sha256"]["frame_encoder"] == "random:seed=0"
    assert "frame_encoder.weights" in prov["random_weights"]


def test_webvid_config_refuses_to_start_without_the_detector_file(demo_corpus, tmp_path, capsys):
    from pipeline.extract import main as extract_main

    name, sha = official_name("fasterrcnn_resnet50_fpn_v2")
    args = ["--dataset", "webvid", "--manifest", str(demo_corpus["manifest"]), "--format", "generic",
            "--video-root", str(demo_corpus["root"]), "--out", str(tmp_path / "out"), "--runner", "local",
            "--set", "run.device=cpu"]
    assert extract_main(args) == 2
    err = capsys.readouterr().err
    assert f"{name}' does not exist" in err and sha in err
    assert not (tmp_path / "out").exists(), "nothing may be written (or decoded) before the models are built"
    assert extract_main([*args, "--set", "extractor.regions.weights=''"]) == 2
    err = capsys.readouterr().err
    assert "refusing to extract with randomly initialised models" in err and name in err


def test_demo_run_summary_says_random(demo_corpus, tmp_path):
    from pipeline.extract import summary

    stats = Job(job_config(demo_corpus["manifest"], tmp_path / "out", runner="local", shard_size=12)).run()
    assert stats.weights == {"frame_encoder": "random:seed=0", "regions": "random:seed=0"}
    assert "frame_encoder RANDOM (seed=0, allow_random_weights)" in summary(stats)


# ---------------------------------------------------------------- detector checkpoints


def test_detector_checkpoint_loads_by_published_key_names(frames, tmp_path, caplog):
    """A builder's state_dict saved under the official file name gives the in-memory model's features."""
    model = seeded_detector(seed=3)
    path = tmp_path / official_name(DETECTOR)[0]
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="extractors.weights"):
        stage = build_extraction_stage(ExtractorConfig.from_dict(detector_config(str(path))))
    assert f"named as the published {DETECTOR} checkpoint but its sha256" in caplog.text
    loaded = build_detector(DETECTOR, str(path), seed=0).state_dict()  # the stage's model before BN folding
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    in_memory = build_region_source(stage.cfg.regions, detector=model)(frames)  # so the stage runs these weights
    out = stage(frames).regions
    assert out.counts.min() >= 2
    for name in ("boxes", "scores", "classes", "counts", "features"):
        assert np.array_equal(getattr(out, name), getattr(in_memory, name)), name
    prov = extractor_provenance(stage.cfg)
    assert prov["random_weights"] == [] and len(prov["weights_sha256"]["regions"]) == 64


def test_any_class_count_loads_and_unused_keys_are_reported(frames, tmp_path, caplog):
    """A Visual Genome-sized checkpoint (1600 classes + background) with an attribute head."""
    model = seeded_detector(seed=4, num_classes=1601)
    state = model.state_dict()
    state["roi_heads.attribute_predictor.weight"] = torch.randn(401, 1024 + 256)
    state["roi_heads.attribute_predictor.bias"] = torch.zeros(401)
    path = tmp_path / "vg_detector.pth"
    torch.save({"model": state, "epoch": 3}, path)  # torchvision's reference scripts wrap it so
    with caplog.at_level(logging.WARNING, logger="extractors.weights"):
        source = build_region_source(RegionConfig(detector=DETECTOR, weights=str(path), max_boxes=8, min_boxes=8))
    assert source.backbone.model.roi_heads.box_predictor.cls_score.out_features == 1601
    assert "ignoring 2 key(s)" in caplog.text and "roi_heads.attribute_predictor.weight" in caplog.text
    regions = source(frames[2:3])  # per-class NMS over 1600 classes is slow on CPU: one frame
    assert (regions.counts == 8).all() and regions.classes.max() <= 1600 and regions.classes[regions.classes >= 0].min() >= 1
    assert torch.equal(source.backbone.model.state_dict()[CLS_SCORE_KEY], state[CLS_SCORE_KEY])


@pytest.mark.slow  # heavy: `make test-slow`
def test_bad_checkpoints_are_refused_before_any_video_is_read(demo_corpus, tmp_path):
    good = seeded_detector(seed=5).state_dict()
    other_arch = tmp_path / "resnet_fpn.pth"  # a checkpoint of another detector under the mobilenet config
    torch.save(torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91).state_dict(), other_arch)
    missing = tmp_path / "missing_keys.pth"
    torch.save({k: v for k, v in good.items() if not k.startswith("rpn.head.conv")}, missing)
    pickled = tmp_path / "pickled_module.pth"
    torch.save({"model": seeded_detector(seed=5)}, pickled)  # the whole module: needs weights_only=False
    expect = {
        other_arch: [f"is not a {DETECTOR} checkpoint", "shape(s) differ", "backbone.body.", "file (", "model ("],
        missing: [f"is not a {DETECTOR} checkpoint", "rpn.head.conv", "missing from the file"],
        pickled: ["only loads with weights_only=False", "torch.save(model.state_dict()"],
    }
    for path, words in expect.items():
        with pytest.raises(WeightsError) as e:
            build_region_source(RegionConfig(detector=DETECTOR, weights=str(path)))
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
        out = tmp_path / f"out_{path.stem}"
        config = job_config(demo_corpus["manifest"], out, runner="local",
                            extractor={**detector_config(str(path)), "sampling": {"num_frames": 2}})
        with pytest.raises(ConfigError, match="could not build the models.*" + re.escape(str(path))):
            Job(config).run()
        assert not out.exists(), "refused before the store was made or any video decoded"


def test_detector_sees_frames_at_the_decode_scale(frames):
    """No second resize: the backbone gets the decoded frames, only padded to a multiple of 32."""
    source = build_region_source(RegionConfig(detector=DETECTOR, max_boxes=4, min_boxes=1), allow_random=True)
    seen = []
    hook = source.backbone.model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        regions = source(frames[2:])  # 176x144 frames: torchvision's transform would have scaled them to 320
    finally:
        hook.remove()
    h, w = frames[2].shape[:2]
    assert seen[0][-2:] == (-(-h // 32) * 32, -(-w // 32) * 32)
    image_list, _, scale = source.backbone.features(frames[2:])
    assert image_list.image_sizes == [(h, w)] * 2 and torch.equal(scale, torch.ones_like(scale))
    assert (regions.boxes[:, :, 2] <= 1).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_says_so():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PY": __import__("sys").executable})
    assert result.returncode == 2 and "no CUDA device visible to torch" in result.stderr, result.stderr
