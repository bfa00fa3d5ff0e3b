"""The text tower without transformers: train.text.MiniLM (torch layers, weights from model.safetensors)
gives transformers' BertModel outputs on real captions with padding, and loads a state dict written with
BertModel's names (a live-MiniLM checkpoint of before). This test is the one place that imports
transformers, as the reference."""
import pytest
import torch
from torch import nn

from train.text import CaptionTokenizer, MiniLM, default_model_dir


@pytest.mark.slow  # imports transformers (~7 s of CPU), which is what the fast suite no longer pays
def test_minilm_matches_transformers_bert_and_loads_its_state_dict():
    from transformers import BertModel

    model_dir = default_model_dir()
    ours = MiniLM.from_pretrained(model_dir).eval()
    ref = BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    tokens = CaptionTokenizer(model_dir, 16)(["a red circle moves left", "two dogs",
                                              "a green triangle leaves the frame while a blue square waits"])
    with torch.no_grad():
        got = ours(tokens.ids, tokens.mask)  # [3, 16, 384]
        want = ref(input_ids=tokens.ids, attention_mask=tokens.mask.long()).last_hidden_state
    real = tokens.mask[..., None]
    assert not tokens.mask.all()  # padding is exercised
    assert float(((got - want).abs() * real).max()) < 1e-5

    class Holder(nn.Module):  # a checkpoint of a model holding BertModel under `minilm`
        def __init__(self, minilm):
            super().__init__()
            self.minilm = minilm

    state = Holder(ref).state_dict()
    fresh = Holder(MiniLM.from_pretrained(model_dir))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(state)  # strict: every parameter is mapped, the unused pooler dropped
    with torch.no_grad():
        again = fresh.minilm.eval()(tokens.ids, tokens.mask)
    assert torch.equal(again, got)


def test_loading_minilm_draws_nothing_from_the_global_rng():
    """The trainer seeds torch before the first batch; the frozen MiniLM loads lazily at that batch. A load
    that drew from the global RNG (a random init before the weights arrive) would shift every later
    dropout mask, so a run in a fresh process, and a resumed run, would differ from one whose process had
    loaded it already (the resume test in a process of its own caught this)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    MiniLM.from_pretrained(default_model_dir())
    assert torch.equal(before, torch.get_rng_state())


def test_cached_tokenisation_equals_a_fresh_tokenizer_batch_after_batch():
    """Captions repeat, are evicted (cache of 4) and come back; long ones are cut with [SEP] kept last."""
    import numpy as np

    model_dir = default_model_dir()
    pool = ["a red circle moves left", "two dogs", "a green triangle leaves the frame while a blue square waits",
            "a yellow diamond, then a red circle and a blue square move up and down across the whole frame",
            "   ", "the cat"]
    cached = CaptionTokenizer(model_dir, 12, cache_size=4)
    rng = np.random.default_rng(0)
    for _ in range(6):
        batch = [str(c) for c in rng.choice(pool, 5)]
        fresh = CaptionTokenizer(model_dir, 12)
        assert cached.word_counts(batch) == fresh.word_counts(batch)
        batch = [c for c in batch if c.strip()]
        got, want = cached(batch), fresh(batch)
        for f in ("ids", "mask", "phrase"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert got.truncated == want.truncated
    assert len(cached._cache) == 4 and cached(pool[3:4]).truncated == 1
    assert cached(pool[:2]).phrase[0].max() == 0 and fresh(pool[2:3]).phrase[0].max() == 1  # clauses
