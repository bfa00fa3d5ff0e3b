"""Content words of captions, for the word-level objectives (LocVTP's clip-word correspondence and the
word-level region alignment), without any knowledge of a caption grammar.

A token is *content* when the word it belongs to is alphabetic, is not an English function word
(a general list: articles, pronouns, prepositions, conjunctions, auxiliaries, a few light verbs) and
occurs in at most `max_df` of the captions given (an IDF-style filter: a word present in nearly every
caption, such as a corpus' generic verb, cannot tell one caption from another). Every word piece of a
content word is a content token. No part-of-speech tagger, no phrase regex.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from train.text import CaptionCache

# General English function words (closed classes) plus the commonest light verbs. Directional particles
# (up, down, left...) are deliberately absent: in video captions they carry the motion.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every another other such no one ones
i me my we us our you your he him his she her it its they them their there here
and or but nor so yet while whereas as than then after before when where whence since until once
of in on at to from by with without into onto upon about above below over under across through
throughout along among between behind beyond near off toward towards within via per around
is are was were be been being am do does did doing have has had having will would shall should can
could may might must
not also just very too only again still even all both either neither
what which who whom whose why how
get gets got make makes made go goes went gone move moves moved moving come comes came seem seems
""".split())


def content_words(words: list[str], doc_freq: dict[str, float], max_df: float) -> list[bool]:
    """Which of a caption's (lower-cased) words are content words."""
    return [w.isalpha() and w not in FUNCTION_WORDS and doc_freq.get(w, 0.0) <= max_df for w in words]


def document_frequency(captions: list[str]) -> dict[str, float]:
    """Fraction of the captions holding each lower-cased alphabetic word."""
    return _frequency([frozenset(_split(c)) for c in captions])


def _frequency(vocabs: list[frozenset[str]]) -> dict[str, float]:
    """Fraction of the captions (each as its set of words) holding each word."""
    count = Counter(w for vocab in vocabs for w in vocab)
    return {w: n / max(1, len(vocabs)) for w, n in count.items()}


def _split(caption: str) -> list[str]:
    return "".join(ch.lower() if ch.isalpha() else " " for ch in caption).split()


MIN_CAPTIONS_FOR_DF = 50  # fewer captions (one caption shown by `vlpcache show`) cannot estimate frequencies


def content_mask(tokenizer, captions: list[str], length: int, max_df: float = 0.8) -> torch.Tensor:
    """[N, length] bool: token j of caption i belongs to a content word. `tokenizer` is a `tokenizers`
    Tokenizer whose encodings match the ids the captions were padded to (same truncation at `length`).
    The frequency filter needs at least MIN_CAPTIONS_FOR_DF captions; below, function words only."""
    return ContentWords(tokenizer, max_df)(captions, length)


@dataclass
class _CaptionWords:
    """What content_mask needs of one caption, whatever the batch."""

    vocab: frozenset[str]  # its words as document_frequency counts them
    position: list[int]  # token index of each word token (specials and empty tokens left out)
    word: list[str]  # the lower-cased word that token belongs to
    candidate: list[bool]  # the word is content unless too frequent (alphabetic, not a function word)


class ContentWords:
    """content_mask for batch after batch: the frequencies are the batch's, but each caption's words,
    their tokens and the function-word test are kept (at most `cache_size` captions, least recently used
    out first), so a caption is tokenised once, not every time it is sampled."""

    def __init__(self, tokenizer, max_df: float = 0.8, cache_size: int = 16384):
        self.max_df = max_df
        self._cache = CaptionCache(tokenizer, self._caption_words, cache_size)

    def __call__(self, captions: list[str], length: int) -> torch.Tensor:
        """-> [N, length] bool, as content_mask."""
        words = self._cache(captions)
        df = _frequency([cw.vocab for cw in words]) if len(captions) >= MIN_CAPTIONS_FOR_DF else {}
        out = np.zeros((len(captions), length), bool)
        for i, cw in enumerate(words):
            for j, word, candidate in zip(cw.position, cw.word, cw.candidate):
                if j < length - 1 and candidate and df.get(word, 0.0) <= self.max_df:  # last slot: [SEP] if truncated
                    out[i, j] = True
        return torch.from_numpy(out)

    def _caption_words(self, text: str, enc) -> _CaptionWords:
        position, word = [], []
        for j, (word_id, (a, b)) in enumerate(zip(enc.word_ids, enc.offsets)):
            if word_id is None or b <= a:
                continue
            a0, b0 = enc.word_to_chars(word_id)
            position.append(j)
            word.append(text[a0:b0].lower())
        return _CaptionWords(frozenset(_split(text)), position, word, content_words(word, {}, self.max_df))


def content_chunks(content: torch.Tensor) -> torch.Tensor:
    """content [B, L] bool (content tokens) -> [B, L] int64 chunk index of each content token within its
    caption (0, 1, ...), -1 elsewhere. A chunk is a maximal run of consecutive content tokens."""
    starts = content & ~torch.nn.functional.pad(content, (1, 0))[:, :-1]  # [B, L] first token of a run
    return torch.where(content, starts.long().cumsum(1) - 1, torch.full_like(content, -1, dtype=torch.long))
