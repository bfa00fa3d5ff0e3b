"""`make bench-train`'s code on tiny inputs (64^2 frames, a 64-video store): every figure is produced
and sane; no timing is asserted."""
import json

import pytest

from benchmarks.bench_train import main


@pytest.mark.slow
@pytest.mark.timeout(1200)  # minutes of CPU on a loaded 2-core machine, though the inputs are tiny
def test_bench_train_runs_on_tiny_inputs(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert main(["--quick", "--json", str(out), "--work", str(tmp_path / "work")]) == 0
    fig = json.loads(out.read_text())
    for key in ("cache_samples_per_s", "pixel_resnet50_samples_per_s", "pixel_effnet_lite0_samples_per_s",
                "loader_samples_per_s", "loader_cold_samples_per_s", "flops_cache", "flops_pixel_resnet50"):
        assert fig[key] > 0, key
    assert fig["flops_pixel_resnet50"] > fig["flops_cache"]  # the trunk's forward + backward dominates
    (row,) = fig["rss"]
    assert row["videos"] == 64 and row["disk_mb"] > 0 and row["trainer_mb"] > 100 and row["with_workers_mb"] > 0
    assert 100 < row["torch_mb"] <= row["imports_mb"] <= row["built_mb"] <= row["trainer_mb"]
    assert 0 < row["anon_pss_mb"] <= row["with_workers_mb"] and 0 <= row["store_pss_mb"] <= row["file_pss_mb"]
    assert fig["text_cpu_s_minilm_transformers"] > fig["text_cpu_s_torch"] > 0
    assert "training samples/s" in capsys.readouterr().out
