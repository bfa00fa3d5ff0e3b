"""Frame encoders: one feature per frame from an ImageNet CNN/ViT (timm EfficientNet-Lite0, torchvision)
or a CLIP image tower (open_clip ViT-B-32 / ViT-B-16 / ViT-L-14: the projected image embedding).

Weights come from a local file named in the config (extractors.weights: weights_only, checked key by
key); without one the model is initialised from a fixed seed, bitwise reproducibly, and only when the
caller allows random weights. Frames of many videos go through one forward pass together.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from extractors.config import FrameEncoderConfig
from extractors.weights import (OPEN_CLIP_PREFIX, WeightsError, check_and_load, published_file, read_weights,
                                resolve_weights, warn_if_not_published)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded(seed: int):
    """Build a model under a fixed seed without disturbing the caller's RNG state."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack


def weight_file(spec: str, model: str, seed: int, allow_random: bool) -> Path | None:
    """The local weight file of `model`, or None for a seeded random init (refused unless allowed)."""
    path = resolve_weights(spec, model)
    if path is None and not allow_random:
        raise WeightsError(f"no weight file for {model}: get {published_file(model).hint()} and name it in the "
                           "config (or allow random weights for a smoke test)")
    log.info("%s: %s", model, f"weights {path}" if path else f"RANDOM weights (seed {seed}, allowed by the config)")
    if path is not None:
        warn_if_not_published(path, model)
    return path


def _kind(name: str) -> str:
    """Layer kind and parameter of a state-dict key, for checking a by-order mapping."""
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1].lstrip("_")
    kind = "bn" if module.startswith("bn") else "fc" if module in ("fc", "classifier") else "conv"
    return f"{kind}.{leaf}"


def _block_ordinal(name: str, timm_blocks: dict[tuple[int, int], int]) -> int | None:
    m = re.match(r"_blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    m = re.match(r"blocks\.(\d+)\.(\d+)\.", name)
    return timm_blocks[(int(m.group(1)), int(m.group(2)))] if m else None


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Map a state dict with other key names onto `target`'s keys in order, checking every pair.

    Each pair must agree in shape, layer kind (conv / bn / fc), parameter (weight, bias, running_mean, ...)
    and block ordinal; the first disagreement raises ValueError naming both keys.
    """
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, the model has {len(target)}; is it the right file?")
    stages = sorted({(int(a), int(b)) for a, b in re.findall(r"blocks\.(\d+)\.(\d+)\.", " ".join(target))})
    timm_blocks = {sb: i for i, sb in enumerate(stages)}
    mapped = {}
    for (src, tensor), (dst, ref) in zip(source.items(), target.items()):
        same = (
            tensor.shape == ref.shape
            and _kind(src) == _kind(dst)
            and _block_ordinal(src, timm_blocks) == _block_ordinal(dst, timm_blocks)
        )
        if not same:
            raise ValueError(
                f"{path}: tensor {src} {tuple(tensor.shape)} does not match model key {dst} {tuple(ref.shape)}"
            )
        mapped[dst] = tensor
    return mapped


def build_trunk(model: str, input_size: int, weights: str, seed: int, allow_random: bool = False) -> tuple[nn.Module, int]:
    """The pooled-feature network for `model` and its feature width, weights loaded or seeded."""
    path = weight_file(weights, model, seed, allow_random)
    with seeded(seed):
        if model == "efficientnet_lite0":
            import timm

            net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
            if path is not None:
                net.load_state_dict(map_by_order(read_weights(path), net.state_dict(), path))
            net.reset_classifier(0)
            return net, net.num_features
        import torchvision

        if model == "resnet50":
            net = torchvision.models.resnet50(weights=None)
            head = "fc"
        else:
            net = torchvision.models.vit_b_16(weights=None, image_size=input_size)
            head = "heads"
        if path is not None:
            check_and_load(net, read_weights(path), path, model)
        dim = net.fc.in_features if head == "fc" else net.hidden_dim
        setattr(net, head, nn.Identity())
        return net, dim


def to_batch(frames: list[np.ndarray], size: int, crop: bool, device: torch.device) -> torch.Tensor:
    """B x [H, W, 3] uint8 -> [B, 3, size, size] float, ImageNet-normalised.

    crop=True: short side to `size`, then centre crop; crop=False: the whole frame squashed to size^2.
    """
    out = []
    for frame in frames:
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        if crop:
            scale = size / min(h, w)
            hs, ws = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(hs, ws), mode="bilinear", antialias=True, align_corners=False)
            top, left = (hs - size) // 2, (ws - size) // 2
            x = x[..., top : top + size, left : left + size]
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x)
    batch = torch.cat(out)  # [B, 3, size, size]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std


def _batchnorm_types() -> tuple[type, ...]:
    """Norm layers that are an affine map of their input in eval mode (running statistics, no batch ones)."""
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d

    return nn.BatchNorm2d, FrozenBatchNorm2d, FrozenBatchNormAct2d  # timm's BatchNormAct2d is a BatchNorm2d


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm (running statistics) into the Conv2d it directly follows, in place;
    returns the count.

    A pair is two adjacent children of one module, conv then norm: in nn.Sequential (torchvision's
    Conv2dNormActivation) and in timm's and torchvision's blocks a conv's output goes straight into the
    norm registered after it. The norm is replaced by what it applies after normalising (timm's *Act2d:
    dropout, then the activation; otherwise nothing). Inference only: the folded model has no BatchNorm
    left to train. On CPU this removes a full pass over every feature map (~30% of EfficientNet-Lite0).
    """
    norms = _batchnorm_types()
    pairs = []
    for parent in module.modules():
        kids = list(parent.named_children())
        pairs += [(parent, c, n) for (c, conv), (n, norm) in zip(kids, kids[1:])
                  if isinstance(conv, nn.Conv2d) and isinstance(norm, norms)
                  and not norm.training and norm.running_mean is not None]  # else it normalises by batch statistics
    for parent, conv_name, norm_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                      norm.eps, norm.weight, norm.bias)
        rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
        setattr(parent, norm_name, nn.Sequential(*rest) if rest else nn.Identity())
    return len(pairs)


@dataclass
class Runtime:
    """How a model runs, for inference only: inference_mode and channels_last (NHWC) convolutions on both
    devices; CUDA adds autocast; CPU runs fp32 with every BatchNorm folded into its conv.

    On CPU, NHWC and the folding make EfficientNet-Lite0 ~2.9x cheaper (oneDNN's NHWC depthwise
    convolutions; one pass less per BatchNorm), with the same features up to float32 rounding.
    """

    device: torch.device
    amp: str
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(self.device)!r} requested but torch.cuda.is_available() is False (no GPU or "
                             "driver visible to torch): run on a GPU node, or set run.device: cpu")

    def prepare(self, module: nn.Module) -> nn.Module:
        """Takes `module` over (changed in place): device, eval mode, BatchNorm folded (CPU), memory format."""
        module = module.to(self.device).eval()
        if self.device.type == "cpu":
            n = fold_batchnorm(module)
            log.debug("%s: %d BatchNorm layers folded into their convolutions", type(module).__name__, n)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.device.type == "cuda" and self.amp != "none":
            dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
            stack.enter_context(torch.autocast("cuda", dtype=dtype))
        return stack


class TorchFrameEncoder:
    """B x [H, W, 3] uint8 frames (any sizes, any videos) -> [B, Df] float32 features."""

    def __init__(self, cfg: FrameEncoderConfig, device: str | torch.device = "cpu", allow_random: bool = False) -> None:
        self.cfg = cfg
        self.runtime = Runtime(torch.device(device), cfg.amp, cfg.channels_last)
        net, self.dim = build_trunk(cfg.model, cfg.input_size, cfg.weights, cfg.seed, allow_random)
        self.net = self.runtime.prepare(net)

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        if not frames:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self.runtime.context():
            for start in range(0, len(frames), self.cfg.batch_size):
                chunk = frames[start : start + self.cfg.batch_size]
                x = self.runtime.input(to_batch(chunk, self.cfg.input_size, crop=True, device=self.runtime.device))
                out.append(self.net(x).float().cpu().numpy())  # [b, Df]
        return np.concatenate(out)  # [B, Df]


def build_frame_encoder(cfg: FrameEncoderConfig, device: str | torch.device = "cpu", allow_random: bool = False):
    """The FrameEncoder for cfg.model; `allow_random`: a missing weight file means a seeded random init."""
    if cfg.model.startswith(OPEN_CLIP_PREFIX):
        from extractors.clip import OpenClipFrameEncoder

        return OpenClipFrameEncoder(cfg, device, allow_random)
    return TorchFrameEncoder(cfg, device, allow_random)
