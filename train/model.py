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
    """TemPVL over a merged sequence built from raw frame features (no per-video encoding, so no
    within-clip frame index and no segment boundary reaches it): per-position start/end logits for each
    text and, per position, which of the M texts it shows.

    Positions: h = transformer layer(frame_in(x) + conv_3(frame_in(x)) + position embedding), where the
    temporal convolution (kernel 3 over the merged sequence, as in the temporal-conv heads of 2D-TAN and
    TemPVL) lets a position compare its frame with its neighbours: a cut between two clips is a change of
    content, found from the frames themselves. A text's logit at position s = (text-independent boundary
    logit of s) + (text [CLS] query . position key) + match[s] / tau, where match[s] is the region-unit
    score S_loc of the text against the region tokens *visible at position s* (computed by the caller,
    frame by frame). The [CLS] query alone cannot tell a caption from its colour-swapped twin; the region
    match can. Spans are decoded from all three outputs together (losses.span_scores)."""

    def __init__(self, dim: int, heads: int, dropout: float, max_positions: int, init_temperature: float, Df: int):
        super().__init__()
        self.frame_in = nn.Sequential(nn.LayerNorm(Df), nn.Linear(Df, dim))
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.pos = nn.Embedding(max_positions, dim)
        self.blocks = _encoder(dim, 1, heads, dropout)
        self.query = nn.Linear(dim, dim)
        self.start = nn.Linear(dim, dim)
        self.end = nn.Linear(dim, dim)
        self.boundary = nn.Linear(dim, 2)  # start / end logit of a position, whatever the text
        self.member = nn.Linear(dim, dim)
        self.match_scale = nn.Parameter(torch.tensor(1.0 / init_temperature).log())

    def forward(self, seq: torch.Tensor, valid: torch.Tensor, texts: torch.Tensor, match: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """seq [G, S, Df] raw frame features of the merged sequences, valid [G, S] bool (False = padding),
        texts [G, M, d], match [G, M, S] -> start/end/member [G, M, S] logits (padding at -inf)."""
        G, S, _ = seq.shape
        x = self.frame_in(seq) * valid[..., None]  # [G, S, d]
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = self.blocks(x + self.pos.weight[:S], src_key_padding_mask=~valid)  # [G, S, d]
        q = self.query(texts)  # [G, M, d]
        scale = h.shape[-1] ** -0.5
        m = match * self.match_scale.exp().clamp(max=100.0)  # [G, M, S]
        bound = self.boundary(h)  # [G, S, 2]
        pad = (~valid)[:, None, :]
        start = torch.einsum("gmd,gsd->gms", q, self.start(h)) * scale + bound[:, None, :, 0] + m
        end = torch.einsum("gmd,gsd->gms", q, self.end(h)) * scale + bound[:, None, :, 1] + m
        member = torch.einsum("gmd,gsd->gms", q, self.member(h)) * scale + m
        return {k: v.masked_fill(pad, float("-inf")) for k, v in
                (("start", start), ("end", end), ("member", member))}


class VideoTextModel(nn.Module):
    def __init__(self, cfg: TrainConfig, Df: int, Dr: int, G: int, T: int, minilm: nn.Module | None = None):
        super().__init__()
        m, E = cfg.model, cfg.model.embed_dim
        self.T = T
        self.video = VideoEncoder(m.dim, m.layers, m.heads, m.dropout, Df, Dr, G, T, m.use_regions)
        self.text = TextEncoder(m.dim, cfg.text.head_layers, m.heads, m.dropout, cfg.text.max_tokens, minilm)
        self.proj_video, self.proj_text = nn.Linear(m.dim, E), nn.Linear(m.dim, E)  # (1) global
        self.align_video, self.align_text = nn.Linear(m.dim, E), nn.Linear(m.dim, E)  # (2) region-phrase
        # (3) LocVTP. Clips are encoded one by one from their own frames (the video encoder's per-frame
        # input layer, then an MLP; LocVTP has a per-clip backbone): no clip feature holds another clip,
        # so the context query of clip c cannot contain the clip it must find. The context projection
        # head warps clip c by a signed shift delta.
        self.max_shift = cfg.loss.max_shift
        self.clip_enc = nn.Sequential(nn.GELU(), nn.Linear(m.dim, m.dim))
        self.clip_word, self.word = nn.Linear(m.dim, E), nn.Linear(m.dim, E)
        self.clip_key = nn.Linear(m.dim, E)
        self.shift = nn.Embedding(2 * cfg.loss.max_shift + 1, m.dim)  # delta in [-max_shift, max_shift]
        self.clip_context = nn.Sequential(nn.Linear(m.dim, m.dim), nn.GELU(), nn.Linear(m.dim, E))
        self.loc = LocalizationHead(m.dim, m.heads, m.dropout, cfg.loss.loc_videos * T, cfg.loss.align_temperature,
                                    Df)  # (4) TemPVL
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

    def clips(self, frames: torch.Tensor, clip_frames: int, shifts: list[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LocVTP clips from raw frame features [B, T, Df]: clip-word embeddings [B, C, E], temporal keys
        [B, C, E] and context queries [D, B, C, E] (clip c warped by shift delta = shifts[i]), normalised."""
        B, T, Df = frames.shape
        C = T // clip_frames
        per_frame = self.video.frame_in(frames[:, : C * clip_frames])  # [B, C*k, d], no mixing across frames
        clip = self.clip_enc(per_frame.reshape(B, C, clip_frames, -1).mean(2))  # [B, C, d]
        delta = torch.tensor(shifts, device=frames.device) + self.max_shift  # [D]
        queries = self.clip_context(clip[None] + self.shift(delta)[:, None, None])  # [D, B, C, E]
        return (F.normalize(self.clip_word(clip), dim=-1), F.normalize(self.clip_key(clip), dim=-1),
                F.normalize(queries, dim=-1))

    def scale(self) -> torch.Tensor:
        """Learnable inverse temperature of the global loss, capped at 100 (temperature >= 0.01)."""
        return self.logit_scale.exp().clamp(max=100.0)
