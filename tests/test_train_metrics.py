"""Retrieval metrics against hand-computed ranks with ties (both directions, multi-caption), binding and
moment metrics."""
import numpy as np
import pytest

import logging

from train.metrics import (binding_accuracy, moment_metrics, retrieval_metrics, t2v_ranks, temporal_iou,
                           tie_averaged_t2v, v2t_ranks)


def test_one_caption_per_video_with_ties():
    sims = np.array([[0.5, 0.7, 0.1],
                     [0.9, 0.9, 0.9],  # all tied: t2v counts the tie in the query's favour -> rank 0
                     [0.3, 0.8, 0.1]])
    # t2v: row 0 -> {0.7} above 0.5 -> 1; row 1 -> 0; row 2 -> {0.3, 0.8} above 0.1 -> 2
    assert t2v_ranks(sims).tolist() == [1, 0, 2]
    # v2t: video 0 column [.5,.9,.3] -> 1; video 1 [.7,.9,.8] -> 0;
    # video 2 column [.1,.9,.1]: one above, two equal (itself + 1) -> 1 + (2 - 1)/2 = 1.5
    assert v2t_ranks(sims).tolist() == [1, 0, 1.5]
    m = retrieval_metrics(sims)
    assert m["t2v_R@1"] == pytest.approx(100 / 3)
    assert m["t2v_R@5"] == 100.0
    assert m["t2v_MedR"] == 2.0 and m["t2v_MeanR"] == 2.0
    assert m["v2t_R@1"] == pytest.approx(100 / 3)
    assert m["v2t_MedR"] == 2.0
    assert m["v2t_MeanR"] == pytest.approx(2.5 / 3 + 1)


def test_multi_caption():
    # 4 captions, 2 videos: captions 0,1 -> video 0; 2,3 -> video 1
    sims = np.array([[0.2, 0.5],
                     [0.6, 0.1],
                     [0.5, 0.5],
                     [0.3, 0.2]])
    assert t2v_ranks(sims).tolist() == [1, 0, 0, 1]
    # video 0: caption 1 ranks 0; video 1 column [.5,.1,.5,.2]: caption 2 -> 0 above, 2 equal -> 0.5,
    # caption 3 -> 2 above -> 2; the video takes its best caption: 0.5
    assert v2t_ranks(sims).tolist() == [0, 0.5]
    m = retrieval_metrics(sims)
    assert m["t2v_R@1"] == 50.0 and m["v2t_R@1"] == 100.0
    assert m["v2t_MeanR"] == pytest.approx(1.25)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of n_video"):
        retrieval_metrics(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan]]))


def test_binding_counts_ties_half():
    assert binding_accuracy([0.9, 0.5, 0.2, 0.4], [0.1, 0.5, 0.3, 0.4]) == pytest.approx(50.0)


def test_moment_metrics():
    pred = np.array([[0, 8], [4, 12], [0, 2]])
    gt = np.array([[0, 8], [0, 8], [0, 8]])
    assert temporal_iou(pred, gt).tolist() == pytest.approx([1.0, 4 / 12, 2 / 8])
    m = moment_metrics(pred, gt)
    assert m["moment_R@1_IoU0.3"] == pytest.approx(200 / 3)
    assert m["moment_R@1_IoU0.5"] == pytest.approx(100 / 3)
    assert m["moment_mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.25) / 3)
    assert m["moment_exact"] == pytest.approx(100 / 3)


def test_tie_averaged_t2v_and_the_tie_warning(caplog):
    """A constant matrix scores Frozen t2v R@1 = 100 but tie-averaged R@1 = 1/n, with a warning."""
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        m = retrieval_metrics(np.ones((4, 4)))
    assert m["t2v_R@1"] == 100.0 and m["t2vavg_R@1"] == pytest.approx(25.0) and m["t2v_tied_pct"] == 100.0
    assert m["t2vavg_MeanR"] == pytest.approx(2.5)
    assert "tied" in caplog.text
    # row 0: one above, one tied -> rank 1 or 2: P(R@1) = 0, P(R@5) = 1; row 1: clean hit
    sims = np.array([[0.5, 0.7, 0.5], [0.1, 0.9, 0.2], [0.3, 0.2, 0.8]])
    t = tie_averaged_t2v(sims)
    assert t["t2vavg_R@1"] == pytest.approx(200 / 3) and t["t2v_tied_pct"] == pytest.approx(100 / 3)
    assert t["t2vavg_MeanR"] == pytest.approx((1.5 + 0 + 0) / 3 + 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        retrieval_metrics(np.eye(3))
    assert "tied" not in caplog.text
