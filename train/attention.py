"""Which regions each phrase (or word) of a caption attends to, for `vlpcache show --checkpoint`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.config import TrainConfig
from train.data import linked, track_tokens, video_batch
from train.losses import alignment_similarity, unit_region_attention
from train.objectives import TextBatch, text_units, word_mask
from train.text import CaptionTokenizer, FrozenTextFeatures, clause_spans, resolve_model_dir
from train.words import content_chunks, content_mask


@dataclass
class Attention:
    units: list[str]  # the phrases (or words) of the caption
    weights: np.ndarray  # [P, R] attention of each unit over the video's region tokens
    slots: list[list[tuple[int, int]]]  # region token r -> the (frame, slot) boxes it stands for
    score: float  # S_loc of the pair (alignment score)


def _slots(arrays: dict, units: str, max_units: int) -> list[list[tuple[int, int]]]:
    a = linked({k: v[None] for k, v in arrays.items() if k != "caption"})
    classes = a["region_classes"][0]  # [T, K] track ids, as video_batch forms them
    T, K = classes.shape
    if units == "region":
        return [[(t, k)] if classes[t, k] >= 0 else [] for t in range(T) for k in range(K)]
    track_class = track_tokens(a, max_units)[4][0]
    return [[(int(t), int(k)) for t, k in zip(*np.nonzero(classes == c))] if c >= 0 else [] for c in track_class]


@torch.no_grad()
def caption_attention(checkpoint: str, arrays: dict, caption: str) -> Attention:
    """arrays: one video as returned by `reader[video_id]` (store arrays, no leading N axis)."""
    from train.data import check_signature
    from train.trainer import build_model, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    T, K = arrays["region_classes"].shape
    got = {"format_version": ckpt["store"]["format_version"], "T": T, "K": K,
           "Df": arrays["frame_features"].shape[-1], "Dr": arrays["region_features"].shape[-1]}
    check_signature(got, ckpt["store"], "of this video")
    model = build_model(cfg, ckpt["store"]).eval()
    model.load_state_dict(ckpt["model"])
    model_dir = resolve_model_dir(cfg.text.model_dir)
    tokenizer = CaptionTokenizer(model_dir, cfg.text.max_tokens, "truncate")
    tokens = tokenizer([caption])
    inputs = FrozenTextFeatures(model_dir)(tokens.ids, tokens.mask) if cfg.text.frozen else tokens.ids
    content = content_mask(tokenizer.tokenizer, [caption], tokens.ids.shape[1], cfg.loss.content_max_df)
    text = TextBatch(inputs, tokens.mask, tokens.phrase, content)
    video = video_batch({k: v[None] for k, v in arrays.items() if k != "caption"}, cfg.model.units, cfg.model.max_units)
    vo = model.encode_video(video.float())
    to = model.encode_text(text.inputs, text.mask)
    units, umask = text_units(to.tokens, text, cfg.loss.align_unit)
    units = F.normalize(model.align_text(units), dim=-1)[0]  # [P, E]
    regions = F.normalize(model.align_video(vo.units), dim=-1)[0]  # [R, E]
    weights = unit_region_attention(units, umask[0], regions, video.unit_mask[0], cfg.loss.align_lambda)
    score = float(alignment_similarity(units[None], umask, regions[None], video.unit_mask, cfg.loss.align_lambda))
    if cfg.loss.align_unit == "phrase":
        labels = [caption[a:b] for a, b in clause_spans(caption)][: int(umask.sum())]
    elif cfg.loss.align_unit == "chunk":  # the word pieces of each chunk, joined
        enc = tokenizer.tokenizer.encode(caption)
        chunk = content_chunks(text.content & text.mask)[0].tolist()
        labels = [" ".join(tok for tok, c in zip(enc.tokens, chunk) if c == p) for p in range(int(umask.sum()))]
    else:  # word units: one label per kept token, in order
        enc = tokenizer.tokenizer.encode(caption)
        keep = (word_mask(text.mask) if cfg.loss.align_unit == "word" else text.content & text.mask)[0].tolist()
        labels = [tok for tok, k in zip(enc.tokens, keep) if k]
        if cfg.loss.align_unit == "word":
            weights = weights[torch.tensor(keep[: weights.shape[0]])]
    return Attention(labels, weights[: len(labels)].numpy(), _slots(arrays, cfg.model.units, cfg.model.max_units), score)
