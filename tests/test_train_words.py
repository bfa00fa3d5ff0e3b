"""Content words without a caption grammar: function words and corpus-wide words are dropped, every
word piece of a content word is kept, padding and specials never are; the per-caption cache of batch
after batch gives the definition's mask."""
import numpy as np
import torch
from tokenizers import Tokenizer

from train.text import default_model_dir
from train.words import ContentWords, content_chunks, content_mask, content_words, document_frequency


def test_function_words_and_frequent_words_are_not_content():
    caps = ["a red circle moves left quickly", "a blue square moves up slowly"] * 30
    df = document_frequency(caps)
    assert df["moves"] == 1.0 and df["red"] == 0.5
    words = "a red circle moves left quickly while the".split()
    assert content_words(words, df, 0.8) == [False, True, True, False, True, True, False, False]
    # a word in every caption is dropped by frequency alone, whatever it is
    assert content_words(["circle"], {"circle": 0.95}, 0.8) == [False]


def test_content_mask_follows_the_tokens_and_skips_specials():
    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    caps = ["a purple triangle enters from the right, then a yellow diamond leaves"]
    mask = content_mask(tok, caps, 40)  # one caption: function-word filter only
    enc = tok.encode(caps[0])
    kept = [t for t, k in zip(enc.tokens, mask[0].tolist()) if k]
    assert kept == ["purple", "triangle", "enters", "right", "yellow", "diamond", "leaves"]
    assert not mask[0, 0] and mask.shape == (1, 40)


def test_chunks_are_runs_of_content_words_split_at_function_words_and_punctuation():
    """RAKE-style chunks: "purple triangle" | "enters" | "right" | "yellow diamond leaves"."""
    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    caps = ["a purple triangle enters from the right, then a yellow diamond leaves"]
    mask = content_mask(tok, caps, 40)
    chunk = content_chunks(mask)[0].tolist()
    enc = tok.encode(caps[0])
    groups = [[t for t, c in zip(enc.tokens, chunk) if c == p] for p in range(max(chunk) + 1)]
    assert groups == [["purple", "triangle", "enters"], ["right"], ["yellow", "diamond", "leaves"]]
    assert all(c == -1 for c, k in zip(chunk, mask[0].tolist()) if not k)


def _reference_mask(tok, captions, length, max_df=0.8):
    """content_mask as first written: every caption tokenised again, frequencies of this batch."""
    df = document_frequency(captions) if len(captions) >= 50 else {}
    out = torch.zeros(len(captions), length, dtype=torch.bool)
    for i, (text, enc) in enumerate(zip(captions, tok.encode_batch(captions))):
        for j, (word_id, (a, b)) in enumerate(zip(enc.word_ids, enc.offsets)):
            if j < length - 1 and word_id is not None and b > a:
                a0, b0 = enc.word_to_chars(word_id)
                out[i, j] = content_words([text[a0:b0].lower()], df, max_df)[0]
    return out


def test_cached_content_words_equal_the_definition_batch_after_batch():
    """Each caption's words are kept, never its frequencies: "rolls" is in ~85% of the pool, so it is a
    content word in some batches and not in others; captions repeat, get evicted and come back."""
    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    rng = np.random.default_rng(0)
    words = ["red", "circle", "glides", "2", "dogs,", "the", "zigzagging", "square's", "up", "and"]
    pool = [" ".join(rng.choice(words, rng.integers(1, 14))) + (" rolls" if rng.random() < 0.85 else " waits")
            for _ in range(90)]
    cached = ContentWords(tok, 0.8, cache_size=40)
    seen = set()
    for size in (60, 10, 60, 60, 55, 60):  # below 50 captions: no frequency filter
        batch = list(rng.choice(pool, size))
        got = cached(batch, 12)
        assert torch.equal(got, _reference_mask(tok, batch, 12))
        seen.add(document_frequency(batch)["rolls"] > 0.8 if size >= 50 else None)
    assert seen == {True, False, None} and len(cached._cache) == 40
