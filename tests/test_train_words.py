"""Content words without a caption grammar: function words and corpus-wide words are dropped, every
word piece of a content word is kept, padding and specials never are."""
from tokenizers import Tokenizer

from train.text import default_model_dir
from train.words import content_chunks, content_mask, content_words, document_frequency


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
