"""The fault suite's record: each fault test checks its recovered store against an uninterrupted run and
records the outcome here; tests/conftest.py prints the table at the end of the session."""
from __future__ import annotations

from dataclasses import dataclass

from _pipeline_helpers import assert_same_store, snapshot

RESULTS: list[Fault] = []


@dataclass
class Fault:
    name: str
    survived: bool
    lost: int  # videos ok in the uninterrupted run but not in the recovered store
    duplicated: int  # video ids stored more than once
    note: str = ""


def check_recovered(name: str, reference, out, note: str = "", same_failures: bool = True) -> None:
    """Record, then assert: the recovered store equals the uninterrupted one bit for bit (ok videos, and
    every row's status and error unless `same_failures` is False) and `verify` passes."""
    from stores import open_store
    from stores.verify import verify_store

    ref, got = snapshot(reference), snapshot(out)
    ids = open_store(out).video_ids
    lost = len(set(ref["videos"]) - set(got["videos"]))
    duplicated = len(ids) - len(set(ids))
    report = verify_store(out)
    fault = Fault(name, False, lost, duplicated, note)
    RESULTS.append(fault)
    assert report.ok, report.to_json()
    if same_failures:
        assert_same_store(reference, out)
    else:
        _assert_same_videos(ref, got)
    assert lost == 0 and duplicated == 0
    fault.survived = True


def _assert_same_videos(ref: dict, got: dict) -> None:
    import numpy as np

    assert list(ref["videos"]) == list(got["videos"])
    for vid, arrays in ref["videos"].items():
        for key, value in arrays.items():
            other = got["videos"][vid][key]
            same = np.array_equal(value, other) and value.dtype == other.dtype if isinstance(value, np.ndarray) else value == other
            assert same, f"{vid}/{key} differs"


def record(name: str, survived: bool, note: str = "") -> None:
    """A fault with no store to compare (e.g. a refused second job): survived or not."""
    RESULTS.append(Fault(name, survived, 0, 0, note))


def table() -> str:
    if not RESULTS:
        return ""
    width = max(len(f.name) for f in RESULTS)
    lines = [f"{'fault':<{width}}  survived  lost  duplicated  note"]
    lines += [f"{f.name:<{width}}  {'yes' if f.survived else 'NO':<8}  {f.lost:>4}  {f.duplicated:>10}  {f.note}"
              for f in RESULTS]
    lines.append(f"{len(RESULTS)} faults tried, {sum(f.survived for f in RESULTS)} survived, "
                 f"{sum(f.lost for f in RESULTS)} videos lost, {sum(f.duplicated for f in RESULTS)} duplicated")
    return "\n".join(lines)
