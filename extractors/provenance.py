"""What made a feature, recorded with every store so runs can be compared (and resumed only alike)."""
from __future__ import annotations

import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

from extractors.api import Provenance
from extractors.config import ExtractorConfig
from extractors.weights import resolve_weights


RUNTIME_ONLY = (("sampling", "threads"), ("sampling", "buffer_mb"), ("frame_encoder", "batch_size"), ("regions", "batch_size"))


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_id(spec: str, seed: int) -> str:
    """sha256 of the weight file, or "random:seed=<seed>" for a seeded random init."""
    path = resolve_weights(spec)
    if path is None:
        return f"random:seed={seed}"
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def extractor_provenance(cfg: ExtractorConfig) -> dict:
    """Model names, weight hashes, the resolved config and library versions (deterministic: no clocks)."""
    f, r = cfg.frame_encoder, cfg.regions
    prov = Provenance()
    prov.models["frame_encoder"] = f.model
    prov.weights_sha256["frame_encoder"] = weights_id(f.weights, f.seed)
    if cfg.clip_patch_regions():
        prov.models["regions"] = f"grid:{f.model}-patch-tokens"
        prov.weights_sha256["regions"] = prov.weights_sha256["frame_encoder"]
    elif r.kind == "detector" and r.backbone == "frame_encoder":  # detector boxes, trunk features: both matter
        prov.models["regions"] = f"detector:{r.detector}+efficientnet_lite0-roialign"
        prov.weights_sha256["regions"] = weights_id(r.weights, r.seed)
        prov.weights_sha256["region_trunk"] = weights_id(r.trunk_weights, r.seed)
    elif r.kind == "detector" or r.backbone == "detector":
        prov.models["regions"] = f"{r.kind}:{r.detector}"
        prov.weights_sha256["regions"] = weights_id(r.weights, r.seed)
    else:
        prov.models["regions"] = f"{r.kind}:efficientnet_lite0-roialign"
        prov.weights_sha256["regions"] = weights_id(r.trunk_weights, r.seed)
    config = cfg.to_dict()
    for section, key in RUNTIME_ONLY:  # how fast, not what: changing them must not block a resume
        config[section].pop(key)
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "timm", "av", "open_clip_torch")}
    return {
        "models": prov.models,
        "weights_sha256": prov.weights_sha256,
        "shared_trunk": cfg.shared_trunk(),
        "random_weights": sorted(cfg.random_weights()),  # config keys whose model is randomly initialised
        "config": config,
        "versions": versions,
    }
