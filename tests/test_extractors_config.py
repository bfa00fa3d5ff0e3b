"""Strict config overrides, plans computed from timestamps alone, provenance."""
from __future__ import annotations

import numpy as np
import pytest

from extractors.config import ExtractorConfig, SamplingConfig
from extractors.sampling import plan_frames, snap_to_keyframes


def test_from_dict_nested_and_defaults():
    cfg = ExtractorConfig.from_dict({"sampling": {"plan": "clips", "num_clips": 3, "frames_per_clip": 2, "fps": 2},
                                     "regions": {"kind": "grid", "grid_size": 2}, "allow_random_weights": True})
    assert cfg.num_frames == 6 and cfg.sampling.fps == 2.0 and isinstance(cfg.sampling.fps, float)
    assert cfg.regions.grid_size == 2 and cfg.frame_encoder.model == "efficientnet_lite0"
    assert ExtractorConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ({"samplng": {}}, r"unknown key\(s\) \['samplng'\]"),
        ({"sampling": {"num_frame": 8}}, r"sampling.num_frame"),
        ({"sampling": {"num_frames": "8"}}, r"sampling.num_frames must be int, got str"),
        ({"sampling": {"num_frames": 8.0}}, r"sampling.num_frames must be int"),
        ({"sampling": {"num_frames": True}}, r"sampling.num_frames must be int, got bool"),
        ({"sampling": {"num_frames": 0}}, r"sampling.num_frames must be > 0"),
        ({"sampling": {"plan": "random"}}, r"sampling.plan must be one of"),
        ({"sampling": 3}, r"sampling must be a mapping"),
        ({"regions": {"kind": "grid", "grid_size": 7, "max_boxes": 36}}, r"grid_size=7 gives 49 cells"),
        ({"regions": {"min_boxes": 40, "max_boxes": 36}}, r"min_boxes must be in \[0, max_boxes=36\]"),
        ({"frame_encoder": {"model": "resnet18"}}, r"frame_encoder.model must be one of"),
        ({"regions": {"fixed_k": 1}}, r"regions.fixed_k must be bool"),
    ],
)
def test_from_dict_is_strict(override, message):
    with pytest.raises(ValueError, match=message):
        ExtractorConfig.from_dict(override)


def test_T_per_plan():
    assert SamplingConfig(num_frames=5).T == 5
    assert SamplingConfig(plan="clips", num_clips=4, frames_per_clip=3).T == 12
    assert SamplingConfig(plan="fps", max_frames=7).T == 7


def cfr(n, fps=25.0):
    return np.arange(n) / fps, n / fps


@pytest.mark.parametrize("n, t", [(250, 8), (120, 8), (24, 8), (16, 8), (7, 3), (1000, 16)])
def test_uniform_plan_is_middle_frame_of_each_segment(n, t):
    times, end = cfr(n)
    plan = plan_frames(times, end, SamplingConfig(num_frames=t))
    assert plan.indices.tolist() == [int((i + 0.5) * n / t) for i in range(t)]
    assert plan.valid.all() and not plan.short


def test_short_plan_repeat_and_pad():
    times, end = cfr(3)
    rep = plan_frames(times, end, SamplingConfig(num_frames=6))
    assert rep.short and rep.indices.tolist() == [0, 0, 1, 1, 2, 2] and rep.valid.tolist() == [1, 0, 1, 0, 1, 0]
    pad = plan_frames(times, end, SamplingConfig(num_frames=6, short_policy="pad"))
    assert pad.indices.tolist() == [0, -1, 1, -1, 2, -1] and pad.valid.tolist() == rep.valid.tolist()


def test_clips_plan_disjoint_and_consecutive():
    times, end = cfr(100)
    plan = plan_frames(times, end, SamplingConfig(plan="clips", num_clips=4, frames_per_clip=5))
    clips = plan.indices.reshape(4, 5)
    assert (np.diff(clips, axis=1) == 1).all() and (clips[1:, 0] >= clips[:-1, -1] + 1).all()
    centres = (np.arange(4) + 0.5) * 100 / 4
    assert np.abs(clips[:, 2] - centres).max() <= 1
    tight = plan_frames(*cfr(20), SamplingConfig(plan="clips", num_clips=4, frames_per_clip=5))
    assert tight.indices.tolist() == list(range(20)) and tight.valid.all()


def test_fps_plan_and_window():
    times, end = cfr(100, fps=25.0)  # 4 s
    plan = plan_frames(times, end, SamplingConfig(plan="fps", fps=2.0, max_frames=10))
    assert plan.indices.tolist()[:8] == [int(i * 12.5) for i in range(8)]
    assert plan.valid.tolist() == [True] * 8 + [False] * 2 and plan.short
    win = plan_frames(times, end, SamplingConfig(num_frames=4), window=(1.0, 2.0))
    assert win.indices.tolist() == [28, 34, 40, 46]
    with pytest.raises(ValueError, match="holds no frame"):
        plan_frames(times, end, SamplingConfig(), window=(5.0, 6.0))


def test_keyframe_snap_picks_nearest_keyframe():
    times, end = cfr(100, fps=10.0)
    plan = plan_frames(times, end, SamplingConfig(num_frames=4))  # 12, 37, 62, 87
    snapped = snap_to_keyframes(plan, times, np.array([0, 30, 60, 90]))
    assert snapped.indices.tolist() == [0, 30, 60, 90] and snapped.valid.all()
    dup = snap_to_keyframes(plan, times, np.array([0, 50]))
    assert dup.indices.tolist() == [0, 50, 50, 50] and dup.valid.tolist() == [True, True, False, False]


def test_one_strict_loader_for_extractors_pipeline_and_train():
    """extractors/, pipeline/ and train/ share vlpconfig's loader: same errors, same strictness."""
    import vlpconfig
    from pipeline.config import ConfigError as PipelineConfigError
    from pipeline.config import job_config_from_dict
    from train.config import ConfigError as TrainConfigError
    from train.config import TrainConfig

    assert PipelineConfigError is TrainConfigError is vlpconfig.ConfigError
    cases = [
        (lambda: job_config_from_dict({"run": {"shard_size": True}}), r"run.shard_size must be int, got bool"),
        (lambda: job_config_from_dict({"run": {"compression": 3}}), r"run.compression must be str or null, got int"),
        (lambda: TrainConfig.from_dict({"optim": {"lr": "fast"}}), r"optim.lr must be float, got str"),
        (lambda: TrainConfig.from_dict({"optim": {"lrr": 1}}), r"unknown key\(s\) \['optim.lrr'\]"),
        (lambda: ExtractorConfig.from_dict({"regions": {"fixed_k": 1}}), r"regions.fixed_k must be bool, got int"),
        (lambda: ExtractorConfig.from_dict({"regions": []}), r"regions must be a mapping"),
    ]
    for build, message in cases:
        with pytest.raises(vlpconfig.ConfigError, match=message):
            build()
    assert job_config_from_dict({"run": {"compression": None, "actor_gpus": 1}}).run.actor_gpus == 1.0
    assert TrainConfig.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0
