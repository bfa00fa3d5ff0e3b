"""Sparse frame decoding, frame encoders and region sources. Knows nothing of Ray or of storage.

The model builders are imported lazily (PEP 562) so that the decoder child process and decode-only
workers never import torch.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "build_frame_encoder": "extractors.encoders",
    "build_region_source": "extractors.regions",
    "build_extraction_stage": "extractors.stage",
    "extractor_provenance": "extractors.provenance",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'extractors' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
