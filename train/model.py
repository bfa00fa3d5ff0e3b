"""The video-text model: a small transformer over frame tokens and region/track tokens, the text head,
and the projection heads of each objective.

Video tokens (built by train.data.VideoBatch):
- frame tokens: frame feature + frame-index embedding;
- unit tokens, either "track" (one per region class: with the "given" box source class = object index,
  so a track is one object followed across frames; its token is the mean RoI feature plus the whole
  trajectory: per frame centre, size, presence and displacement) or "region" (one per box per frame:
  RoI feature + 6-d box geometry + displacement to the same class in the next frame + frame index).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.text import TextEncoder


@dataclass
class VideoBatch:
    frames: torch.Tensor  # [B, T, Df]
    frame_mask: torch.Tensor  # [B, T] bool
    units: torch.Tensor  # [B, R, Dr]
    unit_geom: torch.Tensor  # [B, R, G]
    unit_frame: torch.Tensor  # [B, R] int64, frame index of a region token, T for a whole-video track
    unit_mask: torch.Tensor  # [B, R] bool

    def to(self, device: torch.device) -> "VideoBatch":
        return VideoBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def index(self, idx: torch.Tensor) -> "VideoBatch":
        return VideoBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def float(self) -> "VideoBatch":
        """Features cast to float32 (they are kept in float16 in memory, as in the store)."""
        return VideoBatch(self.frames.float(), self.frame_mask, self.units.float(), self.unit_geom.float(),
                          self.unit_frame, self.unit_mask)


@dataclass
class VideoOut:
    cls: torch.Tensor  # [B, d]
    frames: torch.Tensor  # [B, T, d]
    units: torch.Tensor  # [B, R, d]


@dataclass
class TextOut:
    cls: torch.Tensor  # [B, d]
    tokens: torch.Tensor  # [B, L, d]


def _encoder(dim: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class VideoEncoder(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, dropout: float, Df: int, Dr: int, G: int, T: int,
                 use_regions: bool):
        super().__init__()
        self.use_regions = use_regions
        self.frame_in = nn.Sequential(nn.LayerNorm(Df), nn.Linear(Df, dim))
        self.unit_in = nn.Sequential(nn.LayerNorm(Dr), nn.Linear(Dr, dim))
        self.geom_in = nn.Sequential(nn.Linear(G, dim), nn.GELU(), nn.Linear(dim, dim))
        self.time = nn.Embedding(T + 1, dim)  # index T = "the whole video" (track tokens)
        self.kind = nn.Embedding(3, dim)  # cls, frame, unit
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = _encoder(dim, layers, heads, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, v: VideoBatch) -> VideoOut:
        B, T, _ = v.frames.shape
        frames = self.frame_in(v.frames) + self.time.weight[:T] + self.kind.weight[1]  # [B, T, d]
        units = (self.unit_in(v.units) + self.geom_in(v.unit_geom) + self.time(v.unit_frame)
                 + self.kind.weight[2])  # [B, R, d]
        cls = self.cls.expand(B, 1, -1) + self.kind.weight[0]  # [B, 1, d]
        unit_mask = v.unit_mask if self.use_regions else torch.zeros_like(v.unit_mask)
        x = torch.cat([cls, frames, units], dim=1)  # [B, 1 + T + R, d]
        keep = torch.cat([torch.ones_like(v.frame_mask[:, :1]), v.frame_mask, unit_mask], dim=1)
        x = self.norm(self.blocks(x, src_key_padding_mask=~keep))
        return VideoOut(cls=x[:, 0], frames=x[:, 1:1 + T], units=x[:, 1 + T:])


class LocalizationHead(nn.Module):
    """TemPVL over a merged sequence of M videos: per-position start/end logits for each text and, for
    each video segment, which of the M texts it shows.

    A text's logit at position s = (text-independent boundary logit of s: a one-layer transformer with
    position embeddings over the merged frame tokens) + (text [CLS] query . position key) + match / tau,
    where match is the binding-aware score of the text against the video that fills position s: the
    region-phrase alignment S_loc of its phrases against that video's region/track tokens (phrase ->
    region attention and back, as in DemoVLP). The [CLS] query alone cannot tell a caption from its
    colour-swapped twin; the phrase-region match can, so hard-sampled groups become learnable."""

    def __init__(self, dim: int, heads: int, dropout: float, max_positions: int, init_temperature: float):
        super().__init__()
        self.pos = nn.Embedding(max_positions, dim)
        self.blocks = _encoder(dim, 1, heads, dropout)
        self.query = nn.Linear(dim, dim)
        self.start = nn.Linear(dim, dim)
        self.end = nn.Linear(dim, dim)
        self.boundary = nn.Linear(dim, 2)  # start / end logit of a position, whatever the text
        self.segment = nn.Linear(dim, dim)
        self.match_scale = nn.Parameter(torch.tensor(1.0 / init_temperature).log())

    def forward(self, seq: torch.Tensor, texts: torch.Tensor, segment_len: int, match: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """seq [G, S, d] merged frame tokens, texts [G, M, d], match [G, M, M] (text m vs the video in
        segment k) -> start/end [G, M, S], segment [G, M, M] (segment k, text m)."""
        G, S, d = seq.shape
        h = self.blocks(seq + self.pos.weight[:S])  # [G, S, d]
        q = self.query(texts)  # [G, M, d]
        scale = d ** -0.5
        m = match * self.match_scale.exp().clamp(max=100.0)  # [G, M, K]
        m_pos = m.repeat_interleave(segment_len, dim=2)  # [G, M, S]: each position gets its video's match
        bound = self.boundary(h)  # [G, S, 2]
        start = torch.einsum("gmd,gsd->gms", q, self.start(h)) * scale + bound[:, None, :, 0] + m_pos
        end = torch.einsum("gmd,gsd->gms", q, self.end(h)) * scale + bound[:, None, :, 1] + m_pos
        segs = self.segment(h).reshape(G, S // segment_len, segment_len, d).mean(2)  # [G, K, d]
        segment = torch.einsum("gkd,gmd->gkm", segs, q) * scale + m.transpose(1, 2)  # [G, segment k, text m]
        return {"start": start, "end": end, "segment": segment}


class VideoTextModel(nn.Module):
    def __init__(self, cfg: TrainConfig, Df: int, Dr: int, G: int, T: int, minilm: nn.Module | None = None):
        super().__init__()
        m, E = cfg.model, cfg.model.embed_dim
        self.T = T
        self.video = VideoEncoder(m.dim, m.layers, m.heads, m.dropout, Df, Dr, G, T, m.use_regions)
        self.text = TextEncoder(m.dim, cfg.text.head_layers, m.heads, m.dropout, cfg.text.max_tokens, minilm)
        self.proj_video, self.proj_text = nn.Linear(m.dim, E), nn.Linear(m.dim, E)  # (1) global
        self.align_video, self.align_text = nn.Linear(m.dim, E), nn.Linear(m.dim, E)  # (2) region-phrase
        # (3) LocVTP: a clip is projected together with its two temporal neighbours (context head).
        self.clip_context = nn.Sequential(nn.Linear(3 * m.dim, m.dim), nn.GELU(), nn.Linear(m.dim, E))
        self.clip_key, self.word = nn.Linear(m.dim, E), nn.Linear(m.dim, E)
        self.shift = nn.Embedding(2, E)  # temporal-aware: signed shift -1 / +1
        self.loc = LocalizationHead(m.dim, m.heads, m.dropout, cfg.loss.loc_videos * T, cfg.loss.align_temperature)  # (4) TemPVL
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / cfg.loss.init_temperature).log())

    def encode_video(self, v: VideoBatch) -> VideoOut:
        return self.video(v)

    def encode_text(self, feats_or_ids: torch.Tensor, mask: torch.Tensor) -> TextOut:
        cls, tokens = self.text(feats_or_ids, mask)
        return TextOut(cls=cls, tokens=tokens)

    def global_video(self, out: VideoOut) -> torch.Tensor:
        return F.normalize(self.proj_video(out.cls), dim=-1)  # [B, E]

    def global_text(self, out: TextOut) -> torch.Tensor:
        return F.normalize(self.proj_text(out.cls), dim=-1)  # [B, E]

    def clips(self, out: VideoOut, clip_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context-projected clips [B, C, E] (queries) and plain clip keys [B, C, E], normalised."""
        B, T, d = out.frames.shape
        C = T // clip_frames
        clip = out.frames[:, : C * clip_frames].reshape(B, C, clip_frames, d).mean(2)  # [B, C, d]
        padded = F.pad(clip, (0, 0, 1, 1))  # zero neighbours at both ends
        context = torch.cat([padded[:, :-2], clip, padded[:, 2:]], dim=-1)  # [B, C, 3d]
        return F.normalize(self.clip_context(context), dim=-1), F.normalize(self.clip_key(clip), dim=-1)

    def scale(self) -> torch.Tensor:
        """Learnable inverse temperature of the global loss, capped at 100 (temperature >= 0.01)."""
        return self.logit_scale.exp().clamp(max=100.0)
