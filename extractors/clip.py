"""CLIP frame towers from open_clip (ViT-B-32, ViT-B-16, ViT-L-14): the projected image embedding per frame,
and optionally the patch tokens (projected the same way) as "grid" regions.

Built with `open_clip.create_model(name, pretrained=None)`: nothing downloads. A local checkpoint
(open_clip's `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`, or a visual-only state dict)
is read by extractors.weights (weights_only) and loaded strictly into the image tower; the text tower's
keys are reported and ignored. Preprocessing is the one open_clip defines for the model
(`model.visual.preprocess_cfg`: size, mean, std, interpolation, resize mode), applied to uint8 tensors;
`frame_encoder.input_size` must equal that size (refused otherwise, before the model is built).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from extractors.config import FrameEncoderConfig
from extractors.encoders import Runtime, seeded, weight_file
from extractors.weights import OPEN_CLIP_PREFIX, WeightsError, check_and_load, read_weights

log = logging.getLogger(__name__)

VISUAL_PREFIX = "visual."


def build_clip_visual(model: str, weights: str, seed: int, allow_random: bool = False) -> nn.Module:
    """open_clip's image tower for `model` ("open_clip:ViT-B-32"), weights loaded or seeded."""
    import open_clip

    arch = model[len(OPEN_CLIP_PREFIX):]
    path = weight_file(weights, model, seed, allow_random)
    ours: dict[str, torch.Tensor] = {}
    if path is not None:  # read and sorted out before the (slow) build, so that a wrong file fails fast
        state = read_weights(path)
        has_prefix = any(k.startswith(VISUAL_PREFIX) for k in state)
        if not has_prefix and "conv1.weight" not in state:
            raise WeightsError(f"{path} is not an open_clip checkpoint: no 'visual.*' keys and no 'conv1.weight' "
                               f"(first keys: {list(state)[:3]}); expected {arch} with open_clip key names")
        ours = {k.removeprefix(VISUAL_PREFIX): v for k, v in state.items() if k.startswith(VISUAL_PREFIX) or not has_prefix}
        if len(state) > len(ours):
            log.info("%s: %d non-image-tower key(s) (text tower, logit scale) ignored", path.name, len(state) - len(ours))
    with seeded(seed):
        visual = open_clip.create_model(arch, pretrained=None, device="cpu").visual
    if path is not None:
        check_and_load(visual, ours, path, model)
    return visual


def check_input_size(model: str, input_size: int) -> None:
    """A CLIP tower sees frames at the size its weights were trained at (its position embeddings are for
    that grid): frame_encoder.input_size must say that size, or the config would claim another one."""
    import open_clip

    arch = model[len(OPEN_CLIP_PREFIX):]
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    if input_size != size:
        raise ValueError(f"frame_encoder.input_size is {input_size}, but {model} takes {size}x{size} frames (open_clip's "
                         f"preprocessing for it; its position embeddings are for that size): set "
                         f"frame_encoder.input_size: {size}, or pick a CLIP model made for {input_size}")


class OpenClipFrameEncoder:
    """B x [H, W, 3] uint8 frames -> [B, D] float32 projected CLIP image embeddings (not L2-normalised).

    `tokens(frames)` also returns the patch tokens [B, g*g, D] (after ln_post, projected like the pooled
    token), with g = image size / patch size (7 for ViT-B-32 at 224).
    """

    def __init__(self, cfg: FrameEncoderConfig, device: str | torch.device = "cpu", allow_random: bool = False) -> None:
        self.cfg = cfg
        self.runtime = Runtime(torch.device(device), cfg.amp, cfg.channels_last)
        check_input_size(cfg.model, cfg.input_size)
        visual = build_clip_visual(cfg.model, cfg.weights, cfg.seed, allow_random)
        visual.output_tokens = True
        self.visual = self.runtime.prepare(visual)
        self.dim = int(visual.output_dim)  # 512 for ViT-B-32 / B-16, 768 for ViT-L-14
        pp = visual.preprocess_cfg
        self.size = _pair(pp["size"])  # (h, w)
        self.grid = (self.size[0] // _pair(visual.patch_size)[0], self.size[1] // _pair(visual.patch_size)[1])
        self.preprocess = ClipPreprocess(self.size, pp["mean"], pp["std"], pp["interpolation"], pp["resize_mode"])

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        return self.tokens(frames, with_tokens=False)[0]

    def tokens(self, frames: list[np.ndarray], with_tokens: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (embeddings [B, D], patch tokens [B, gh*gw, D] or None)."""
        pooled, tokens = [], []
        with self.runtime.context():
            for start in range(0, len(frames), self.cfg.batch_size):
                x = self.preprocess(frames[start : start + self.cfg.batch_size], self.runtime.device)
                p, t = self.visual(x)  # [b, D], [b, gh*gw, width]
                pooled.append(p.float().cpu().numpy())
                if with_tokens:
                    proj = self.visual.proj
                    tokens.append((t @ proj if proj is not None else t).float().cpu().numpy())  # [b, gh*gw, D]
        empty = np.zeros((0, self.dim), np.float32)
        emb = np.concatenate(pooled) if pooled else empty
        tok = (np.concatenate(tokens) if tokens else np.zeros((0, self.grid[0] * self.grid[1], self.dim), np.float32)) \
            if with_tokens else None
        return emb, tok

    def crop_box(self, width: int, height: int) -> np.ndarray:
        """The frame-pixel box [x1, y1, x2, y2] that the model sees after resize + centre crop."""
        h, w = self.size
        if self.preprocess.resize_mode == "squash":
            return np.array([0, 0, width, height], np.float32)
        scale = max(h / height, w / width)  # short side to the model size, then crop the centre
        cw, ch = w / scale, h / scale
        x0, y0 = (width - cw) / 2, (height - ch) / 2
        return np.array([x0, y0, x0 + cw, y0 + ch], np.float32)


class ClipPreprocess:
    """open_clip's image transform on uint8 tensors: resize (short side, antialiased, open_clip's
    interpolation), centre crop, scale to [0, 1], normalise with the model's mean/std."""

    MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str, resize_mode: str) -> None:
        if interpolation not in self.MODES or resize_mode not in ("shortest", "squash"):
            raise ValueError(f"open_clip preprocess interpolation={interpolation!r} resize_mode={resize_mode!r} "
                             f"is not supported here (supported: {sorted(self.MODES)}, shortest/squash)")
        self.size, self.resize_mode = size, resize_mode
        self.interpolation = self.MODES[interpolation]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, frames: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """B x [H, W, 3] uint8 -> [B, 3, h, w] float32 normalised."""
        out = []
        for frame in frames:
            x = torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)  # [3, H, W] uint8
            if self.resize_mode == "squash":
                x = TF.resize(x, list(self.size), interpolation=self.interpolation, antialias=True)
            else:
                x = TF.resize(x, min(self.size), interpolation=self.interpolation, antialias=True)
                x = TF.center_crop(x, list(self.size))
            out.append(x)
        batch = torch.stack(out).float() / 255.0  # [B, 3, h, w]
        return (batch - self.mean.to(device)) / self.std.to(device)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
