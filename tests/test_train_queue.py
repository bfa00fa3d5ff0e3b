"""The feature queue (train/queue.py): FIFO contents across wrap-around, staged rows reach it only on
commit, the global loss with queued negatives against its definition, and no gradient into the past.
(Exact resume with a queue: tests/test_train_loop.py.)"""
import pytest
import torch
import torch.nn.functional as F

from train.config import ConfigError, TrainConfig, apply_overrides
from train.losses import GlobalContrastiveLoss
from train.queue import FeatureQueue


def _rows(start, n, dim=3):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)  # row i = [i, i, i]


def test_fifo_contents_commit_and_discard():
    q = FeatureQueue(5, 3)
    assert q.negatives()[0].shape == (0, 3)
    q.stage(_rows(0, 2), -_rows(0, 2))
    assert q.filled == 0  # staged, not yet pushed
    q.commit()
    q.stage(_rows(2, 2), -_rows(2, 2))
    q.stage(_rows(4, 2), -_rows(4, 2))  # two micro-batches of one step
    q.commit()
    video, text = q.negatives()
    assert q.filled == 5 and sorted(video[:, 0].tolist()) == [1, 2, 3, 4, 5]  # row 0 was the oldest: gone
    assert torch.equal(text, -video)
    q.stage(_rows(6, 9), -_rows(6, 9))  # more rows than the queue holds: the newest 5 stay
    q.discard()
    assert sorted(q.negatives()[0][:, 0].tolist()) == [1, 2, 3, 4, 5]  # a discarded step leaves no trace
    q.stage(_rows(6, 9), -_rows(6, 9))
    q.commit()
    assert sorted(q.negatives()[0][:, 0].tolist()) == [10, 11, 12, 13, 14]
    again = FeatureQueue(5, 3)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.video, q.video) and (again.ptr, again.filled) == (q.ptr, q.filled)
    with pytest.raises(ValueError, match="resume with the run's config"):
        FeatureQueue(4, 3).load_state_dict(q.state_dict())


def test_global_loss_with_queued_negatives_matches_its_definition_and_sends_no_gradient_back():
    g = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    q = FeatureQueue(6, 8)
    q.stage(F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_(),
            F.normalize(torch.randn(6, 8, generator=g), dim=-1))
    q.commit()
    qv, qt = q.negatives()
    assert not qv.requires_grad and not qt.requires_grad  # stored detached
    scale = torch.tensor(10.0, requires_grad=True)
    loss = GlobalContrastiveLoss()(video, text, scale, (qv, qt))
    # definition: text i against videos [batch; queue], video i against texts [batch; queue], positive = i
    t2v = -torch.log_softmax(scale * text @ torch.cat([video, qv]).t(), 1).diagonal()
    v2t = -torch.log_softmax(scale * video @ torch.cat([text, qt]).t(), 1).diagonal()
    assert loss.item() == pytest.approx(0.5 * (t2v.mean() + v2t.mean()).item(), rel=1e-6)
    assert loss > GlobalContrastiveLoss()(video, text, scale)  # more negatives, higher loss on random data
    before = q.video.clone()
    loss.backward()
    assert video.grad is not None and scale.grad is not None
    assert torch.equal(q.video, before) and q.video.grad is None
    # an empty queue is the plain loss
    empty = FeatureQueue(6, 8).negatives()
    assert GlobalContrastiveLoss()(video, text, scale, empty).item() == GlobalContrastiveLoss()(video, text, scale).item()


def test_queue_config_is_strict_and_off_by_default():
    assert TrainConfig().loss.queue_size == 0
    with pytest.raises(ConfigError, match="queue_size must be int"):
        apply_overrides(TrainConfig(), ["loss.queue_size=1.5"])
    with pytest.raises(ConfigError, match="needs loss.global_weight > 0"):
        apply_overrides(TrainConfig(), ["loss.queue_size=64", "loss.global_weight=0", "loss.align_weight=1"]).validate()
    with pytest.raises(ConfigError, match="queue_size must be >= 0"):
        apply_overrides(TrainConfig(), ["loss.queue_size=-1"]).validate()
