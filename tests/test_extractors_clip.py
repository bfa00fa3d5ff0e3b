"""open_clip frame towers: seeded ViT-B-32, open_clip's preprocessing, local checkpoints, patch tokens as
grid regions, and a tiny extraction through the pipeline."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from _extractors_helpers import real_videos  # noqa: F401 (fixture)
from _pipeline_helpers import job_config
from PIL import Image

from extractors import build_frame_encoder
from extractors.config import ExtractorConfig, FrameEncoderConfig, SamplingConfig
from extractors.decode import decode_clip
from extractors.weights import WeightsError
from pipeline.job import Job
from stores import open_store

MODEL = "open_clip:ViT-B-32"


@pytest.fixture(scope="module")
def frames(real_videos):
    a = decode_clip(str(real_videos[1]), SamplingConfig(num_frames=2, short_side=96)).frames  # 226x96
    b = decode_clip(str(real_videos[3]), SamplingConfig(num_frames=1)).frames  # 176x144
    return a + b


@pytest.fixture(scope="module")
def encoder():
    return build_frame_encoder(FrameEncoderConfig(model=MODEL, seed=11, batch_size=2), allow_random=True)


def test_seeded_vit_b_32_is_deterministic_with_512_d_embeddings(encoder, frames):
    before = torch.get_rng_state()
    again = build_frame_encoder(FrameEncoderConfig(model=MODEL, seed=11, batch_size=2), allow_random=True)
    assert torch.equal(before, torch.get_rng_state()), "building must not disturb the global RNG"
    emb, tokens = encoder.tokens(frames)
    assert emb.shape == (3, 512) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert tokens.shape == (3, 49, 512) and encoder.grid == (7, 7) and encoder.dim == 512
    assert np.array_equal(emb, again(frames))
    with pytest.raises(WeightsError, match="no weight file for open_clip:ViT-B-32"):
        build_frame_encoder(FrameEncoderConfig(model=MODEL))


def test_input_size_other_than_the_models_is_refused_before_building():
    with pytest.raises(ValueError, match=r"frame_encoder.input_size is 256, but open_clip:ViT-B-32 takes 224x224 "
                                         r"frames .* set frame_encoder.input_size: 224"):
        build_frame_encoder(FrameEncoderConfig(model=MODEL, input_size=256), allow_random=True)


def test_preprocessing_is_open_clips(encoder, frames):
    """Same as open_clip's own eval transform (PIL bicubic resize + centre crop + its mean/std)."""
    pp = encoder.visual.preprocess_cfg
    reference = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                          interpolation=pp["interpolation"], resize_mode=pp["resize_mode"])
    for frame in frames:
        ours = encoder.preprocess([frame], torch.device("cpu"))[0]
        theirs = reference(Image.fromarray(frame))
        assert ours.shape == theirs.shape == (3, 224, 224)
        # uint8 tensor vs PIL bicubic resampling differ by a grey level here and there
        assert (ours - theirs).abs().mean() < 0.02, (ours - theirs).abs().mean()


@pytest.mark.slow  # heavy: `make test-slow`
def test_local_checkpoint_loads_image_tower_and_matches_in_memory_model(encoder, frames, tmp_path):
    """open_clip's checkpoint layout (visual.* + text tower keys): the image tower loads, the rest is ignored."""
    from safetensors.torch import save_file

    state = {f"visual.{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}
    state |= {"text_projection": torch.zeros(512, 512), "logit_scale": torch.ones(())}
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    loaded = build_frame_encoder(FrameEncoderConfig(model=MODEL, weights=str(path), batch_size=2))
    assert np.array_equal(loaded(frames), encoder(frames))
    detector = tmp_path / "detector.pt"  # wrong-shape checks are check_and_load's (test_extractors_weights.py)
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, detector)
    with pytest.raises(WeightsError, match=r"detector.pt is not an open_clip checkpoint: no 'visual.\*' keys"):
        build_frame_encoder(FrameEncoderConfig(model=MODEL, weights=str(detector)))


def test_tiny_extraction_with_clip_frames_and_patch_regions(demo_corpus, tmp_path):
    extractor = {"allow_random_weights": True, "sampling": {"num_frames": 2},
                 "frame_encoder": {"model": MODEL, "seed": 11},
                 "regions": {"kind": "grid", "backbone": "frame_encoder", "grid_size": 7, "max_boxes": 49}}
    cfg = ExtractorConfig.from_dict(extractor)
    assert cfg.clip_patch_regions() and cfg.random_weights() == {"frame_encoder.weights": MODEL}
    stats = Job(job_config(demo_corpus["manifest"], tmp_path / "out", runner="local", shard_size=12,
                           extractor=extractor)).run()
    assert stats.weights == {"frame_encoder": "random:seed=11", "regions": "random:seed=11"}
    reader = open_store(tmp_path / "out")
    assert len(reader) == len(demo_corpus["rows"])
    item = reader[reader.video_ids[0]]
    assert item["frame_features"].shape == (2, 512) and item["region_features"].shape == (2, 49, 512)
    assert item["region_counts"].tolist() == [49, 49]
    boxes = item["region_boxes"][0]  # demo frames are square: the centre crop is the whole frame
    assert np.allclose(boxes[0], [0, 0, 1 / 7, 1 / 7], atol=1e-6) and np.allclose(boxes[-1], [6 / 7, 6 / 7, 1, 1], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model, dim, grid", [("open_clip:ViT-B-16", 512, 14), ("open_clip:ViT-L-14", 768, 16)])
def test_other_clip_towers_build_with_their_dims(frames, model, dim, grid):
    encoder = build_frame_encoder(FrameEncoderConfig(model=model, seed=1), allow_random=True)
    emb, tokens = encoder.tokens(frames[:1])
    assert emb.shape == (1, dim) and tokens.shape == (1, grid * grid, dim) and encoder.grid == (grid, grid)
