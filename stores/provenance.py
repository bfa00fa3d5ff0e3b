"""Compare how two stores were made (e.g. the trainer's train and eval stores)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stores.errors import StoreError


def provenance_diff(a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted key paths where two provenance dicts differ, e.g. ["frame_encoder.weights_sha256"].

    `ignore` lists dotted paths (or their prefixes) that may differ, such as the manifest of each split.
    """
    ignored = tuple(ignore)
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if path and any(path == i or path.startswith(i + ".") for i in ignored):
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key, _MISSING), y.get(key, _MISSING), f"{path}.{key}" if path else str(key))
        elif x != y:
            out.append(path or "<root>")

    walk(a, b, "")
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def assert_same_provenance(a, b, ignore: Iterable[str] = ()) -> None:
    """Raise StoreError naming every difference unless readers/dicts a and b were made the same way."""
    pa, pb = (x.provenance if hasattr(x, "provenance") else x for x in (a, b))
    diff = provenance_diff(pa, pb, ignore)
    if diff:
        names = [str(getattr(x, "layout", None) and x.layout.out or "provenance") for x in (a, b)]
        details = "; ".join(f"{k}: {_get(pa, k)!r} vs {_get(pb, k)!r}" for k in diff[:10])
        raise StoreError(f"{names[0]} and {names[1]} were not made the same way ({details}); "
                         f"re-extract one of them with the other's config, or pass ignore=[...] for keys that may differ")


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d
